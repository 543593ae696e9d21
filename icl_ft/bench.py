"""Benchmarks: ``python -m icl_ft.bench SUBCOMMAND [--flags]``.

  forward   SmolLM2-135M forward (full logits), ours (JAX) vs transformers (PyTorch, sdpa), same inputs,
            same CPU, one process; tokens/s, GFLOP/s, MFU against the measured matmul ceiling, logits diff.

FLOPs convention: 2 x matmul params (incl. the LM head) per token, plus 4*T*D per layer per token for
attention (QK^T and PV, causal masking NOT halved). ``matmul_ceiling()`` is reusable by other benches.
Add a subcommand by writing ``def _name(argv)`` and registering it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import os

# XLA CPU flags, set by the bench only and before jax is imported (override with XLA_FLAGS).
os.environ.setdefault("XLA_FLAGS", "")
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
from absl import app, flags

from icl_ft.config import ModelConfig

flags.DEFINE_string("model", "smollm2-135m", "Model to benchmark (forward: only the embedded GGUF has a torch reference).")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("seq", 512, "Sequence length.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (after one warm-up).")
flags.DEFINE_bool("torch", True, "Also time the transformers PyTorch reference.")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Ceiling:
  best: float  # GFLOP/s
  median: float


def matmul_ceiling(n: int = 2048, runs: int = 10, dtype=jnp.float32) -> Ceiling:
  """The machine's matmul throughput: a jitted n x n @ n x n matmul, best and median GFLOP/s."""
  ka, kb = jax.random.split(jax.random.key(0))
  a, b = jax.random.normal(ka, (n, n), dtype), jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  times = _time(lambda: f(a, b).block_until_ready(), runs)
  return Ceiling(2 * n ** 3 / min(times) / 1e9, 2 * n ** 3 / statistics.median(times) / 1e9)


def forward_flops_per_token(cfg: ModelConfig, seq: int) -> float:
  """2 x matmul params (incl. LM head) + 4*T*D per layer (attention, causal not halved)."""
  D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  attn_proj = D * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  matmul_params = L * (attn_proj + 3 * D * F) + D * cfg.vocab_size
  return 2 * matmul_params + 4 * seq * D * L


def _time(fn: Callable[[], object], repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def _forward(argv):
  del argv
  from icl_ft import loading
  from icl_ft.model import forward
  B, T, R = FLAGS.batch, FLAGS.seq, FLAGS.repeats

  ceiling = matmul_ceiling()
  print(f"matmul ceiling (jit f32 2048^2): best {ceiling.best:.1f}, median {ceiling.median:.1f} GFLOP/s")

  m = loading.load(FLAGS.model)
  cfg = m.config
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T), dtype=np.int32)
  tokens, valid = jnp.asarray(ids), jnp.ones((B, T), bool)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  flops = forward_flops_per_token(cfg, T) * B * T

  t0 = time.perf_counter()
  compiled = jax.jit(functools.partial(forward, cfg)).lower(m.params, tokens, positions, valid).compile()
  compile_s = time.perf_counter() - t0
  run = lambda: compiled(m.params, tokens, positions, valid)[0].block_until_ready()
  t0 = time.perf_counter()
  ours_logits = np.asarray(run())
  print(f"ours:  compile {compile_s:.1f} s, first run {time.perf_counter() - t0:.1f} s")
  results = {"ours (JAX)": _time(run, R)}

  if FLAGS.torch:
    import torch
    from transformers import AutoModelForCausalLM
    path = loading.resolve(FLAGS.model)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.from_numpy(ids.astype(np.int64))
    with torch.inference_mode():
      t0 = time.perf_counter()
      ref_logits = ref(x).logits.numpy()
      print(f"torch: {torch.get_num_threads()} threads, attn {ref.config._attn_implementation}, "
            f"first run {time.perf_counter() - t0:.1f} s")
      results["torch (sdpa)"] = _time(lambda: ref(x).logits, R)
    print(f"max |logits ours - torch| = {np.abs(ours_logits - ref_logits).max():.2e} "
          f"(max |logit| {np.abs(ref_logits).max():.1f})")

  print(f"\n{cfg.arch} {FLAGS.model}: B={B} T={T}, {flops / 1e12:.3f} TFLOP per forward; FLOPs = 2*matmul params"
        f" (incl. LM head) + 4*T*D/layer attention (causal not halved); MFU = median GFLOP/s / median ceiling"
        f" ({ceiling.median:.1f})")
  print(f"{'':14} {'median s':>9} {'best s':>8} {'tok/s':>8} {'GFLOP/s':>8} {'MFU':>6}")
  for name, times in results.items():
    med = statistics.median(times)
    print(f"{name:14} {med:9.2f} {min(times):8.2f} {B * T / med:8.0f} {flops / med / 1e9:8.1f} "
          f"{flops / med / 1e9 / ceiling.median:6.2f}")
  if len(results) == 2:
    (ours, theirs) = (statistics.median(t) for t in results.values())
    print(f"ratio ours/torch (tokens/s): {theirs / ours:.2f}")


SUBCOMMANDS: dict[str, Callable] = {"forward": _forward}


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: python -m icl_ft.bench {{{','.join(SUBCOMMANDS)}}} [--flags]")
  SUBCOMMANDS[argv[1]](argv[2:])


if __name__ == "__main__":
  app.run(main)
