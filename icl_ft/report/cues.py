"""Which rule do a condition's answers follow? Cue analysis over the study's query records.

A task's rules are its cues (``Task.cues``: pure functions of the question, e.g. parity's line-count parity and
"a line mentions Z"), the gold answer (the task's true rule), and the condition's most frequent answer (a
constant answer is a rule too). Per condition (base, ICL at each k, each control, fine-tuned at each checkpoint,
few-shot FT), with all of a task's variants pooled, this module gives:

- ``agreement``: per rule, the share of the items it predicts whose parsed answer (the strict rule's first
  answer-typed span) equals its prediction, with a 95% Wilson interval;
- ``conflict``: accuracy on the items where the rules do not all agree (where a shortcut and the pattern part),
  next to ``conflict_modal``, what the modal answer alone scores there;
- ``pairs``: for two rules, on the items where they disagree, the share of answers siding with each (answers
  matching neither count against both), with Wilson intervals;
- ``follows``: the rule that wins every comparison with a rule it can be told apart from (the interval of its
  share above 0.5), ``None`` when no rule does. A constant answer that wins is reported as such.

Each comparison is a per-comparison 95% interval, not adjusted for the number of rules or conditions. The
constant rule's answer is chosen on the same items (the modal answer), which favours it slightly (a
false-positive verdict for it in under 1% of random binary answer sets); it must still win each comparison.
"""

from __future__ import annotations

import collections
import itertools
from typing import Sequence

from icl_ft import tasks
from icl_ft.evaluation import scoring
from icl_ft.stats.proportions import paired_difference, wilson

GOLD = "gold"
CONSTANT = "constant"
CONSTANT_SHARE = 0.9  # a winning modal answer is called constant when its share's interval lies above this
CONDITION_KEYS = ("task", "format", "method", "step", "shots")


def _canonical(answer: str | None, kind: str) -> str | None:
  if answer is None:
    return None
  if kind == "number":
    v = float(answer)
    return str(int(v)) if v.is_integer() else repr(v)
  return {"1": "True", "0": "False"}.get(answer, answer)


def _interval(hits: int, n: int) -> dict:
  lo, hi = wilson(hits, n)
  return dict(k=hits, n=n, share=hits / n if n else None, lo=lo, hi=hi)


def analyse_condition(records: Sequence[dict]) -> dict:
  """The cue analysis of one condition's records (one task; variants pooled): answered share, the modal answer's
  share, per-rule agreement (over the items the rule predicts), accuracy on conflicting items (and what the
  modal answer alone would score there), pairwise comparisons and the rule it follows."""
  task = tasks.get_task(records[0]["task"])
  kind = task.answer_kind
  answers = [_canonical(scoring.strict_answer(r["completion"], kind), kind) for r in records]
  counts = collections.Counter(a for a in answers if a is not None)
  modal, modal_n = counts.most_common(1)[0] if counts else (None, 0)
  preds = {GOLD: [_canonical(r["gold"], kind) for r in records]}
  preds.update({c: [_canonical(r["cues"][c], kind) for r in records] for c in task.cues})
  if modal is not None:
    preds[CONSTANT] = [modal] * len(records)
  agreement = {rule: _interval(sum(a == p for a, p in zip(answers, ps) if p is not None),
                               sum(p is not None for p in ps)) for rule, ps in preds.items()}
  conflict = [i for i in range(len(records)) if len({ps[i] for r, ps in preds.items() if r != CONSTANT
                                                     and ps[i] is not None}) > 1]
  pairs = {}
  for r, s in itertools.combinations(preds, 2):
    disputed = [i for i in range(len(records))
                if None not in (preds[r][i], preds[s][i]) and preds[r][i] != preds[s][i]]
    side_r = sum(answers[i] == preds[r][i] for i in disputed)
    side_s = sum(answers[i] == preds[s][i] for i in disputed)
    pairs[f"{r}|{s}"] = dict(_interval(side_r, len(disputed)), first=r, second=s, second_side=_interval(
        side_s, len(disputed)), neither=len(disputed) - side_r - side_s)
  return dict(n=len(records), answered=_interval(sum(a is not None for a in answers), len(records)),
              modal=modal, modal_share=_interval(modal_n, len(records)), agreement=agreement,
              conflict=_interval(sum(answers[i] == preds[GOLD][i] for i in conflict), len(conflict)),
              conflict_modal=_interval(sum(modal == preds[GOLD][i] for i in conflict), len(conflict)),
              pairs=pairs, **_verdict(list(preds), pairs))


def _verdict(rules: Sequence[str], pairs: dict) -> dict:
  """Two rules are told apart when they disagree on enough items that a unanimous side's interval would lie
  above 0.5; one beats the other when the share of those items answered its way (answers matching neither count
  against both) has its interval above 0.5. ``follows``: the rule beating every rule it is told apart from;
  ``aliases``: the rules not told apart from it here; ``beaten``: per rule, the rules it beats."""
  beats = {r: set() for r in rules}
  distinct = {r: set() for r in rules}
  for p in pairs.values():
    r, s = p["first"], p["second"]
    if p["n"] and wilson(p["n"], p["n"])[0] > 0.5:
      distinct[r].add(s)
      distinct[s].add(r)
    if p["n"] and p["lo"] > 0.5:
      beats[r].add(s)
    elif p["n"] and p["second_side"]["lo"] > 0.5:
      beats[s].add(r)
  winners = [r for r in rules if distinct[r] and beats[r] == distinct[r]]
  follows = winners[0] if winners else None
  aliases = [r for r in rules if follows and r != follows and r not in distinct[follows]]
  return dict(follows=follows, aliases=aliases, beaten={r: sorted(b) for r, b in beats.items()})


def condition_name(key: dict) -> str:
  """A readable name: ``base 0-shot``, ``ICL k=4``, ``ICL k=4, shuffled``, ``FT step 40``, ``few-shot FT``."""
  method, shots = key["method"], key.get("shots") or 0
  if method == "base":
    return "base 0-shot"
  if method.startswith("icl"):
    control = method.removeprefix("icl").removeprefix("-")
    return f"ICL k={shots}" + (f", {control}" if control else "")
  name = {"ft": f"FT step {key.get('step')}", "ft-fewshot": "few-shot FT"}.get(method, method)
  return name + (f", {shots}-shot" if shots else "")


def analyse(records: Sequence[dict]) -> list[dict]:
  """``analyse_condition`` for every condition (``CONDITION_KEYS``) of the test-split ``records``, in the order
  base, ICL by k, controls, fine-tuned by step, few-shot FT."""
  groups: dict[tuple, list[dict]] = collections.defaultdict(list)
  for r in records:
    if r.get("split", "test") == "test":
      groups[tuple(r.get(k) for k in CONDITION_KEYS)].append(r)
  metas = sorted((dict(zip(CONDITION_KEYS, key)) for key in groups), key=_order)
  return [dict(m, condition=condition_name(m), **analyse_condition(groups[tuple(m.values())])) for m in metas]


def _order(meta: dict) -> tuple:
  """Task, format, then base, ICL by k, the controls, fine-tuned by step, few-shot FT."""
  rank = {"base": 0, "icl": 1, "ft": 3, "ft-fewshot": 4}.get(meta["method"], 2)
  return meta["task"], str(meta["format"]), rank, meta["method"], meta["step"] or 0, meta["shots"] or 0


def verdict_text(row: dict) -> str:
  """One sentence: the rule a condition's answers follow (with the constant answer's share), or none."""
  share, answered = row["modal_share"], row["answered"]
  if not answered["k"]:
    return f"no parsable answer on any of {answered['n']} items"
  constant = f"'{row['modal']}' on {share['k']}/{share['n']} ({share['share']:.2f} [{share['lo']:.2f}, {share['hi']:.2f}])"
  follows = row["follows"]
  unanswered = f"; answered {answered['k']}/{answered['n']}" if answered["k"] < answered["n"] else ""
  if follows == CONSTANT:  # constant: at least 90% one answer (interval); otherwise one answer over every cue
    what = "a constant answer" if share["lo"] >= CONSTANT_SHARE else "mostly one answer (no cue, not the gold)"
    return f"{what}: {constant}{unanswered}"
  if follows is None:
    return f"no rule detected (most frequent answer {constant}{unanswered})"
  aliases = f" (not told apart from {', '.join(row['aliases'])} on these items)" if row["aliases"] else ""
  agree = row["agreement"][follows]
  what = "the gold answer (the pattern)" if follows == GOLD else f"cue `{follows}`"
  return f"{what}{aliases}: agrees on {agree['share']:.2f} [{agree['lo']:.2f}, {agree['hi']:.2f}]{unanswered}"


def paired_differences(records: Sequence[dict], reference: tuple[str, int | None, int], rule: str = "strict",
                       methods: Sequence[str] | None = None) -> list[dict]:
  """Per condition (of ``methods``, default every one but the reference) and per variant: its accuracy minus the
  accuracy of the ``reference`` condition ``(method, step, shots)`` on the same test items (``rule``), with
  Newcombe's paired interval; ``detected`` when the interval excludes 0."""
  cells: dict[tuple, dict[int, bool]] = collections.defaultdict(dict)
  for r in records:
    if r.get("split", "test") == "test":
      cells[(*(r.get(k) for k in CONDITION_KEYS), r["variant"])][r["index"]] = bool(r[f"correct_{rule}"])
  out = []
  for key, hits in cells.items():
    meta = dict(zip((*CONDITION_KEYS, "variant"), key))
    ref = cells.get((meta["task"], meta["format"], *reference, meta["variant"]))
    if (meta["method"], meta["step"], meta["shots"]) == tuple(reference) or ref is None or (
        methods is not None and meta["method"] not in methods):
      continue
    items = sorted(set(hits) & set(ref))
    diff, lo, hi = paired_difference([hits[i] for i in items], [ref[i] for i in items])
    out.append(dict(meta, condition=condition_name(meta), rule=rule, n=len(items), diff=diff, lo=lo, hi=hi,
                    detected=lo > 0 or hi < 0))
  return sorted(out, key=lambda r: (*_order(r), r["variant"]))


def differences_from_base(records: Sequence[dict], rule: str = "strict") -> list[dict]:
  """Every condition's accuracy minus the base model's 0-shot accuracy on the same items (``paired_differences``)."""
  return paired_differences(records, ("base", None, 0), rule)


def icl_minus_ft(records: Sequence[dict], step: int) -> list[dict]:
  """ICL with real demos at each k minus the fine-tuned model (0-shot, checkpoint ``step``) on the same items,
  lenient and strict (``paired_differences``): the ICL - FT gap."""
  return [row for rule in ("lenient", "strict")
          for row in paired_differences(records, ("ft", step, 0), rule, methods=("icl",))]


def difference_text(row: dict) -> str:
  """``+0.30 [0.18, 0.41]`` when the interval excludes 0, else ``no difference detected (-0.04 [-0.12, 0.05])``."""
  text = f"{row['diff']:+.2f} [{row['lo']:+.2f}, {row['hi']:+.2f}]"
  return f"**{text}**" if row["detected"] else f"no difference detected ({text})"
