"""Benchmarks: ``python -m icl_ft.bench SUBCOMMAND [--flags]``.

  forward   SmolLM2-135M forward (full logits), ours (JAX) vs transformers (PyTorch, sdpa), same inputs,
            same CPU, one process; tokens/s, GFLOP/s, MFU against the measured matmul ceiling, logits diff.
  icl       the release's 199-query k-shot cell: our engine vs transformers generate one query at a time
            (the release's method) vs transformers batched left-padded generate; queries/s, agreement, MFU.
            ``--sweep``: shots 0, 1, 2, 4, 8 with nested demos (50 items), each item's prompts packed in one row,
            vs our unpacked engine and transformers' batched generate of every prompt.
  patching  the full (layer, head) sweep on SmolLM2 pairs: our one-compile sweep vs the PyTorch hook loop (clean
            cache once, answer logits only) and the FLOP-matched batched hook method (each layer's heads as one
            batch from the cached residual), identical effects checked; attribution patching, top-k verified.
  train     full fine-tuning steps (AdamW, clip 1.0, float32, loss on every token; B=8 x T=128 unless --batch /
            --seq are given): our jitted, state-donating ``make_train_step`` vs a transformers + torch.optim.AdamW
            loop on the same packed FT-data batch, same CPU, one process; tokens/s, ratio, MFU, first-step losses.
  scaling   cost vs size: ICL per prompt length 64-2048 vs transformers batched generate; the patching sweep per
            sequence length and per number of layers vs the FLOP-matched batched hooks (random tokens, same on
            both sides).
  all       every one of them in turn (``icl`` with and without ``--sweep``); ``--json=bench.json`` writes their figures with the machine's name, cores,
            measured ceiling and package versions.

FLOPs convention: 2 x matmul params (incl. the LM head) per token, plus 4*T*D per layer per token for
attention (QK^T and PV, causal masking NOT halved); see ``icl_ft.flops``.
Both sides use the same threads (``--threads``, pinned and printed), are warmed up before timing and are timed
the same number of times (``--repeats``); times and ratios print as median [min, max] (a ratio's range pairs
one side's extremes with the other's).
Add a subcommand by writing ``def _name(argv) -> dict`` (its figures) and registering it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
import functools
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from icl_ft.model import flops

flags.DEFINE_string("model", "smollm2-135m", "Model to benchmark (forward: only the embedded GGUF has a torch reference).")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("seq", 512, "Sequence length.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (after one warm-up).")
flags.DEFINE_bool("torch", True, "Also time the transformers PyTorch reference.")
flags.DEFINE_string("task", "expression", "icl: task of the evaluation.")
flags.DEFINE_integer("shots", 8, "icl: demonstrations per prompt.")
flags.DEFINE_integer("queries", 199, "icl: number of queries (the release's 199; --sweep: 50 unless given).")
flags.DEFINE_bool("sweep", False, "icl: a whole shot sweep (0, 1, 2, 4, 8; --shots is not used) with nested demos, "
                  "each item's prompts packed in one row, vs transformers' batched generate of every prompt "
                  "(--batch: prompts per batch, 40 unless given).")
flags.DEFINE_integer("pairs", 4, "patching: clean/corrupted prompt pairs per batch.")
flags.DEFINE_integer("chunk", 16, "patching: patched runs evaluated together.")
flags.DEFINE_integer("threads", 0, "CPU threads for both sides (0: every core this process may use).")
flags.DEFINE_string("json", "", "Write every figure, with the machine, its ceiling and package versions, here.")
FLAGS = flags.FLAGS
_FLAG_NAMES = ("model", "batch", "seq", "repeats", "torch", "task", "shots", "queries", "sweep", "pairs", "chunk",
               "threads")


@dataclasses.dataclass(frozen=True)
class _Times:
  """Wall times of equal repeats of one method (after its warm-up): median and range."""
  runs: tuple[float, ...]

  @property
  def median(self) -> float:
    return statistics.median(self.runs)

  def __str__(self) -> str:
    if len(self.runs) == 1:
      return f"{self.median:.2f} (1 run)"
    return f"{self.median:.2f} [{min(self.runs):.2f}, {max(self.runs):.2f}]"

  def ratio(self, ours: "_Times") -> str:
    """self / ours at the medians, with the range that the two spreads allow (none from single runs)."""
    if self is ours:
      return "1"
    if len(self.runs) == 1 or len(ours.runs) == 1:
      return f"{self.median / ours.median:.2f}"
    return (f"{self.median / ours.median:.2f} [{min(self.runs) / max(ours.runs):.2f}, "
            f"{max(self.runs) / min(ours.runs):.2f}]")

  def figures(self) -> dict:
    return dict(median_s=self.median, min_s=min(self.runs), max_s=max(self.runs), runs=len(self.runs))


def _timed(fn: Callable[[], object], repeats: int) -> tuple[_Times, object]:
  """``repeats`` timed calls of an already warmed-up ``fn`` (the same count on both sides of a comparison):
  their times and the last call's result."""
  runs, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    runs.append(time.perf_counter() - t0)
  return _Times(tuple(runs)), out


def _rates(results: dict[str, _Times], tokens: int, total: float, ceiling: flops.Ceiling):
  """(name, "median s [range], tok/s, GFLOP/s, MFU" columns) per timed method."""
  for name, t in results.items():
    yield name, (f"{str(t):>22} {tokens / t.median:6.0f} {total / t.median / 1e9:7.1f} "
                 f"{total / t.median / 1e9 / ceiling.median:5.2f}")


def _torch_reference(name: str):
  """The transformers PyTorch model of the same checkpoint (GGUF or HF directory), float32, default attention."""
  import torch
  from transformers import AutoModelForCausalLM
  from icl_ft.io import loading
  path = loading.resolve(name)
  kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
  return AutoModelForCausalLM.from_pretrained(str(path.parent if kw else path), dtype=torch.float32, **kw).eval()


def _forward(argv):
  """Full-logits forward, ours vs transformers (sdpa), on the same random tokens.

  Long: one measurement read top to bottom (set up both sides on the same inputs, warm up, time, check
  agreement, print)."""
  del argv
  from icl_ft.io import loading
  from icl_ft.model.decoder import forward
  B, T, R = FLAGS.batch, FLAGS.seq, FLAGS.repeats

  ceiling = flops.matmul_ceiling()
  m = loading.load(FLAGS.model)
  cfg = m.config
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T), dtype=np.int32)
  tokens, valid = jnp.asarray(ids), jnp.ones((B, T), bool)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  total = flops.forward_flops_per_token(cfg, T) * B * T

  t0 = time.perf_counter()
  compiled = jax.jit(functools.partial(forward, cfg)).lower(m.params, tokens, positions, valid).compile()
  warmup = {"ours (JAX)": time.perf_counter() - t0}  # compile only
  run = lambda: compiled(m.params, tokens, positions, valid)[0].block_until_ready()
  ours_logits = np.asarray(run())
  results = {"ours (JAX)": _timed(run, R)[0]}

  diff, note = None, ""
  if FLAGS.torch:
    import torch
    ref = _torch_reference(FLAGS.model)
    x = torch.from_numpy(ids.astype(np.int64))
    with torch.inference_mode():
      t0 = time.perf_counter()
      ref_logits = ref(x).logits.numpy()
      warmup["torch (sdpa)"] = time.perf_counter() - t0  # first (eager) run
      results["torch (sdpa)"] = _timed(lambda: ref(x).logits, R)[0]
    diff = np.abs(ours_logits - ref_logits).max()
    note = f"torch: {torch.get_num_threads()} threads, attention {ref.config._attn_implementation}"

  print(f"\n== forward: {cfg.arch} {FLAGS.model}, B={B} T={T}, full logits, {total / 1e12:.3f} TFLOP/forward, "
        f"{os.cpu_count()} CPUs, {R} timed repeats ==")
  print("FLOPs = 2 x matmul params (incl. LM head) + 4*T*D per layer for attention (causal NOT halved)")
  print(f"matmul ceiling (jit f32 2048^2 @ 2048^2): best {ceiling.best:.1f}, median {ceiling.median:.1f} GFLOP/s;"
        f" MFU = median GFLOP/s / median ceiling")
  print(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}; {note}")
  print(f"{'':13} {'median s [min, max]':>22} {'tok/s':>6} {'GFLOP/s':>7} {'MFU':>5}  warm-up s (ours: compile)")
  for name, row in _rates(results, B * T, total, ceiling):
    print(f"{name:13} {row}  {warmup[name]:.1f}")
  ours = results["ours (JAX)"]
  if diff is not None:
    print(f"ratio ours/torch tokens/s: {results['torch (sdpa)'].ratio(ours)} (median [range]); max |logits ours - "
          f"torch| = {diff:.2e} (max |logit| {np.abs(ref_logits).max():.1f})")
  return dict(batch=B, seq=T, repeats=R, ceiling_gflops=ceiling.median, ours=ours.figures(),
              torch=results["torch (sdpa)"].figures() if diff is not None else None,
              ratio=results["torch (sdpa)"].median / ours.median if diff is not None else None,
              mfu=total / ours.median / 1e9 / ceiling.median, max_logit_diff=None if diff is None else float(diff))


def _hf_generators(ref, tok, prompt_ids, n_new: int):
  """transformers' greedy ``generate`` of ``n_new`` tokens two ways, each returning every prompt's decoded text
  (prompt included) in index order: one prompt at a time (the release's method), and batched left-padded."""
  import torch
  from icl_ft.io import loading
  pad, lengths = loading.pad_id(tok), [len(p) for p in prompt_ids]
  decode = lambda ids, out: tok.decode(list(ids) + out.tolist(), skip_special_tokens=True)

  def one_at_a_time(index):
    return [decode(prompt_ids[i], ref.generate(torch.tensor([prompt_ids[i]]), max_new_tokens=n_new, pad_token_id=pad,
                                               do_sample=False)[0, lengths[i]:]) for i in index]

  def batched(index, size):
    out = {}
    for s in range(0, len(index), size):
      rows = index[s:s + size]
      T = max(lengths[i] for i in rows)
      ids = torch.tensor([[pad] * (T - lengths[i]) + prompt_ids[i] for i in rows])
      mask = torch.tensor([[0] * (T - lengths[i]) + [1] * lengths[i] for i in rows])
      gen = ref.generate(ids, attention_mask=mask, max_new_tokens=n_new, pad_token_id=pad, do_sample=False)
      out.update({i: decode(prompt_ids[i], gen[r, T:]) for r, i in enumerate(rows)})
    return [out[i] for i in sorted(out)]

  return one_at_a_time, batched


def _best_batched(batched, order, repeats: int):
  """Batched ``generate`` at its best batch size of 8, 16 and 32 (warmed up at each, chosen on one run each),
  then timed ``repeats`` times: (times, outputs, best size, {size: chosen-on time})."""
  tried = {}
  for size in (8, 16, 32):
    batched(order[-size:], size)  # warm-up at this size
    t0 = time.perf_counter()
    batched(order, size)
    tried[size] = time.perf_counter() - t0
  best = min(tried, key=tried.get)
  times, out = _timed(lambda: batched(order, best), repeats)
  return times, out, best, tried


def _icl(argv):
  """The release's evaluation cell (199 queries, k-shot) three ways on the same prompts.

  Long: one measurement read top to bottom (set up both sides on the same inputs, warm up, time, check
  agreement, print); splitting it would scatter one experiment over several functions."""
  if FLAGS.sweep:
    return _icl_sweep()
  del argv
  import torch
  from icl_ft.evaluation import engine
  from icl_ft.io import loading
  ceiling = flops.matmul_ceiling()
  m = loading.load(FLAGS.model)
  tok = m.tokenizer
  queries = engine.icl_queries(FLAGS.task, "correct", "paper", FLAGS.shots, FLAGS.queries, seed=114514)
  n_new = queries[0].lenient_tokens
  queries = [dataclasses.replace(q, strict_tokens=n_new) for q in queries]  # the release decodes n_new only
  prompt_ids = tok([q.prompt for q in queries]).input_ids
  lengths = [len(p) for p in prompt_ids]
  settings = engine.EngineConfig(batch_size=FLAGS.batch, progress=False)
  per_token = lambda n: flops.forward_flops_per_token(m.config, n, head=False)
  useful = sum(per_token(n) * n for n in lengths)  # every prompt's prefill: what the one-at-a-time method does
  P = len(engine.shared_prefix(prompt_ids, settings.length_multiple))  # as the engine cuts it (one group here)
  executed = P * per_token(P) + sum(per_token(n) * (n - P) for n in lengths)  # the shared header once

  R = FLAGS.repeats
  engine.run(m, queries, settings)  # warm-up: compiles every length bucket
  t_ours, (records, _) = _timed(lambda: engine.run(m, queries, settings), R)
  ours = [r["lenient_text"] for r in records]

  ref = _torch_reference(FLAGS.model)
  order = sorted(range(len(prompt_ids)), key=lambda i: lengths[i])
  one_at_a_time, batched = _hf_generators(ref, tok, prompt_ids, n_new)
  with torch.inference_mode():
    one_at_a_time(order[:1])  # warm-up
    t_single, single = _timed(lambda: one_at_a_time(range(len(queries))), R)
    t_batched, batched_out, best, tried = _best_batched(batched, order, R)
  single = [t[len(q.prompt):] for t, q in zip(single, queries)]
  batched_out = [t[len(q.prompt):] for t, q in zip(batched_out, queries)]

  n = len(queries)
  print(f"\n== icl: {FLAGS.model}, {FLAGS.task} {FLAGS.shots}-shot, {n} queries, {n_new} new tokens, "
        f"prompt tokens mean {np.mean(lengths):.0f} (min {min(lengths)}, max {max(lengths)}), batch {FLAGS.batch} ==")
  print(f"matmul ceiling: median {ceiling.median:.1f} GFLOP/s; engine MFU = executed prefill FLOPs (the {P}-token "
        f"shared header once: {executed / 1e12:.2f} of the prompts' {useful / 1e12:.2f} TFLOP; no padding, no LM "
        f"head) / engine time / ceiling")
  print(f"torch: {torch.get_num_threads()} threads, inference_mode, attention {ref.config._attn_implementation}, "
        f"each method warmed up first; batched generate tried at batch " +
        ", ".join(f"{b}: {t:.1f} s" for b, t in tried.items()) + f" (one run each; best {best} kept)")
  print(f"{R} timed runs of each method after its warm-up; time and ratio: median [range]")
  print(f"{'':34} {'time s':>22} {'queries/s':>9} {'it vs ours':>18}  agreement with one-at-a-time")
  rows = (("ours (JAX engine, compiled)", t_ours, ours), ("transformers, one at a time", t_single, single),
          (f"transformers, batched left-pad {best}", t_batched, batched_out))
  for name, t, preds in rows:
    agree = "-" if preds is single else f"{sum(a == b for a, b in zip(preds, single)) / n:.3f}"
    print(f"{name:34} {str(t):>22} {n / t.median:9.2f} {t.ratio(t_ours):>18}  {agree}")
  rate = executed / t_ours.median / 1e9
  print(f"engine: {rate:.1f} GFLOP/s executed ({useful / t_ours.median / 1e9:.1f} effective), MFU "
        f"{rate / ceiling.median:.2f}; accuracy (lenient) {np.mean([r['correct_lenient'] for r in records]):.3f}")
  return dict(queries=n, shots=FLAGS.shots, ceiling_gflops=ceiling.median, ours=t_ours.figures(),
              one_at_a_time=t_single.figures(), batched=t_batched.figures(), batched_size=best,
              vs_one_at_a_time=t_single.median / t_ours.median, vs_batched=t_batched.median / t_ours.median,
              agreement=sum(a == b for a, b in zip(ours, single)) / n, shared_prefix=P,
              prefill_share_saved=1 - executed / useful, mfu=rate / ceiling.median)


def _icl_sweep():
  """A whole shot sweep (0, 1, 2, 4, 8 shots, nested demos) on the same prompts: our engine with each item's five
  prompts packed in one row, our engine with every prompt on its own row, and transformers' batched ``generate``
  of every prompt at its best batch size.

  Long: one measurement read top to bottom (same prompts on every side, warm up, time, check agreement, print)."""
  import torch
  from icl_ft.evaluation import decoding, engine
  from icl_ft.io import loading
  shots, R = (0, 1, 2, 4, 8), FLAGS.repeats
  n = FLAGS.queries if FLAGS["queries"].present else 50
  ceiling = flops.matmul_ceiling()
  m = loading.load(FLAGS.model)
  tok = m.tokenizer
  queries = engine.sweep_queries([FLAGS.task], ["correct"], ["paper"], shots, n, 114514, nested=True)
  n_new = queries[0].lenient_tokens
  queries = [dataclasses.replace(q, strict_tokens=n_new) for q in queries]  # the release decodes n_new only
  prompt_ids = tok([q.prompt for q in queries]).input_ids
  lengths = [len(p) for p in prompt_ids]
  prompts_per_batch = FLAGS.batch if FLAGS["batch"].present else 8 * len(shots)  # 8 packed rows
  packed = engine.EngineConfig(batch_size=prompts_per_batch, progress=False, pack_shots=True)
  alone = dataclasses.replace(packed, pack_shots=False)
  per_token = lambda t: flops.forward_flops_per_token(m.config, t, head=False)
  useful = sum(per_token(t) * t for t in lengths)  # every prompt's own prefill
  P = len(engine.shared_prefix(prompt_ids, packed.length_multiple))
  items = engine.packed_rows(queries, range(len(queries)), packed)
  widths = [decoding.packed_width([prompt_ids[i][P:] for i in row]) for row in items]
  executed = P * per_token(P) + sum(per_token(P + w) * w for w in widths)  # header once, then each packed row

  results = {}
  for name, settings in (("ours, each item's shots packed in one row", packed), ("ours, one prompt per row", alone)):
    engine.run(m, queries, settings)  # warm-up: compiles every bucket
    t, (records, _) = _timed(lambda: engine.run(m, queries, settings), R)
    results[name] = (t, [r["lenient_text"] for r in records])
  ref = _torch_reference(FLAGS.model)
  order = sorted(range(len(prompt_ids)), key=lambda i: lengths[i])
  _, batched = _hf_generators(ref, tok, prompt_ids, n_new)
  with torch.inference_mode():
    t_batched, batched_out, best, tried = _best_batched(batched, order, R)
  results[f"transformers, batched left-pad {best}"] = (t_batched, [t[len(q.prompt):] for t, q in
                                                                   zip(batched_out, queries)])

  t_ours, ours = next(iter(results.values()))
  print(f"\n== icl --sweep: {FLAGS.model}, {FLAGS.task} at shots {shots} (nested demos), {n} items = {len(queries)} "
        f"prompts, {n_new} new tokens, prompt tokens mean {np.mean(lengths):.0f} (max {max(lengths)}), "
        f"{prompts_per_batch} prompts per batch ==")
  print(f"matmul ceiling: median {ceiling.median:.1f} GFLOP/s; prompt prefill {executed / 1e12:.2f} TFLOP packed "
        f"of the prompts' {useful / 1e12:.2f} (the {P}-token header once, each item's shared demos once; candidates, "
        f"greedy tokens and padding not counted)")
  print(f"torch: {torch.get_num_threads()} threads, inference_mode, attention {ref.config._attn_implementation}; "
        f"batched generate tried at batch " + ", ".join(f"{b}: {t:.1f} s" for b, t in tried.items()) +
        f" (best {best} kept); {R} timed runs each after a warm-up; time and ratio: median [range]")
  print(f"{'':42} {'time s':>22} {'prompts/s':>9} {'it vs packed':>18}  agreement with transformers")
  reference = results[f"transformers, batched left-pad {best}"][1]
  for name, (t, preds) in results.items():
    agree = "-" if preds is reference else f"{sum(a == b for a, b in zip(preds, reference)) / len(queries):.3f}"
    print(f"{name:42} {str(t):>22} {len(queries) / t.median:9.2f} {t.ratio(t_ours):>18}  {agree}")
  rate = executed / t_ours.median / 1e9
  print(f"packed engine: {rate:.1f} GFLOP/s of deduplicated prompt prefill ({useful / t_ours.median / 1e9:.1f} "
        f"effective), MFU on it {rate / ceiling.median:.2f} (a lower bound: candidates, decoding, padding not counted)")
  return dict(items=n, shots=shots, prompts=len(queries), ceiling_gflops=ceiling.median,
              times={k: t.figures() for k, (t, _) in results.items()}, batched_size=best,
              vs_batched=t_batched.median / t_ours.median,
              vs_unpacked=list(results.values())[1][0].median / t_ours.median,
              agreement=sum(a == b for a, b in zip(ours, reference)) / len(queries),
              prefill_share_saved=1 - executed / useful, mfu=rate / ceiling.median)


def _train(argv):
  """Training steps on the embedded model: ours (jit, donated state) vs a PyTorch AdamW loop, same batch.

  Long: one measurement read top to bottom (set up both sides on the same inputs, warm up, time, check
  agreement, print); splitting it would scatter one experiment over several functions."""
  del argv
  import torch
  from icl_ft.training import dataset
  from icl_ft.io import loading
  from icl_ft.training import trainer
  B = FLAGS.batch
  T = FLAGS.seq if FLAGS["seq"].present else 128
  R = FLAGS.repeats if FLAGS["repeats"].present else 5
  tcfg = trainer.TrainConfig(steps=R + 1, batch_size=B, lr=1e-5, warmup_steps=0, weight_decay=0.01, clip_norm=1.0,
                              compute_dtype="float32", remat=False)

  ceiling = flops.matmul_ceiling()
  m = loading.load(FLAGS.model)
  cfg = m.config
  # Real token ids: the study's FT examples (all four tasks), concatenated and packed into B rows of T tokens.
  ds = dataset.build(dataset.FTDataConfig(n_per_task=max(8, B * T // 100)), m.tokenizer)
  stream = np.concatenate([np.asarray(s, np.int32) for s in ds.ids])
  if stream.size < B * T:
    stream = np.resize(stream, B * T)
  ids = stream[:B * T].reshape(B, T)
  batch = {"ids": ids[None], "valid": np.ones((1, B, T), bool), "loss_mask": np.ones((1, B, T - 1), bool),
           "loss_at": np.broadcast_to(np.arange(T - 1, dtype=np.int32), (1, B, T - 1))}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  total = B * T * flops.train_flops_per_token(cfg, T)

  opt = trainer.optimizer(tcfg)
  params = jax.jit(lambda t: jax.tree.map(lambda p: jnp.copy(p.astype(jnp.float32)), t))(m.params)
  state = {"params": params, "opt": jax.jit(opt.init)(params), "step": jnp.zeros((), jnp.int32)}
  t0 = time.perf_counter()
  step = jax.jit(trainer.make_train_step(cfg, tcfg, opt), donate_argnums=0).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, metrics = jax.block_until_ready(step(state, batch))
  warmup = {"ours (JAX)": time.perf_counter() - t0}
  losses = {"ours (JAX)": float(metrics["loss"])}

  def ours():
    nonlocal state
    state, out = step(state, batch)
    jax.block_until_ready((state, out))

  results = {"ours (JAX)": _timed(ours, R)[0]}
  del state, params

  note = ""
  if FLAGS.torch:
    ref = _torch_reference(FLAGS.model).train()
    opt_t = torch.optim.AdamW(ref.parameters(), lr=tcfg.lr, betas=(tcfg.b1, tcfg.b2), eps=tcfg.eps,
                              weight_decay=tcfg.weight_decay)
    x = torch.from_numpy(ids.astype(np.int64))

    def theirs():
      opt_t.zero_grad(set_to_none=True)
      loss = ref(x, labels=x).loss  # mean CE over the B*(T-1) next tokens
      loss.backward()
      torch.nn.utils.clip_grad_norm_(ref.parameters(), tcfg.clip_norm)
      opt_t.step()
      return float(loss.detach())

    t0 = time.perf_counter()
    losses["torch (eager)"] = theirs()
    warmup["torch (eager)"] = time.perf_counter() - t0
    results["torch (eager)"] = _timed(theirs, R)[0]
    note = f"torch: {torch.get_num_threads()} threads, attention {ref.config._attn_implementation}"

  print(f"\n== train: {cfg.arch} {FLAGS.model}, B={B} T={T}, full FT, AdamW + clip 1.0, float32, loss on all "
        f"{B * (T - 1)} next tokens, {total / 1e12:.3f} TFLOP/step, {os.cpu_count()} CPUs, {R} timed steps ==")
  print("FLOPs/step = B*T * 3 x forward; forward = 2 x matmul params (incl. LM head) + attention 4*T*D per layer "
        "halved for causal (flops.train_flops_per_token)")
  print(f"matmul ceiling (jit f32 2048^2 @ 2048^2): best {ceiling.best:.1f}, median {ceiling.median:.1f} GFLOP/s;"
        f" MFU = FLOPs/step / median step time / median ceiling")
  print(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}; ours: compile {compile_s:.1f} s; {note}")
  print(f"{'':14} {'median s [min, max]':>22} {'tok/s':>6} {'GFLOP/s':>7} {'MFU':>5} {'step-1 loss':>11}  first step s")
  for name, row in _rates(results, B * T, total, ceiling):
    print(f"{name:14} {row} {losses[name]:11.5f}  {warmup[name]:.1f}")
  ours_t, theirs_t = results["ours (JAX)"], results.get("torch (eager)")
  if theirs_t:
    print(f"ratio ours/torch tokens/s: {theirs_t.ratio(ours_t)} (median [range])")
  return dict(batch=B, seq=T, repeats=R, ceiling_gflops=ceiling.median, ours=ours_t.figures(),
              torch=theirs_t.figures() if theirs_t else None,
              ratio=theirs_t.median / ours_t.median if theirs_t else None,
              mfu=total / ours_t.median / 1e9 / ceiling.median, losses=losses)


def _clean_o_proj_inputs(ref, ids, mask):
  """Every layer's attention output before o_proj (the per-head z, [N, T, H*dh]) of one clean run."""
  import torch
  store, hooks = {}, []
  for i, layer in enumerate(ref.model.layers):
    hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, i=i: store.__setitem__(i, args[0].clone())))
  with torch.inference_mode():
    ref(ids, attention_mask=mask, logits_to_keep=1)
  for h in hooks:
    h.remove()
  return store


def _patch_hook(z_clean, dh: int, heads_of_rows):
  """o_proj pre-hook replacing, in row r, head ``heads_of_rows[r]``'s slice of z by the clean run's."""
  def hook(mod, args):
    z = args[0].clone()
    for r, head in enumerate(heads_of_rows):
      z[r, :, head * dh:(head + 1) * dh] = z_clean[r % len(z_clean), :, head * dh:(head + 1) * dh]
    return (z,)
  return hook


def _pair_tensors(p):
  import torch
  return (torch.tensor(p.clean_ids, dtype=torch.long), torch.tensor(p.corrupt_ids, dtype=torch.long),
          torch.tensor(p.valid.astype(np.int64)))


def _hooks_plain(ref, p, dh: int, grid) -> dict:
  """The plain hook loop, as its best user writes it: the clean run once, then per (layer, head) one corrupted
  forward with that head's z patched, logits at the answer position only (``logits_to_keep=1``)."""
  import torch
  clean, corrupt, mask = _pair_tensors(p)
  z = _clean_o_proj_inputs(ref, clean, mask)
  rows, out = np.arange(len(p)), {}
  with torch.inference_mode():
    for layer, head in grid:
      h = ref.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
          _patch_hook(z[layer], dh, [head] * len(p)))
      logits = ref(corrupt, attention_mask=mask, logits_to_keep=1).logits[:, -1].numpy()
      h.remove()
      out[layer, head] = logits[rows, p.clean_answer] - logits[rows, p.corrupt_answer]
  return out


_BATCHED_HOOK_LAYOUTS = ("llama", "qwen2", "mistral")  # one RoPE and one causal mask for every layer


def _hooks_batched(ref, p, dh: int, grid) -> dict:
  """The FLOP-matched batched hook method (TransformerLens' ``start_at_layer`` pattern): the clean and corrupted
  caches once; per layer, the corrupted residual at that layer repeated once per head in one batch, each row
  patching its head, run through the remaining layers, logits at the answer position only. Llama layout."""
  import torch
  from transformers.masking_utils import create_causal_mask
  clean, corrupt, mask = _pair_tensors(p)
  z = _clean_o_proj_inputs(ref, clean, mask)
  N, T, out = len(p), p.length, {}
  with torch.inference_mode():
    resid = ref.model(corrupt, attention_mask=mask, output_hidden_states=True).hidden_states  # [l]: layer l's input
    for layer in sorted({l for l, _ in grid}):
      heads = [h for l, h in grid if l == layer]
      x = resid[layer].repeat(len(heads), 1, 1)
      m2 = mask.repeat(len(heads), 1)
      pos = torch.arange(T).unsqueeze(0).expand(len(x), T)
      causal = create_causal_mask(config=ref.config, inputs_embeds=x, attention_mask=m2, cache=None, position_ids=pos)
      pe = ref.model.rotary_emb(x, position_ids=pos)
      hook = ref.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
          _patch_hook(z[layer], dh, [h for h in heads for _ in range(N)]))
      for block in ref.model.layers[layer:]:
        x = block(x, attention_mask=causal, position_embeddings=pe, position_ids=pos)
      hook.remove()
      logits = ref.lm_head(ref.model.norm(x[:, -1])).numpy().reshape(len(heads), N, -1)
      for i, h in enumerate(heads):
        out[layer, h] = logits[i, np.arange(N), p.clean_answer] - logits[i, np.arange(N), p.corrupt_answer]
  return out


def _patching(argv):
  """Full (layer, head) sweep: our one-compile sweep vs two PyTorch references (the plain hook loop and the
  FLOP-matched batched hooks), plus attribution patching.

  Long: one measurement read top to bottom (set up both sides on the same inputs, warm up, time, check
  agreement, print); splitting it would scatter one experiment over several functions."""
  del argv
  import torch
  from icl_ft.io import loading
  from icl_ft.interp import pairs
  from icl_ft.interp import patching
  ceiling = flops.matmul_ceiling()
  m = loading.load(FLAGS.model)
  cfg = m.config
  p = pairs.build_pairs(FLAGS.task, m.tokenizer, FLAGS.pairs, seed=0, fmt="fixed")
  mk = lambda ids: patching.Batch(jnp.asarray(ids), jnp.asarray(p.valid), jnp.asarray(p.answer_pos),
                                  jnp.asarray(p.clean_answer), jnp.asarray(p.corrupt_answer))
  clean, corrupt = mk(p.clean_ids), mk(p.corrupt_ids)
  L, H, dh, N, T = cfg.num_layers, cfg.num_heads, cfg.head_dim, len(p), p.length
  runs = L * H

  def ours():
    _, cache = patching.capture(cfg, m.params, clean, taps=("attn_z",))
    return np.asarray(patching.patch_sweep(cfg, m.params, corrupt, cache, "attn_z", ("layer", "head"), FLAGS.chunk))

  def atp():
    _, cache = patching.capture(cfg, m.params, clean, taps=("attn_z",))
    g = patching.attribution_patch(cfg, m.params, corrupt, cache, ("attn_z",))["attn_z"]
    return np.asarray(g.sum(axis=(2, 4)))  # [L, N, H]: per head, all positions

  R = FLAGS.repeats
  t0 = time.perf_counter()
  ours()
  atp()
  compile_s = time.perf_counter() - t0
  t_ours, swept = _timed(ours, R)
  t_atp, est = _timed(atp, R)

  ref = _torch_reference(FLAGS.model)
  grid = [(l, h) for l in range(L) for h in range(H)]
  methods = {"torch hook loop (clean cache once, answer logits)": _hooks_plain}
  if ref.config.model_type in _BATCHED_HOOK_LAYOUTS:
    methods["torch batched hooks from layer l (FLOP-matched)"] = _hooks_batched
  else:
    print(f"(no FLOP-matched batched hooks for {ref.config.model_type}: written for {_BATCHED_HOOK_LAYOUTS})")
  refs = {}  # name -> (times, effects {(layer, head): [N]}); each warmed up on one full layer first
  for name, method in methods.items():
    method(ref, p, dh, [(0, h) for h in range(H)])
    refs[name] = _timed(lambda: method(ref, p, dh, grid), R)
  exact = next(iter(refs.values()))[1]
  diff = max(np.abs(swept[l, h] - exact[l, h]).max() for l, h in grid)
  agree = max(np.abs(b[l, h] - exact[l, h]).max() for _, b in refs.values() for l, h in grid)
  if max(diff, agree) > 1e-3:
    raise RuntimeError(f"the effects disagree (ours vs hooks {diff:.1e}, references {agree:.1e}): no timing is "
                       "reported for methods that compute different things")
  # AtP's top-k heads (by |mean estimated effect|), verified exactly.
  k = 10
  base = np.asarray(patching.capture(cfg, m.params, corrupt)[0])
  est_mean = est.mean(axis=1)
  true_mean = np.array([[np.mean(exact[l, h] - base) for h in range(H)] for l in range(L)])
  from icl_ft.stats import shifts
  top = shifts.ranked(est_mean, k)
  rho = shifts.spearman(est_mean, true_mean)
  # FLOPs actually executed by our sweep: each patched run does layers l..L-1 on N*T tokens (+ the head at
  # one position), plus the capture passes.
  per_tok_layer = (flops.forward_flops_per_token(cfg, T, head=False)) / L
  done = sum(H * (L - l) for l in range(L)) * N * T * per_tok_layer + 2 * N * T * per_tok_layer * L
  print(f"\n== patching: {FLAGS.model}, {FLAGS.task} pairs (fixed), N={N} pairs x T={T} tokens, "
        f"{runs} (layer, head) patched runs, chunk {FLAGS.chunk} ==")
  print(f"matmul ceiling median {ceiling.median:.1f} GFLOP/s; our compile {compile_s:.1f}s (sweep + AtP)")
  print(f"torch: {torch.get_num_threads()} threads, inference_mode, attention {ref.config._attn_implementation}; "
        f"the references agree within {agree:.1e}")
  t_plain = next(iter(refs.values()))[0]
  t_batched = list(refs.values())[-1][0] if len(refs) > 1 else None
  print(f"{R} timed runs of each method after its warm-up; time and ratio: median [range]")
  print(f"{'':50} {'time s':>22} {'runs/s':>7} {'hook loop / it':>18}")
  for name, t in [(n, t) for n, (t, _) in refs.items()] + [("ours: one-compile exact sweep", t_ours),
                                                           ("ours: attribution patching (all l,h,pos)", t_atp)]:
    print(f"{name:50} {str(t):>22} {runs / t.median:7.1f} {t_plain.ratio(t):>18}")
  rate = done / t_ours.median / 1e9
  print(f"ours vs the FLOP-matched batched hooks: {t_batched.ratio(t_ours) if t_batched else 'n/a'}; max |effect "
        f"ours - hooks| {diff:.1e}; ours {rate:.1f} GFLOP/s executed, MFU {rate / ceiling.median:.2f}")
  print(f"attribution patching: Spearman vs exact {rho:.3f}; top-{k} overlap "
        f"{shifts.topk_recall(est_mean, true_mean, k):.2f}")
  print("AtP top-k verified exactly (layer, head, AtP estimate, exact effect):")
  for i in top:
    print(f"  L{i // H:02d}H{i % H}  {est_mean.ravel()[i]:+.4f}  {true_mean.ravel()[i]:+.4f}")
  return dict(pairs=N, seq=T, runs=runs, ceiling_gflops=ceiling.median, ours=t_ours.figures(),
              hook_loop=t_plain.figures(), batched_hooks=t_batched.figures() if t_batched else None,
              attribution=t_atp.figures(), vs_hook_loop=t_plain.median / t_ours.median,
              vs_batched_hooks=t_batched.median / t_ours.median if t_batched else None,
              attribution_vs_hook_loop=t_plain.median / t_atp.median, max_effect_diff=float(diff),
              spearman=float(rho), mfu=rate / ceiling.median)


def _scaling(argv):
  """How cost grows, each point against its reference on the same random tokens: ICL (batch of ``--batch``
  prompts, prefill with gold/foil scoring + 3 greedy tokens) vs transformers' batched ``generate`` per prompt
  length; the (layer, head) patching sweep vs the FLOP-matched batched hooks per sequence length and per number
  of layers (the model's first L; the sweep's runs grow with layers x heads).

  Long: measurement loops read top to bottom (same inputs on both sides, warm-up, time, print)."""
  del argv
  import torch
  from icl_ft.evaluation.decoding import generate_and_score, pack
  from icl_ft.io import loading
  ceiling = flops.matmul_ceiling()
  m = loading.load(FLAGS.model)
  cfg, B, rng = m.config, FLAGS.batch, np.random.default_rng(0)
  ref = _torch_reference(FLAGS.model)

  def timed(fn):
    fn()  # warm-up (ours: compiles)
    return _timed(fn, FLAGS.repeats)[0]

  icl_rows, patch_rows = [], []
  print(f"\n== scaling: {FLAGS.model}, {torch.get_num_threads()} threads, ceiling median {ceiling.median:.1f} GFLOP/s; "
        f"{FLAGS.repeats} timed runs a side after a warm-up; times and ratios: median [range] ==")
  print(f"ICL, batch {B}, 3 new tokens:  {'T':>5} {'ours s/query':>12} {'torch s/query':>13} {'torch / ours':>18} "
        f"{'MFU':>5}")
  for T in (64, 128, 256, 512, 1024, 2048):
    ids = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32)
    packed = jax.tree.map(jnp.asarray, pack([[list(row)] for row in ids], T, 0, 2))
    ans = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 1, 2, 2), dtype=np.int32))
    ours = lambda: jax.block_until_ready(generate_and_score(cfg, m.params, packed, ans, jnp.ones(ans.shape, bool), 3))
    with torch.inference_mode():
      theirs = lambda: ref.generate(torch.from_numpy(ids.astype(np.int64)), max_new_tokens=3, min_new_tokens=3,
                                    do_sample=False, pad_token_id=0)
      t_ours, t_ref = timed(ours), timed(theirs)
    mfu = B * T * flops.forward_flops_per_token(cfg, T, head=False, causal=True) / t_ours.median / 1e9 / ceiling.median
    icl_rows.append(dict(tokens=T, ours=t_ours.figures(), torch=t_ref.figures(), per_query=B,
                         ratio=t_ref.median / t_ours.median, mfu=mfu))
    print(f"{'':30} {T:5d} {t_ours.median / B:12.4f} {t_ref.median / B:13.4f} {t_ref.ratio(t_ours):>18} {mfu:5.2f}")
  print(f"patching, {FLAGS.pairs} pairs, every (layer, head): {'T':>5} {'ours s':>7} {'batched hooks s':>15} "
        f"{'hooks / ours':>18}")
  for T in (32, 64, 128):
    patch_rows.append(_patching_point(m, ref, T, cfg.num_layers, rng, timed))
  print(f"patching, {FLAGS.pairs} pairs x 64 tokens, the first L layers: {'L':>3} {'runs':>5} {'ours s':>7} "
        f"{'batched hooks s':>15} {'hooks / ours':>18}")
  layer_rows = [_patching_point(m, ref, 64, L, rng, timed) for L in (8, 15, 23) if L < cfg.num_layers]
  return dict(ceiling_gflops=ceiling.median, icl=icl_rows, patching=patch_rows, patching_layers=layer_rows)


def _patching_point(m, ref, T: int, L: int, rng, timed) -> dict:
  """One point of the patching scaling: the (layer, head) sweep of the model's first ``L`` layers on ``--pairs``
  random pairs of ``T`` tokens, ours vs the FLOP-matched batched hooks on the same truncated torch model."""
  import torch
  from icl_ft.interp import patching
  N, full = FLAGS.pairs, m.config.num_layers
  cfg = dataclasses.replace(m.config, num_layers=L)
  params = dict(m.params, layers=jax.tree.map(lambda x: x[:L], m.params["layers"]))
  clean = rng.integers(0, cfg.vocab_size, (N, T), dtype=np.int32)
  corrupt = clean.copy()
  corrupt[:, T // 2] = (clean[:, T // 2] + 1) % cfg.vocab_size
  gold, foil = (rng.integers(0, cfg.vocab_size, N).astype(np.int32) for _ in range(2))
  mk = lambda x: patching.Batch(jnp.asarray(x), jnp.ones((N, T), bool), jnp.full((N,), T - 1), jnp.asarray(gold),
                                jnp.asarray(foil))

  def ours():
    _, cache = patching.capture(cfg, params, mk(clean), taps=("attn_z",))
    return jax.block_until_ready(patching.patch_sweep(cfg, params, mk(corrupt), cache, "attn_z", ("layer", "head"),
                                                      FLAGS.chunk))

  pairs_t = _RandomPairs(clean, corrupt, np.ones((N, T), bool), gold, foil, T)
  grid = [(l, h) for l in range(L) for h in range(cfg.num_heads)]
  layers = ref.model.layers
  ref.model.layers, ref.config.num_hidden_layers = torch.nn.ModuleList(list(layers)[:L]), L
  try:
    t_ours = timed(ours)
    _hooks_batched(ref, pairs_t, cfg.head_dim, grid[:cfg.num_heads])  # warm-up: one layer
    t_ref = _timed(lambda: _hooks_batched(ref, pairs_t, cfg.head_dim, grid), FLAGS.repeats)[0]
  finally:
    ref.model.layers, ref.config.num_hidden_layers = layers, full
  lead = f"{'':40} {T:5d}" if L == full else f"{'':45} {L:3d} {len(grid):5d}"
  print(f"{lead} {t_ours.median:7.2f} {t_ref.median:15.2f} {t_ref.ratio(t_ours):>18}")
  return dict(tokens=T, layers=L, runs=len(grid), ours=t_ours.figures(), batched_hooks=t_ref.figures(),
              ratio=t_ref.median / t_ours.median)


@dataclasses.dataclass
class _RandomPairs:
  """Clean/corrupt token pairs shaped as ``interp.pairs.Pairs`` for the hook references."""
  clean_ids: np.ndarray
  corrupt_ids: np.ndarray
  valid: np.ndarray
  clean_answer: np.ndarray
  corrupt_answer: np.ndarray
  length: int

  def __len__(self) -> int:
    return len(self.clean_ids)


SUBCOMMANDS: dict[str, Callable] = {"forward": _forward, "icl": _icl, "train": _train, "patching": _patching,
                                   "scaling": _scaling}


def _pin_threads() -> int:
  """The same CPU threads on both sides: this process pinned to ``--threads`` cores (XLA sizes its thread pool from
  the affinity mask) and ``torch.set_num_threads`` to as many (when torch is installed). Before anything
  initialises JAX's backend. Where the OS has no affinity call, every core, unpinned."""
  if not hasattr(os, "sched_setaffinity"):
    return os.cpu_count() or 1
  cores = sorted(os.sched_getaffinity(0))
  n = FLAGS.threads or len(cores)
  if n > len(cores):
    raise app.UsageError(f"--threads={n}: this process may use {len(cores)} cores")
  os.sched_setaffinity(0, cores[:n])
  try:
    import torch
    torch.set_num_threads(n)
  except ImportError:  # the references need torch; --torch=false runs without it
    pass
  return n


def _machine(threads: int) -> dict:
  """What a figure was measured on, so figures from two machines can be compared."""
  import platform
  from icl_ft.report import tables
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
  ceiling = flops.matmul_ceiling()
  try:
    import torch
    versions = dict(tables.package_versions(), torch=torch.__version__)
  except ImportError:
    versions = tables.package_versions()
  return dict(host=platform.node(), cpu=cpu, cores=os.cpu_count(), threads=threads, device=str(jax.devices()[0]),
              ceiling_gflops=dict(best=ceiling.best, median=ceiling.median), packages=versions)


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # quiet Orbax's INFO lines
  if len(argv) != 2 or argv[1] not in (*SUBCOMMANDS, "all"):
    raise app.UsageError(f"usage: python -m icl_ft.bench {{{','.join(SUBCOMMANDS)},all}} [--flags]")
  threads = _pin_threads()
  print(f"{threads} CPU threads on both sides (affinity mask for XLA, torch.set_num_threads({threads}))")
  jobs = {argv[1]: SUBCOMMANDS[argv[1]]} if argv[1] != "all" else \
      dict(forward=_forward, icl=_icl, icl_sweep=lambda _: _icl_sweep(), **{k: v for k, v in SUBCOMMANDS.items()
                                                                          if k not in ("forward", "icl")})
  machine = _machine(threads) if FLAGS.json else None
  figures = {}
  for name, job in jobs.items():  # the file is rewritten after each, so a later failure keeps the earlier figures
    figures[name] = job(argv[2:])
    if FLAGS.json:
      from icl_ft.io import files
      files.write_json(FLAGS.json, dict(machine=machine, flags={k: FLAGS[k].value for k in _FLAG_NAMES},
                                        figures=figures))
  if FLAGS.json:
    print(f"figures: {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
