"""Benchmarks: ``python -m icl_ft.bench SUBCOMMAND [--flags]``.

  forward   SmolLM2-135M forward (full logits), ours (JAX) vs transformers (PyTorch, sdpa), same inputs,
            same CPU, one process; tokens/s, GFLOP/s, MFU against the measured matmul ceiling, logits diff.

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
FLAGS = flags.FLAGS


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
    from transformers import AutoModelForCausalLM
    path = loading.resolve(FLAGS.model)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
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


SUBCOMMANDS: dict[str, Callable] = {"forward": _forward}


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # quiet Orbax's INFO lines
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: python -m icl_ft.bench {{{','.join(SUBCOMMANDS)}}} [--flags]")
  SUBCOMMANDS[argv[1]](argv[2:])


if __name__ == "__main__":
  app.run(main)
