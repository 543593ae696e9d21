"""Clean/corrupt prompt pairs: equal token length, independently recomputed answers, shared demos, drops."""

import collections
import dataclasses
import re

import numpy as np
import pytest

from conftest import build_byte_tokenizer
from icl_ft import tasks
from icl_ft.evaluation.engine import continuation_ids
from icl_ft.interp import pairs

N = 10
SEED = 3


# The byte-level test tokenizers split every answer into several tokens: their pairs keep multi-token answers
# (single_token=False); the real tokenizer's keep one-token answers only (the last test).
@pytest.fixture(scope="module")
def byte_tok():
  return build_byte_tokenizer()


def bpe_tokenizer(words):
  """Byte-level tokenizer plus BPE merges that make each of ``words`` a single token (left-to-right merges)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  merges = []
  for word in words:
    for end in range(2, len(word) + 1):
      if word[:end] not in vocab:
        merges.append((word[:end - 1], word[end - 1]))
        vocab[word[:end]] = len(vocab)
  vocab["<eos>"] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def word_tok():
  """True/False (and a few words) are single tokens, as in real BPE vocabularies."""
  return bpe_tokenizer(["True", "False"])


# ------------------------------------------------------------------------------------- independent oracles

def _split_query(task, prompt):
  """The query's question text at the end of a fixed-format prompt."""
  if task == "expression":
    return prompt.rsplit("\n", 1)[1]
  if task == "parity":
    body = prompt.rstrip(" ")[:-len("\n So 'the city A and Z is connected' is")]  # fixed: no trailing space
    lines = body.split("\n")
    return "\n".join(lines[-11:])  # 10 lines + the trailing newline's empty string
  body = prompt[:-len("\n The result is: ")]
  return body.rsplit("\n", 1)[1]


def _bfs(question):
  adj = collections.defaultdict(list)
  for line in question.strip("\n").split("\n"):
    words = line.split()
    assert words[1:4] == ["is", "connected", "with"], line
    adj[words[0]].append(words[4])
    adj[words[4]].append(words[0])
  seen, todo = {"A"}, ["A"]
  while todo:
    for v in adj[todo.pop()]:
      if v not in seen:
        seen.add(v)
        todo.append(v)
  return "Z" in seen


def _answer(task, question):
  if task == "expression":
    assert question.endswith("=")
    return str(eval(question[:-1]))
  if task == "parity":
    return str(_bfs(question))
  return "1" if eval(question) else "0"


def _check_pairset(ps, task, tok, shots, max_changed=3):
  big_t = ps.length
  assert ps.task == task and ps.shots == shots and ps.seed == SEED
  assert ps.clean_ids.dtype == np.int32 and ps.corrupt_ids.dtype == np.int32 and ps.valid.dtype == bool
  assert ps.clean_ids.shape == ps.corrupt_ids.shape == ps.valid.shape == (len(ps), big_t)
  np.testing.assert_array_equal(ps.answer_pos, big_t - 1)
  np.testing.assert_array_equal(ps.roles["query_final"], big_t - 1)
  queries = tasks.make_queries(task, "correct", ps.n_tried, SEED, ps.fmt)
  for row, ((clean, corrupt), (ans_c, ans_x)) in enumerate(zip(ps.prompts, ps.answers)):
    forced = ps.meta[row]["forced"]  # the answers' shared leading tokens, appended to both prompts
    ids_c, ids_x = tok(clean).input_ids + forced, tok(corrupt).input_ids + forced
    assert len(ids_c) == len(ids_x)
    off = big_t - len(ids_c)
    assert not ps.valid[row, :off].any() and ps.valid[row, off:].all()
    np.testing.assert_array_equal(ps.clean_ids[row, off:], ids_c)
    np.testing.assert_array_equal(ps.corrupt_ids[row, off:], ids_x)
    diff = np.nonzero(ps.clean_ids[row] != ps.corrupt_ids[row])[0]
    np.testing.assert_array_equal(ps.changed[row], diff)
    assert 1 <= len(diff) <= max_changed
    assert ps.roles["changed_first"][row] == diff[0] and ps.roles["changed_last"][row] == diff[-1]
    assert off <= ps.roles["query_first"][row] <= diff[0]
    # The clean prompt is the query stream's item with the keyed demos; the corrupt one shares all but the query.
    qi = int(ps.query_index[row])
    demos = tasks.make_demos(task, shots, SEED, qi, ps.fmt)
    assert clean == tasks.build_prompt(task, ps.fmt, demos, queries[qi])
    q_clean, q_corrupt = _split_query(task, clean), _split_query(task, corrupt)
    assert q_clean == queries[qi].question
    assert corrupt == tasks.build_prompt(task, ps.fmt, demos, dataclasses.replace(queries[qi], question=q_corrupt))
    # Header and demos are identical; the prompts first differ inside the query.
    start = clean.rindex(q_clean)
    assert corrupt[:start] == clean[:start]
    assert all(d.question in clean[:start] for d in demos) and len(demos) == shots
    assert len(q_clean) == len(q_corrupt) or task == "boolean"
    # Answers recomputed independently of the module.
    assert _answer(task, q_clean) == ans_c == queries[qi].answer
    assert _answer(task, q_corrupt) == ans_x != ans_c
    # Answer tokens: the continuations' first differing tokens, after the forced shared ones.
    lead = tasks.template(task, ps.fmt).lead(queries[qi])
    cont_c = continuation_ids(tok, clean, tok(clean).input_ids, lead + ans_c)
    cont_x = continuation_ids(tok, corrupt, tok(corrupt).input_ids, lead + ans_x)
    assert cont_c[:len(forced)] == cont_x[:len(forced)] == forced
    assert (ps.clean_answer[row], ps.corrupt_answer[row]) == (cont_c[len(forced)], cont_x[len(forced)])
    assert ps.clean_answer[row] != ps.corrupt_answer[row]
  assert sum(ps.dropped.values()) + len(ps) == ps.n_tried
  return queries


@pytest.mark.parametrize("shots", [0, 2])
def test_expression_pairs(byte_tok, shots):
  ps = pairs.build_pairs("expression", byte_tok, N, SEED, shots=shots, single_token=False)
  assert len(ps) == N
  _check_pairset(ps, "expression", byte_tok, shots)
  pat = re.compile(r"\((.+)\)\+\((.+)\)\*\((.+)\)=")
  for clean, corrupt in ps.prompts:
    (s, f, c), (s2, f2, c2) = pat.fullmatch(_split_query("expression", clean)).groups(), \
        pat.fullmatch(_split_query("expression", corrupt)).groups()
    assert (s, c) == (s2, c2) and eval(f) == 0 and eval(f2) != 0
    # Same length and sign layout; only the last term's digits change.
    assert len(f) == len(f2) and [ch for ch in f if not ch.isdigit()] == [ch for ch in f2 if not ch.isdigit()]
    head, head2 = re.split(r"[+-]\d+$", f)[0], re.split(r"[+-]\d+$", f2)[0]
    assert head == head2 and f != f2


@pytest.mark.parametrize("shots", [0, 2])
def test_parity_pairs(byte_tok, shots):
  ps = pairs.build_pairs("parity", byte_tok, N, SEED, shots=shots, single_token=False)
  assert len(ps) == N
  queries = _check_pairset(ps, "parity", byte_tok, shots)
  for (clean, corrupt), (a, b) in zip(ps.prompts, ps.answers):
    qc, qx = _split_query("parity", clean), _split_query("parity", corrupt)
    assert (a, b) == ("True", "False") and qc.count("\n") == 10
    assert qc.endswith(" is connected with Z\n") and qx[:-2] == qc[:-2]
    assert qx[-2] in "KLMNOPQRSTUVWXY" and qx[-2] not in qc
  # Every False item is dropped as such, nothing else is in this byte-level case.
  assert ps.dropped == {"clean_label_false": sum(q.answer == "False" for q in queries)}
  assert [q.answer for q in queries].count("True") == N


@pytest.mark.parametrize("shots", [0, 2])
def test_boolean_pairs(word_tok, shots):
  ps = pairs.build_pairs("boolean", word_tok, N, SEED, shots=shots)
  assert len(ps) == N
  queries = _check_pairset(ps, "boolean", word_tok, shots)
  for (clean, corrupt), m in zip(ps.prompts, ps.meta):
    qc, qx = _split_query("boolean", clean), _split_query("boolean", corrupt)
    assert (qc.endswith(") and False") and qx == qc[:-5] + "True") or \
        (qc.endswith(" or True") and qx == qc[:-4] + "False")
  # Label flips only when the inner expression has the absorbed value's opposite.
  tried = queries[:ps.n_tried]
  unchanged = sum(_answer("boolean", q.question) == _answer("boolean", re.sub(
      r"(and False|or True)$", lambda mm: {"and False": "and True", "or True": "or False"}[mm.group()], q.question))
      for q in tried)
  assert ps.dropped.get("answer_unchanged", 0) == unchanged > 0


def test_boolean_byte_level_drops_every_pair(byte_tok):
  # "True" and "False" differ by one byte: at byte level no swap keeps the length, so nothing survives.
  with pytest.raises(ValueError, match="no usable boolean pairs.*length_mismatch"):
    pairs.build_pairs("boolean", byte_tok, 3, SEED)


def test_boolean_needs_fixed_format(word_tok):
  with pytest.raises(ValueError, match="fmt='fixed'"):
    pairs.build_pairs("boolean", word_tok, 3, SEED, fmt="paper")


def test_paper_format_pairs(byte_tok):
  ps = pairs.build_pairs("expression", byte_tok, 4, SEED, fmt="paper", shots=1, single_token=False)
  assert len(ps) == 4 and ps.fmt == "paper"
  for qi, (clean, corrupt) in zip(ps.query_index, ps.prompts):
    demos = tasks.make_demos("expression", 1, SEED, int(qi), "paper")
    assert clean.startswith(tasks.build_prompt("expression", "paper", demos, demos[0])[:-len(demos[0].question)])
    assert " \n " in clean and " \n " in corrupt


def test_digit_merging_tokenizer_drops_length_changes():
  # Teens are single tokens: a last term 13 -> 27 (or 27 -> 13) changes the token count.
  tok = bpe_tokenizer([str(v) for v in range(10, 20)])
  ps = pairs.build_pairs("expression", tok, 20, SEED, single_token=False)
  assert ps.dropped.get("length_mismatch", 0) > 0
  assert sum(ps.dropped.values()) + len(ps) == ps.n_tried
  _check_pairset(ps, "expression", tok, 0)
  # The byte-level run of the same stream keeps some of the candidates this tokenizer dropped.
  byte = pairs.build_pairs("expression", build_byte_tokenizer(), 20, SEED, single_token=False)
  assert "length_mismatch" not in byte.dropped
  assert set(byte.query_index) - set(ps.query_index)


def test_too_many_changes_is_a_drop_reason(byte_tok):
  ps = pairs.build_pairs("expression", byte_tok, N, SEED, max_changed=1, single_token=False)
  assert ps.dropped.get("too_many_changes", 0) > 0
  assert all(len(c) == 1 for c in ps.changed)


def test_unsupported_tasks_list_supported(byte_tok):
  for task in ("algebra", "code", "nope"):
    with pytest.raises(ValueError, match="supported tasks: expression, parity, boolean"):
      pairs.build_pairs(task, byte_tok, 2, SEED)


def test_no_pairs_error_reports_drops(byte_tok):
  seed = next(s for s in range(50) if tasks.make_queries("parity", "correct", 1, s, "fixed")[0].answer == "False")
  with pytest.raises(ValueError, match=r"in 1 candidates; dropped: \{'clean_label_false': 1\}"):
    pairs.build_pairs("parity", byte_tok, 1, seed, max_tries=1)


def test_slices_batches_and_determinism(byte_tok):
  ps = pairs.build_pairs("parity", byte_tok, 5, SEED, shots=1, single_token=False)
  again = pairs.build_pairs("parity", byte_tok, 5, SEED, shots=1, single_token=False)
  np.testing.assert_array_equal(ps.clean_ids, again.clean_ids)
  assert ps.prompts == again.prompts
  parts = list(ps.batches(2))
  assert [len(p) for p in parts] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate([p.corrupt_ids for p in parts]), ps.corrupt_ids)
  np.testing.assert_array_equal(np.concatenate([p.roles["changed_first"] for p in parts]), ps.roles["changed_first"])
  assert sum((p.prompts for p in parts), []) == ps.prompts
  sub = ps.slice(1, 3)
  assert len(sub) == 2 and sub.length == ps.length and sub.changed[0].tolist() == ps.changed[1].tolist()
  summary = ps.summary()
  assert summary["n_pairs"] == 5 and summary["dropped"] == ps.dropped


def test_every_kept_answer_is_one_token_so_the_metric_measures_the_answer(smollm2_tokenizer):
  """Expression answers are numbers: with the real tokenizer, "-3" or "14" span several tokens, and a first-token
  logit difference would compare "-" with a digit (the sign, not the answer). Such pairs are dropped by name."""
  ps = pairs.build_pairs("expression", smollm2_tokenizer, 16, SEED, fmt="fixed")
  for (clean, corrupt), answers, meta in zip(ps.prompts, ps.answers, ps.meta):
    for prompt, answer in zip((clean, corrupt), answers):
      cont = continuation_ids(smollm2_tokenizer, prompt, smollm2_tokenizer(prompt).input_ids, answer)
      assert cont[:len(meta["forced"])] == meta["forced"] and len(cont) == len(meta["forced"]) + 1, answer
  assert any(m["forced"] for m in ps.meta)  # e.g. 12 vs 15: "1" forced, then "2" against "5"
  assert ps.dropped.get(pairs.MULTI_TOKEN_ANSWER, 0) > 0  # "-3" against "6": dropped
