"""Benchmarks: ``python -m icl_ft.bench SUBCOMMAND [--flags]``.

  forward   SmolLM2-135M forward (full logits), ours (JAX) vs transformers (PyTorch, sdpa), same inputs,
            same CPU, one process; tokens/s, GFLOP/s, MFU against the measured matmul ceiling, logits diff.
  icl       the release's 199-query k-shot cell: our engine vs transformers generate one query at a time
            (the release's method) vs transformers batched left-padded generate; queries/s, agreement, MFU.

FLOPs convention: 2 x matmul params (incl. the LM head) per token, plus 4*T*D per layer per token for
attention (QK^T and PV, causal masking NOT halved); see ``icl_ft.flops``.
Add a subcommand by writing ``def _name(argv)`` and registering it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from icl_ft import flops

flags.DEFINE_string("model", "smollm2-135m", "Model to benchmark (forward: only the embedded GGUF has a torch reference).")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("seq", 512, "Sequence length.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (after one warm-up).")
flags.DEFINE_bool("torch", True, "Also time the transformers PyTorch reference.")
flags.DEFINE_string("task", "expression", "icl: task of the evaluation.")
flags.DEFINE_integer("shots", 8, "icl: demonstrations per prompt.")
flags.DEFINE_integer("queries", 199, "icl: number of queries (the release's 199).")
FLAGS = flags.FLAGS


def _torch_reference(name: str):
  """The transformers PyTorch model of the same checkpoint (GGUF or HF directory), float32, default attention."""
  import torch
  from transformers import AutoModelForCausalLM
  from icl_ft import loading
  path = loading.resolve(name)
  kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
  return AutoModelForCausalLM.from_pretrained(str(path.parent if kw else path), dtype=torch.float32, **kw).eval()


def _forward(argv):
  del argv
  from icl_ft import loading
  from icl_ft.model import forward
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
  results = {"ours (JAX)": flops.timeit(run, R)}

  diff, note = None, ""
  if FLAGS.torch:
    import torch
    ref = _torch_reference(FLAGS.model)
    x = torch.from_numpy(ids.astype(np.int64))
    with torch.inference_mode():
      t0 = time.perf_counter()
      ref_logits = ref(x).logits.numpy()
      warmup["torch (sdpa)"] = time.perf_counter() - t0  # first (eager) run
      results["torch (sdpa)"] = flops.timeit(lambda: ref(x).logits, R)
    diff = np.abs(ours_logits - ref_logits).max()
    note = f"torch: {torch.get_num_threads()} threads, attention {ref.config._attn_implementation}"

  print(f"\n== forward: {cfg.arch} {FLAGS.model}, B={B} T={T}, full logits, {total / 1e12:.3f} TFLOP/forward, "
        f"{os.cpu_count()} CPUs, {R} timed repeats ==")
  print("FLOPs = 2 x matmul params (incl. LM head) + 4*T*D per layer for attention (causal NOT halved)")
  print(f"matmul ceiling (jit f32 2048^2 @ 2048^2): best {ceiling.best:.1f}, median {ceiling.median:.1f} GFLOP/s;"
        f" MFU = median GFLOP/s / median ceiling")
  print(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}; {note}")
  print(f"{'':13} {'median s':>8} {'best s':>7} {'tok/s':>6} {'GFLOP/s':>7} {'MFU':>5}  warm-up s (ours: compile)")
  for name, times in results.items():
    med = statistics.median(times)
    print(f"{name:13} {med:8.2f} {min(times):7.2f} {B * T / med:6.0f} {total / med / 1e9:7.1f} "
          f"{total / med / 1e9 / ceiling.median:5.2f}  {warmup[name]:.1f}")
  if diff is not None:
    ours, theirs = (statistics.median(t) for t in results.values())
    print(f"ratio ours/torch tokens/s: {theirs / ours:.2f}; max |logits ours - torch| = {diff:.2e} "
          f"(max |logit| {np.abs(ref_logits).max():.1f})")


def _icl(argv):
  """The release's evaluation cell (199 queries, k-shot) three ways on the same prompts."""
  del argv
  import torch
  from icl_ft import icl, loading
  ceiling = flops.matmul_ceiling()
  m = loading.load(FLAGS.model)
  tok = m.tokenizer
  queries = icl.icl_queries(FLAGS.task, "correct", "paper", FLAGS.shots, FLAGS.queries, seed=114514)
  n_new = queries[0].lenient_tokens
  prompt_ids = tok([q.prompt for q in queries]).input_ids
  lengths = [len(p) for p in prompt_ids]
  useful = sum(flops.forward_flops_per_token(m.config, n, head=False) * n for n in lengths)
  engine = icl.EngineConfig(batch_size=FLAGS.batch, strict_tokens=n_new, progress=False)

  icl.run(m, queries, engine)  # compile every length bucket
  t0 = time.perf_counter()
  records, _ = icl.run(m, queries, engine)
  t_ours = time.perf_counter() - t0
  ours = [r["lenient_text"] for r in records]

  ref = _torch_reference(FLAGS.model)
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  decode = lambda ids, out: tok.decode(list(ids) + out.tolist(), skip_special_tokens=True)
  with torch.inference_mode():
    t0 = time.perf_counter()
    single = []
    for ids in prompt_ids:  # the release's method: one query at a time
      out = ref.generate(torch.tensor([ids]), max_new_tokens=n_new, pad_token_id=pad, do_sample=False)[0, len(ids):]
      single.append(decode(ids, out))
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = []
    order = sorted(range(len(prompt_ids)), key=lambda i: lengths[i])
    for s in range(0, len(order), FLAGS.batch):
      rows = order[s:s + FLAGS.batch]
      T = max(lengths[i] for i in rows)
      ids = torch.tensor([[pad] * (T - lengths[i]) + prompt_ids[i] for i in rows])
      mask = torch.tensor([[0] * (T - lengths[i]) + [1] * lengths[i] for i in rows])
      out = ref.generate(ids, attention_mask=mask, max_new_tokens=n_new, pad_token_id=pad, do_sample=False)
      for r, i in enumerate(rows):
        batched.append((i, decode(prompt_ids[i], out[r, T:])))
    t_batched = time.perf_counter() - t0
  batched = [text for _, text in sorted(batched)]
  single = [t[len(q.prompt):] for t, q in zip(single, queries)]
  batched = [t[len(q.prompt):] for t, q in zip(batched, queries)]

  n = len(queries)
  print(f"\n== icl: {FLAGS.model}, {FLAGS.task} {FLAGS.shots}-shot, {n} queries, {n_new} new tokens, "
        f"prompt tokens mean {np.mean(lengths):.0f} (min {min(lengths)}, max {max(lengths)}), batch {FLAGS.batch} ==")
  print(f"matmul ceiling: median {ceiling.median:.1f} GFLOP/s; engine MFU = useful prefill FLOPs "
        f"({useful / 1e12:.2f} TFLOP, no padding, no LM head) / engine time / ceiling")
  print(f"{'':34} {'time s':>7} {'queries/s':>9} {'vs ours':>7}  agreement with one-at-a-time")
  for name, t, preds in (("ours (JAX engine, compiled)", t_ours, ours),
                         ("transformers, one at a time", t_single, single),
                         ("transformers, batched left-pad", t_batched, batched)):
    agree = sum(a == b for a, b in zip(preds, single)) / n
    print(f"{name:34} {t:7.1f} {n / t:9.2f} {t / t_ours:7.2f}  {agree:.3f}")
  print(f"engine: {useful / t_ours / 1e9:.1f} GFLOP/s useful, MFU {useful / t_ours / 1e9 / ceiling.median:.2f}; "
        f"accuracy (lenient) {np.mean([r['correct_lenient'] for r in records]):.3f}")


SUBCOMMANDS: dict[str, Callable] = {"forward": _forward, "icl": _icl}


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # quiet Orbax's INFO lines
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: python -m icl_ft.bench {{{','.join(SUBCOMMANDS)}}} [--flags]")
  SUBCOMMANDS[argv[1]](argv[2:])


if __name__ == "__main__":
  app.run(main)
