"""The batched ICL engine against transformers' one-query-at-a-time generate, scoring rules, and results."""

import dataclasses
import json
import os

import numpy as np
import pytest

from icl_ft import tasks
from icl_ft.io import files
from icl_ft.evaluation import engine as icl
from icl_ft.io import loading
from icl_ft.report import plots, tables
from icl_ft.stats.proportions import wilson
from icl_ft.evaluation import scoring


@pytest.fixture(scope="module")
def model(tiny_lm):
  d, _, _ = tiny_lm
  return loading.load(str(d), use_cache=False)


def _queries(n=6):
  qs = []
  for task, shots in (("expression", 2), ("parity", 1), ("boolean", 3), ("algebra", 0)):
    qs += icl.icl_queries(task, "misleading", "paper", shots, n, seed=3)
  return qs


def test_engine_equals_transformers_generate(model, tiny_lm):
  import torch
  _, ref, tok = tiny_lm
  qs = _queries(3)
  engine = icl.EngineConfig(batch_size=4, length_multiple=32, progress=False)
  records, skipped = icl.run(model, qs, engine)
  assert skipped == [] and len(records) == len(qs)
  for q, r in zip(qs, records):
    ids = tok(q.prompt).input_ids
    out = ref.generate(torch.tensor([ids]), max_new_tokens=q.strict_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(ids):]
    assert r["completion"] == tok.decode(out, skip_special_tokens=True)
    lenient = tok.decode(out[:q.lenient_tokens], skip_special_tokens=True)
    assert r["lenient_text"] == lenient  # the byte tokenizer round-trips, so slicing the prompt is exact
    for answer, key in ((q.gold, "logprob_gold"), (q.foil, "logprob_foil")) if q.foil else ((q.gold, "logprob_gold"),):
      with torch.no_grad():  # teacher-forced log-probability of each candidate, each alone after the prompt
        ans = tok(answer, add_special_tokens=False).input_ids
        logp = torch.log_softmax(ref(torch.tensor([ids + ans])).logits[0], -1)
        expected = sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(ans))
      assert abs(r[key] - expected) < 1e-4


def test_padding_and_bucketing_never_change_a_prediction(model):
  qs = _queries(4)
  fields = ("completion", "lenient_text", "correct_lenient", "correct_strict")
  a, _ = icl.run(model, qs, icl.EngineConfig(batch_size=1, length_multiple=1, progress=False))
  b, _ = icl.run(model, qs, icl.EngineConfig(batch_size=5, length_multiple=64, progress=False))
  for ra, rb in zip(a, b):
    assert [ra[f] for f in fields] == [rb[f] for f in fields]
    assert abs(ra["logprob_gold"] - rb["logprob_gold"]) < 1e-4
    assert ra["logit_diff"] is None or abs(ra["logit_diff"] - rb["logit_diff"]) < 1e-4


def test_the_shared_header_runs_once_and_changes_no_prediction(model, tiny_lm, monkeypatch):
  real_prefix_kv = icl.prefix_kv
  qs = _queries(4)
  batches = icl._batches(qs, tiny_lm[2]([q.prompt for q in qs]).input_ids, [[[1], [2]]] * len(qs),
                         [max(q.strict_tokens, q.lenient_tokens) for q in qs], range(len(qs)),
                         icl.EngineConfig(batch_size=2))
  shared = {(qs[batch[0][0]].task, prefix) for _, _, prefix, batch in batches}  # batches of rows of queries
  assert {task for task, _ in shared} == {q.task for q in qs}  # one prefix per task (its format is fixed here)
  for task, prefix in shared:  # each task's prompts start with the bytes of their header
    assert len(prefix) >= 16 and len(prefix) % 16 == 0
    assert all(q.prompt.startswith(tiny_lm[2].decode(list(prefix))) for q in qs if q.task == task)
  assert icl.shared_prefix([[5, 6, 7], [5, 6]]) == (5,) and icl.shared_prefix([[], [1]]) == ()
  assert icl.shared_prefix([[1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 5, 8]], 2) == (1, 2, 3, 4)
  fields = ("completion", "lenient_text", "correct_lenient", "correct_strict")
  a, _ = icl.run(model, qs, icl.EngineConfig(batch_size=3, progress=False, share_prefix=False))
  calls = []
  monkeypatch.setattr(icl, "prefix_kv", lambda *args: calls.append(args[2]) or real_prefix_kv(*args))
  b, _ = icl.run(model, qs, icl.EngineConfig(batch_size=3, progress=False))
  assert len(calls) == len(shared)  # once per group, not per batch
  for ra, rb in zip(a, b):
    assert [ra[f] for f in fields] == [rb[f] for f in fields]
    assert abs(ra["logprob_gold"] - rb["logprob_gold"]) < 1e-4
    assert ra["logit_diff"] is None or abs(ra["logit_diff"] - rb["logit_diff"]) < 1e-4


def test_records_carry_every_field(model):
  records, _ = icl.run(model, icl.icl_queries("parity", "misleading", "paper", 2, 3, seed=1),
                       icl.EngineConfig(progress=False))
  need = {"task", "variant", "format", "shots", "seed", "index", "prompt", "gold", "foil", "completion",
          "correct_lenient", "correct_strict", "logprob_gold", "logprob_foil"}
  assert need <= set(records[0])
  assert [r["index"] for r in records] == [0, 1, 2]
  assert all(r["foil"] == "True" and r["gold"] == "False" and r["logprob_foil"] is not None for r in records)


def test_prompt_too_long(model):
  long = icl.icl_queries("parity", "correct", "paper", 32, 2, seed=0)  # 32 relation demos: > 4096 bytes
  with pytest.raises(icl.PromptTooLongError, match="on_too_long='skip'"):
    icl.run(model, long, icl.EngineConfig(progress=False))
  short = icl.icl_queries("parity", "correct", "paper", 0, 2, seed=0)
  records, skipped = icl.run(model, long + short, icl.EngineConfig(on_too_long="skip", progress=False))
  assert len(skipped) == 2 and len(records) == 2


@pytest.mark.parametrize("call,message", [
    (lambda: icl.icl_queries("parity", "correct", "paper", 0, 0, seed=0), "at least 1"),
    (lambda: icl.icl_queries("arithmetic", "correct", "paper", 0, 1, seed=0), "expression"),
    (lambda: icl.icl_queries("parity", "wrong", "paper", 0, 1, seed=0), "misleading"),
    (lambda: icl.icl_queries("parity", "correct", "faithful", 0, 1, seed=0), "fixed"),
    (lambda: icl.run(None, []), "no queries"),
], ids=["no queries asked", "unknown task", "unknown variant", "unknown format", "empty run"])
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()


@pytest.mark.parametrize("gold,text,kind,lenient,strict", [
    ("1", " 10", "number", True, False),      # the release's substring rule counts 1 in 10
    ("-4", " -4 \n", "number", True, True),
    ("8", "8.0", "number", True, True),        # numeric equality
    ("True", " 1\n", "label", False, True),    # 1 == True in strict; lenient needs parity's digit rule
    ("False", " True", "label", False, False),
    ("2", "\n2", "number", True, True),
])
def test_scoring_rules(gold, text, kind, lenient, strict):
  assert scoring.lenient_correct(gold, text) == lenient
  assert scoring.strict_correct(gold, text, kind) == strict


def test_parity_lenient_accepts_digits():
  assert scoring.lenient_correct("True", " 1", accept_binary_digits=True)
  assert not scoring.lenient_correct("False", " 1", accept_binary_digits=True)


def test_summary_wilson_best_of_shots_and_plot(tmp_path):
  rows = [dict(task="parity", variant="correct", format="paper", shots=k, correct_lenient=i < h,
               correct_strict=i < h - 1, logit_diff=0.5) for k, h in ((0, 3), (2, 8), (4, 6)) for i in range(10)]
  summary = tables.summarize(rows)
  assert [(r["shots"], r["acc_lenient"]) for r in summary] == [(0, 0.3), (2, 0.8), (4, 0.6)]
  lo, hi = wilson(8, 10)
  assert summary[1]["ci_lenient_lo"] == lo and abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
  best = tables.best_of_shots(summary)
  assert best == [dict(task="parity", variant="correct", format="paper", best_shots=2, acc_lenient=0.8,
                       ci_lenient_lo=lo, ci_lenient_hi=hi, acc_strict=0.7, ci_strict_lo=summary[1]["ci_strict_lo"],
                       ci_strict_hi=summary[1]["ci_strict_hi"], n=10, n_skipped=0)]
  png = plots.plot_accuracy(summary, tmp_path / "acc.png")
  assert png.read_bytes()[:4] == b"\x89PNG"
  files.write_jsonl(tmp_path / "r.jsonl", rows)
  assert files.read_jsonl(tmp_path / "r.jsonl") == rows


@pytest.mark.parametrize("answer_len", [1, 3])
def test_candidate_scoring_equals_separate_forward_passes(model, answer_len):
  """Candidates scored as prefix-sharing segments of the prefill equal each candidate run alone."""
  import jax
  import jax.numpy as jnp
  from icl_ft.evaluation import decoding as inference
  from icl_ft.model.decoder import forward, positions_from_valid
  rng = np.random.default_rng(answer_len)
  prompts = [list(rng.integers(0, 200, n)) for n in (7, 12)]
  answers = rng.integers(0, 200, (2, 2, answer_len)).astype(np.int32)
  answer_valid = np.ones_like(answers, bool)
  answer_valid[1, 0, 1:] = False  # a shorter candidate, right-padded
  packed = jax.tree.map(jnp.asarray, inference.pack([[p] for p in prompts], 16, 0, 2))
  out = inference.generate_and_score(model.config, model.params, packed, jnp.asarray(answers[:, None]),
                                     jnp.asarray(answer_valid[:, None]), 2)
  out = {k: v[:, 0] for k, v in out.items()}
  for b, prompt in enumerate(prompts):
    for c in range(2):
      ans = [int(t) for t, ok in zip(answers[b, c], answer_valid[b, c]) if ok]
      seq = jnp.asarray([prompt + ans])
      ok = jnp.ones(seq.shape, bool)
      logits = forward(model.config, model.params, seq, positions_from_valid(ok), ok)[0][0]
      logp, logits = np.asarray(jax.nn.log_softmax(logits)), np.asarray(logits)
      expected = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(ans))
      assert abs(float(out["logprob"][b, c]) - expected) < 1e-4
      assert abs(float(out["first_logit"][b, c]) - logits[len(prompt) - 1, ans[0]]) < 1e-4


@pytest.mark.parametrize("family", ["qwen2", "mistral-window"])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_a_packed_row_scores_and_decodes_each_prompt_as_a_plain_forward_pass(request, hf_dir_factory, monkeypatch,
                                                                             family, with_prefix):
  """A shot sweep with nested demos packed in one row (trunk pieces, tails, candidates and greedy tokens as
  segments): every prompt's candidate log-probabilities, first-token logits and every greedy step's logits equal
  a plain forward pass of that prompt alone (and its candidate, or its greedy tokens); with a sliding window
  (8 tokens) and with the header's keys cached."""
  import jax
  import jax.numpy as jnp
  from icl_ft.evaluation import decoding as inference
  from icl_ft.model.decoder import forward
  m = request.getfixturevalue("model") if family == "qwen2" else \
      loading.load(str(hf_dir_factory("mistral", 2, False)[0]), use_cache=False)
  rng = np.random.default_rng(7)
  draw = lambda n: [int(t) for t in rng.integers(1, 96, n)]
  header, demos = draw(5), [draw(6) for _ in range(4)]
  rows = [[header + sum(demos[:k], []) + question for k in (0, 1, 2, 4)] for question in (draw(4), draw(7))]
  rows[1][1] = header + draw(9)  # shares only the header with the trunk: the same branch point as the 0-shot one
  rows[0] = rows[0][::-1]  # the trunk (the longest prompt) first
  answers = rng.integers(1, 96, (2, 4, 2, 3)).astype(np.int32)
  answer_valid = np.ones_like(answers, bool)
  answer_valid[0, 2, 1, 2:] = False  # a shorter candidate
  cut = len(header) if with_prefix else 0
  prefix = inference.prefix_kv(m.config, m.params, jnp.asarray([header])) if with_prefix else None
  packed = inference.pack([[p[cut:] for p in r] for r in rows], 64, 0, 2)
  assert inference.packed_width([p[cut:] for p in rows[0]]) == len(rows[0][0]) - cut + 3 * 4  # trunk + 3 questions
  seen, real = [], inference._decode
  monkeypatch.setattr(inference, "_decode", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
  with jax.disable_jit():  # so the greedy steps' logits can be read
    out = inference.generate_and_score(m.config, m.params, jax.tree.map(jnp.asarray, packed), jnp.asarray(answers),
                                       jnp.asarray(answer_valid), 4, prefix)
  steps = np.asarray(seen[0][1])  # [B, K, N, V]
  alone = lambda ids: np.asarray(forward(m.config, m.params, jnp.asarray([ids]), jnp.arange(len(ids))[None],
                                         jnp.ones((1, len(ids)), bool))[0][0])
  for b, row in enumerate(rows):
    for k, prompt in enumerate(row):
      new = [int(t) for t in out["tokens"][b, k]]
      np.testing.assert_allclose(steps[b, k], alone(prompt + new[:-1])[len(prompt) - 1:], atol=1e-5)
      for c in range(2):
        ans = [int(t) for t, ok in zip(answers[b, k, c], answer_valid[b, k, c]) if ok]
        logits = alone(prompt + ans)
        logp = np.asarray(jax.nn.log_softmax(logits))
        expected = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(ans))
        assert abs(float(out["logprob"][b, k, c]) - expected) < 1e-4
        assert abs(float(out["first_logit"][b, k, c]) - logits[len(prompt) - 1, ans[0]]) < 1e-4


def test_pack_refuses_what_it_cannot_lay_out():
  from icl_ft.evaluation import decoding as inference
  with pytest.raises(ValueError, match="non-empty prompts; row 1 has lengths \\[2, 0\\]"):
    inference.pack([[[1, 2], [1]], [[1, 2], []]], 8, 0, 2)
  with pytest.raises(ValueError, match="row 0 packs 9 tokens into a width of 8"):
    inference.pack([[[1, 2, 3, 4, 5, 6], [7, 8, 9]]], 8, 0, 2)


def test_a_nested_sweep_runs_each_item_as_one_packed_row_with_the_same_records(model, monkeypatch):
  from icl_ft.evaluation import decoding
  packed_rows, pack = [], decoding.pack
  monkeypatch.setattr(icl, "pack", lambda rows, *a: packed_rows.extend(rows) or pack(rows, *a))
  kw = dict(task_names=("boolean", "expression"), variants=("correct",), formats=("paper",), shots=(0, 1, 2), n=3,
            seed=5, nested=True)
  engine = icl.EngineConfig(batch_size=6, progress=False)
  icl.sweep(model, engine=engine, **kw)  # the sweep packs nested demos by itself
  assert {len(r) for r in packed_rows} == {3}
  for row in packed_rows:  # the demos are shared, not only the header (already cut off here)
    assert decoding.packed_width(row) < sum(map(len, row)) - 20
  queries = icl.sweep_queries(**kw)
  packed, _ = icl.run(model, queries, dataclasses.replace(engine, pack_shots=True))
  alone, _ = icl.run(model, queries, engine)  # the header still shared: only the packing differs
  assert len(packed) == len(alone) == 2 * 3 * 3
  for a, b in zip(packed, alone):
    assert (a["shots"], a["question"], a["completion"], a["lenient_text"]) == \
        (b["shots"], b["question"], b["completion"], b["lenient_text"])
    assert abs(a["logprob_gold"] - b["logprob_gold"]) < 1e-4
    assert (a["logit_diff"] is None) == (b["logit_diff"] is None)
    assert a["logit_diff"] is None or abs(a["logit_diff"] - b["logit_diff"]) < 1e-4


def test_strict_scoring_uses_the_tasks_budget():
  from conftest import build_byte_tokenizer
  tok = build_byte_tokenizer()
  q = icl.icl_queries("code", "correct", "fixed", 0, 1, seed=0)[0]
  q = dataclasses.replace(q, gold="0.4444444444444444")  # 19 byte tokens with its space: > 8
  assert q.strict_tokens == tasks.strict_len("code", "fixed") >= 19
  new = tok(" 0.4444444444444444\n").input_ids + [tok.eos_token_id]
  r = icl.record(q, tok(q.prompt).input_ids, new, [0.0, 0.0], [0.0, 0.0], tok)
  assert r["completion"] == " 0.4444444444444444\n" and r["correct_strict"]


@pytest.mark.parametrize("task", ["parity", "boolean", "algebra", "code"])
def test_engine_with_the_real_smollm2_tokenizer_on_prompts_ending_in_a_space(smollm2_vocab_lm, task):
  import torch
  d, ref, tok = smollm2_vocab_lm
  m = loading.load(str(d), use_cache=False)
  qs = icl.icl_queries(task, "correct", "paper", 1, 3, seed=2)
  assert all(q.prompt.endswith(" ") for q in qs)
  records, _ = icl.run(m, qs, icl.EngineConfig(batch_size=2, progress=False))
  for q, r in zip(qs, records):
    ids = tok(q.prompt).input_ids
    gold = icl.continuation_ids(tok, q.prompt, ids, q.gold)
    assert tok.decode(ids + gold) == q.prompt + q.gold  # the scored tokens continue the prompt exactly
    out = ref.generate(torch.tensor([ids]), max_new_tokens=max(q.strict_tokens, q.lenient_tokens), do_sample=False,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert r["completion"] == tok.decode(out[:q.strict_tokens], skip_special_tokens=True)
    assert r["lenient_text"] == tok.decode(ids + out[:q.lenient_tokens], skip_special_tokens=True)[len(q.prompt):]
    with torch.no_grad():
      logp = torch.log_softmax(ref(torch.tensor([ids + gold])).logits[0], -1)
    assert abs(r["logprob_gold"] - sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(gold))) < 1e-4


def test_best_of_shots_breaks_ties_numerically_and_dev_chosen_k_uses_the_dev_split():
  def rows(split, hits):  # hits per shot count, 10 queries each
    return [dict(task="parity", variant="correct", format="paper", split=split, shots=k, correct_lenient=i < h,
                 correct_strict=i < h) for k, h in hits.items() for i in range(10)]
  summary = tables.summarize(rows("test", {2: 6, 4: 5, 16: 6}) + rows("dev", {2: 3, 4: 9, 16: 9}))
  assert [r["shots"] for r in summary if r["split"] == "test"] == [2, 4, 16]
  assert tables.best_of_shots(summary)[0]["best_shots"] == 2  # tie 2 vs 16: the fewer shots
  dev = tables.dev_chosen_shots(summary)[0]
  assert (dev["dev_shots"], dev["dev_acc"], dev["acc_lenient"]) == (4, 0.9, 0.5)  # k from dev, scored on test


def test_skipped_queries_are_counted_per_cell(model):
  long = icl.icl_queries("parity", "correct", "paper", 32, 2, seed=0)
  short = icl.icl_queries("parity", "correct", "paper", 0, 2, seed=0)
  records, skipped = icl.run(model, long + short, icl.EngineConfig(on_too_long="skip", progress=False))
  summary = tables.summarize(records, skipped)
  assert [(r["shots"], r["n"], r["n_skipped"]) for r in summary] == [(0, 2, 0), (32, 0, 2)]
  assert summary[1]["acc_strict"] is None


def test_a_cell_whose_queries_were_all_skipped_is_reported_not_fatal(tmp_path):
  ok = [dict(task="code", variant="correct", format="paper", split=s, shots=k, correct_lenient=True,
             correct_strict=False) for s in ("test", "dev") for k in (0, 1)]
  skipped = [dict(task="code", variant="correct", format="paper", split=s, shots=16) for s in ("test", "dev")]
  summary = tables.summarize(ok, skipped)
  assert [(r["split"], r["shots"], r["n"], r["n_skipped"]) for r in summary if r["shots"] == 16] == [
      ("dev", 16, 0, 1), ("test", 16, 0, 1)]
  assert tables.best_of_shots(summary)[0]["best_shots"] == 1
  assert tables.dev_chosen_shots(summary)[0]["dev_shots"] == 1
  assert plots.plot_accuracy([r for r in summary if r["split"] == "test"], tmp_path / "a.png").exists()
  files.write_csv(tmp_path / "s.csv", summary)


def test_query_records_round_trip_with_their_schema(model, tmp_path):
  from icl_ft.io import records
  recs, _ = icl.run(model, icl.icl_queries("parity", "misleading", "fixed", 1, 2, seed=1),
                    icl.EngineConfig(progress=False))
  records.write_queries(tmp_path / "r.jsonl", recs)
  assert records.read_queries(tmp_path / "r.jsonl") == recs
  rows = files.read_jsonl(tmp_path / "r.jsonl")
  files.write_jsonl(tmp_path / "old.jsonl", [dict(r, schema=0) for r in rows])
  with pytest.raises(records.SchemaError, match="schema 0"):
    records.read_queries(tmp_path / "old.jsonl")
  with pytest.raises(records.SchemaError, match="holds a 'summary' document, not 'circuits'"):
    records.write_document(tmp_path / "s.json", "summary", {"cells": []})
    records.read_document(tmp_path / "s.json", "circuits")


def test_control_cells_hold_the_test_items_with_their_demos_replaced():
  qs = icl.sweep_queries(["parity"], ["correct"], ["fixed"], [0, 4], 3, 5, controls=("shuffled", "irrelevant"),
                         control_shots=4)
  by = lambda control: [q for q in qs if q.cell.shots == 4 and q.cell.control == control]
  real, shuffled, irrelevant = by(None), by("shuffled"), by("irrelevant")
  assert len(real) == len(shuffled) == len(irrelevant) == 3
  for r, s, i in zip(real, shuffled, irrelevant):
    assert r.cell.question == s.cell.question == i.cell.question and r.gold == s.gold == i.gold
    assert s.prompt != r.prompt != i.prompt
  assert [icl.method(q.cell) for q in (qs[0], real[0], shuffled[0], irrelevant[0])] == [
      "base", "icl", "icl-shuffled", "icl-irrelevant"]
  with pytest.raises(ValueError, match="control_shots >= 2"):
    icl.sweep_queries(["parity"], ["correct"], ["fixed"], [0], 3, 5, controls=("shuffled",), control_shots=1)


def test_sized_cells_hold_the_first_items_of_the_same_query_set():
  qs = icl.sweep_queries(["parity"], ["correct"], ["fixed"], [0, 4, 8], 6, 5, n_dev=2, controls=("shuffled",),
                         control_shots=4, sizes={8: 2, 4: 3})
  cell = lambda k, control=None, split="test": [q.cell.question for q in qs if (q.cell.shots, q.cell.control,
                                                                                 q.cell.split) == (k, control, split)]
  assert len(cell(0)) == 6 and cell(4) == cell(0)[:3] == cell(4, "shuffled") and cell(8) == cell(0)[:2]
  assert len(cell(8, split="dev")) == 2 and not set(cell(8, split="dev")) & set(cell(0))


def test_the_report_says_which_formats_meet_and_whether_the_ft_data_shows_the_pattern():
  f = tables.formats({"format": "paper"}, {"parity": "paper", "boolean": "fixed"})
  assert f["circuits"] == {"parity": "paper", "boolean": "fixed"}
  assert len(f["warnings"]) == 1 and "boolean" in f["warnings"][0] and "crosses formats" in f["warnings"][0]
  assert not tables.formats({"format": "fixed"}, {"boolean": "fixed"})["warnings"]
  # the release's boolean FT data (paper format) never shows the absorbing clause; the fixed format always does
  assert tables.ft_data_cues(["boolean"], 100, 42, "paper") == {"boolean": {"final_literal": 0.0}}
  assert tables.ft_data_cues(["boolean"], 100, 42, "fixed") == {"boolean": {"final_literal": 1.0}}


def test_wilson_intervals_hold_their_proportion_exactly():
  """At 50/50 rounding put the upper bound at 0.9999999999999999, below the accuracy: a figure's error bar
  went negative and failed to draw."""
  for n in (1, 7, 50, 199):
    for hits in range(n + 1):
      lo, hi = wilson(hits, n)
      assert 0.0 <= lo <= hits / n <= hi <= 1.0, (hits, n, lo, hi)


def test_icl_command_prints_accuracy_and_the_rule_followed(tiny_lm, tmp_path):
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "icl_ft.icl", f"--model={tiny_lm[0]}", "--task=parity",
                        "--variant=correct,misleading-z", "--shots=0,1,2", "--n=2", "--nested_demos",
                        f"--out={tmp_path}"], capture_output=True, text=True, check=True).stdout
  assert "misleading-z paper k=1  n=2" in out and out.count("answers follow:") == 3  # per (task, format, k)
  assert out.count("minus k=0 on the same 2 items (strict, paired)") == 4  # per variant at k=1 and k=2
  records = files.read_jsonl(tmp_path / "records.jsonl")
  prompt = {(r["variant"], r["index"], r["shots"]): r["prompt"] for r in records}
  common = lambda a, b: len(os.path.commonprefix([a, b]))
  for variant, index, shots in prompt:  # --nested_demos: the 2-shot prompt opens with the 1-shot prompt's demo
    if shots == 2:
      two = prompt[variant, index, 2]
      assert common(prompt[variant, index, 1], two) > common(prompt[variant, index, 0], two) + 50
