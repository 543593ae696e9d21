"""Cue analysis: which rule a condition's answers follow, on answers made by known rules."""

import random

import pytest

from icl_ft import tasks
from icl_ft.report import cues

N = 40


def _records(answer_by, n=N, method="icl", shots=4):
  """Parity records over all three variants whose completions ``answer_by(example, record)`` writes."""
  out = []
  for variant in ("correct", "misleading", "misleading-z"):
    for ex in tasks.make_queries("parity", variant, n, 0, "paper"):
      r = dict(task="parity", variant=variant, format="paper", method=method, step=None, shots=shots, split="test",
               gold=ex.answer, **tasks.shortcut_record(ex, "paper"))
      r["completion"] = answer_by(ex, r) + "\n"
      out.append(r)
  return out


@pytest.mark.parametrize("rule, answer_by", [
    ("z_present", lambda ex, r: r["cues"]["z_present"]),
    ("line_parity", lambda ex, r: r["cues"]["line_parity"]),
    ("gold", lambda ex, r: ex.answer),
    ("constant", lambda ex, r: "True"),
])
def test_the_rule_that_wrote_the_answers_is_found(rule, answer_by):
  row = cues.analyse_condition(_records(answer_by))
  assert row["follows"] == rule
  assert row["agreement"][rule]["share"] == 1.0
  if rule == "constant":
    assert row["modal"] == "True" and row["modal_share"]["share"] == 1.0
    assert "a constant answer: 'True' on 120/120" in cues.verdict_text(row)
    count = iter(range(10 ** 6))
    mostly = cues.analyse_condition(_records(lambda ex, r: "x" if next(count) % 5 == 0 else "True"))  # 80% True
    assert mostly["follows"] == "constant" and "mostly one answer (no cue, not the gold)" in cues.verdict_text(mostly)


def test_random_answers_follow_no_rule_and_label_digits_count():
  rng = random.Random(0)
  row = cues.analyse_condition(_records(lambda ex, r: rng.choice(["True", "False"])))
  assert row["follows"] is None and "no rule detected" in cues.verdict_text(row)
  digits = cues.analyse_condition(_records(lambda ex, r: "1" if r["cues"]["z_present"] == "True" else "0"))
  assert digits["follows"] == "z_present" and digits["answered"]["share"] == 1.0


def test_a_noisy_follower_is_found_only_when_its_interval_says_so():
  def noisy(p, seed):
    rng = random.Random(seed)
    return lambda ex, r: r["cues"]["line_parity"] if rng.random() < p else rng.choice(["True", "False"])
  assert cues.analyse_condition(_records(noisy(0.9, 1)))["follows"] == "line_parity"
  assert cues.analyse_condition(_records(noisy(0.2, 1)))["follows"] is None


def test_rules_disputed_on_too_few_items_to_decide_are_aliases_not_rivals():
  row = cues.analyse_condition(_records(lambda ex, r: r["cues"]["line_parity"], n=2))  # 2 misleading items
  assert row["follows"] == "line_parity" and row["aliases"] == ["z_present", "constant"]
  assert "not told apart from z_present" in cues.verdict_text(row)


def test_answers_matching_neither_rule_count_against_both():
  count = iter(range(10 ** 6))  # right on 1 item in 5, an unparsable answer elsewhere
  row = cues.analyse_condition(_records(lambda ex, r: ex.answer if next(count) % 5 == 0 else "?"))
  assert row["follows"] is None and row["agreement"]["gold"]["share"] == pytest.approx(0.2, abs=0.05)
  assert "answered" in cues.verdict_text(row)


def test_agreement_counts_only_the_items_a_rule_predicts():
  recs = _records(lambda ex, r: r["cues"]["z_present"])
  for r in recs:
    if r["variant"] == "correct":
      r["cues"]["line_parity"] = None
  row = cues.analyse_condition(recs)
  assert row["agreement"]["line_parity"]["n"] == 2 * N and row["agreement"]["z_present"]["n"] == 3 * N


def test_conflict_accuracy_is_the_accuracy_where_shortcut_and_pattern_part():
  recs = _records(lambda ex, r: r["cues"]["z_present"])
  row = cues.analyse_condition(recs)
  # Correct items: every rule agrees; misleading (z right) and misleading-z (z wrong) items conflict.
  assert row["conflict"]["n"] == 2 * N and row["conflict"]["k"] == N
  pair = row["pairs"]["gold|z_present"]
  assert pair["n"] == N and pair["k"] == 0 and pair["second_side"]["k"] == N  # on misleading-z: all with z
  assert row["conflict_modal"]["n"] == 2 * N


def test_conditions_are_grouped_named_and_ordered():
  recs = (_records(lambda ex, r: "True", method="ft", shots=0) + _records(lambda ex, r: "True", method="base", shots=0)
          + _records(lambda ex, r: "True", shots=8) + _records(lambda ex, r: "True", method="icl-shuffled"))
  for r in recs[:3 * N]:
    r["step"] = 40
  names = [row["condition"] for row in cues.analyse(recs + [dict(recs[0], split="dev", shots=2)])]
  assert names == ["base 0-shot", "ICL k=8", "ICL k=4, shuffled", "FT step 40"]


def test_paired_difference_interval_covers_at_its_level():
  import numpy as np
  from icl_ft.stats.proportions import paired_difference
  rng = np.random.default_rng(0)
  for p1, p2, n in [(0.5, 0.5, 50), (0.9, 0.7, 40)]:
    cover = 0
    for _ in range(1000):
      u = rng.random(n)
      v = np.where(rng.random(n) < 0.5, u, rng.random(n))  # correlated pairs
      _, lo, hi = paired_difference(u < p1, v < p2)
      cover += lo <= p1 - p2 <= hi
    assert 0.93 <= cover / 1000 <= 0.975

  def table(a, b, c, d):  # both right, only x right, only y right, both wrong
    return paired_difference([1] * (a + b) + [0] * (c + d), [1] * a + [0] * b + [1] * c + [0] * d)
  assert table(1, 1, 7, 12)[1:] == pytest.approx((-0.5069, -0.0256), abs=1e-4)  # Newcombe (1998), Table II
  assert table(59, 6, 16, 80)[1:] == pytest.approx((-0.1186, -0.0046), abs=1e-4)
  assert table(10, 0, 0, 10)[1] < 0 < table(10, 0, 0, 10)[2]  # identical answers: still an interval


def test_differences_from_base_pair_the_same_items():
  base = _records(lambda ex, r: "True", method="base", shots=0)
  icl = _records(lambda ex, r: ex.answer)  # right everywhere
  for recs in (base, icl):
    for i, r in enumerate(recs):
      r.update(index=i % N, correct_strict=r["completion"].strip() == r["gold"])
  icl = [r for r in icl if r["index"] % 2 == 0]  # a smaller cell: its items are paired with base's same items
  rows = {(r["condition"], r["variant"]): r for r in cues.differences_from_base(base + icl)}
  correct = rows[("ICL k=4", "correct")]
  truths = sum(r["gold"] == "True" for r in base[:N] if r["index"] % 2 == 0)
  assert correct["n"] == N // 2 and correct["diff"] == pytest.approx(1 - truths / (N // 2)) and correct["detected"]
  assert rows[("ICL k=4", "misleading")]["diff"] == 1.0  # every misleading gold is False; base said True
  assert "no difference detected" in cues.difference_text(dict(correct, diff=0.02, lo=-0.05, hi=0.09, detected=False))


@pytest.mark.parametrize("with_differences", [True, False])
def test_headline_table_is_well_formed_when_a_condition_has_no_answer(with_differences):
  from icl_ft.report import render
  recs = _records(lambda ex, r: "True", method="base", shots=0) + _records(lambda ex, r: "?")
  for i, r in enumerate(recs):
    r.update(index=i % N, correct_strict=r["completion"].strip() == r["gold"])
  rows = cues.analyse(recs)
  lines = render._headline(dict(cues=rows, differences=cues.differences_from_base(recs) if with_differences else []))
  table = [l for l in lines if l.startswith("|")]
  assert len(table) == 4 and len({l.count("|") for l in table}) == 1
  assert "no parsable answer on any of 120 items" in table[-1] and "agree: constant" in table[0]


def test_icl_minus_ft_pairs_each_k_with_the_chosen_checkpoint_on_the_same_items():
  """ICL (right everywhere) minus FT: at step 40 FT says 'True' everywhere, at step 20 it is right everywhere; the
  gap must use step 40 only, for each k and rule, on the items both have (a smaller k=2 cell pairs with its own)."""
  def scored(recs, **meta):
    for i, r in enumerate(recs):
      r.update(meta, index=i % N, correct_strict=r["completion"].strip() == r["gold"])
      r["correct_lenient"] = r["correct_strict"]
    return recs
  icl4 = scored(_records(lambda ex, r: ex.answer))
  icl2 = [r for r in scored(_records(lambda ex, r: ex.answer, shots=2)) if r["index"] < N // 2]
  shuffled = scored(_records(lambda ex, r: ex.answer, method="icl-shuffled"))
  ft40 = scored(_records(lambda ex, r: "True", method="ft", shots=0), step=40)
  ft20 = scored(_records(lambda ex, r: ex.answer, method="ft", shots=0), step=20)
  rows = {(r["shots"], r["variant"], r["rule"]): r for r in cues.icl_minus_ft(icl4 + icl2 + shuffled + ft40 + ft20, 40)}
  assert {r["method"] for r in rows.values()} == {"icl"}  # no control, no FT row
  assert len(rows) == 2 * 3 * 2  # k x variant x rule
  truths = sum(r["gold"] == "True" for r in ft40[:N])
  assert rows[(4, "correct", "strict")]["n"] == N
  assert rows[(4, "correct", "strict")]["diff"] == pytest.approx(1 - truths / N)
  assert rows[(2, "correct", "lenient")]["n"] == N // 2
  assert rows[(4, "misleading", "strict")]["diff"] == 1.0 and rows[(4, "misleading", "strict")]["detected"]
