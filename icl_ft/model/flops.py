"""FLOP accounting and the measured matmul ceiling that MFU figures are quoted against.

Conventions: a matmul of an [m, k] by [k, n] is 2mkn FLOPs. Forward per token: 2 x matmul parameters
(the LM head included when it is computed) + attention 4*T*D per layer (QK^T and PV; ``causal``
halves it, as MaxText does for training). Training: 3 x forward.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from icl_ft.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Ceiling:
  best: float  # GFLOP/s
  median: float


def timeit(fn: Callable[[], object], repeats: int) -> list[float]:
  """Wall times of ``repeats`` calls (the caller blocks on results inside ``fn``)."""
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def matmul_ceiling(n: int = 2048, runs: int = 10, dtype=jnp.float32) -> Ceiling:
  """This device's matmul throughput: a jitted n x n @ n x n matmul, best and median GFLOP/s."""
  ka, kb = jax.random.split(jax.random.key(0))
  a, b = jax.random.normal(ka, (n, n), dtype), jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  times = timeit(lambda: f(a, b).block_until_ready(), runs)
  return Ceiling(2 * n ** 3 / min(times) / 1e9, 2 * n ** 3 / statistics.median(times) / 1e9)


def matmul_params(cfg: ModelConfig, head: bool = True) -> int:
  """Parameters that take part in matmuls per token (embedding gathers excluded)."""
  D, L = cfg.hidden_size, cfg.num_layers
  per_layer = D * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.mlp_kernels * D * cfg.intermediate_size
  return L * per_layer + (D * cfg.vocab_size if head else 0)


def forward_flops_per_token(cfg: ModelConfig, seq: int, head: bool = True, causal: bool = False) -> float:
  attention = 4 * seq * cfg.num_heads * cfg.head_dim * cfg.num_layers
  return 2 * matmul_params(cfg, head) + (attention / 2 if causal else attention)


def train_flops_per_token(cfg: ModelConfig, seq: int) -> float:
  """Full fine-tuning FLOPs per token of a ``seq``-token sequence (3 x the causal forward)."""
  return 3 * forward_flops_per_token(cfg, seq, head=True, causal=True)


def train_flops(cfg: ModelConfig, tokens: float, tokens_sq: float, adapter_params: int | None = None,
                head_tokens: float | None = None) -> float:
  """Useful FLOPs of one training step over sequences of real (unpadded) lengths n_i, given Σn_i (``tokens``)
  and Σn_i² (``tokens_sq``; causal attention costs 2·n²·H·dh per layer forward); the LM head at ``head_tokens``
  positions (the scored ones; default: every token).

  Full fine-tuning: 3 x forward (activation and weight gradients). LoRA (``adapter_params`` given): frozen
  matmuls need only activation gradients (2 x their forward), attention 3 x, adapters 6 x their parameters.
  """
  head = cfg.hidden_size * cfg.vocab_size * (tokens if head_tokens is None else head_tokens)
  matmul = 2 * (matmul_params(cfg, head=False) * tokens + head)
  attention = 2 * cfg.num_heads * cfg.head_dim * cfg.num_layers * tokens_sq
  if adapter_params is None:
    return 3 * (matmul + attention)
  return 2 * matmul + 3 * attention + 6 * adapter_params * tokens


def train_memory_per_device(cfg: ModelConfig, shards: int, micro_batch: int, seq: int, remat: bool = True,
                            compute_bytes: int = 2) -> dict[str, float]:
  """Estimated peak bytes per device for full fine-tuning with our step (float32 master weights, float32
  AdamW moments and gradient accumulator, all sharded ``shards`` ways by FSDP; ``micro_batch`` sequences
  of ``seq`` tokens per device; activations in ``compute_bytes`` per element).

  Activations follow Korthikanti et al. (2022): ~(34 + 5·H·T/D)·T·D bytes-per-element per layer and
  sequence without recomputation; with ``remat`` only each layer's input is kept, plus one layer's full
  set during its backward. Logits: float32 logits, softmax and their gradient at the full vocabulary.
  """
  P = cfg.num_params()
  D, L, T, b = cfg.hidden_size, cfg.num_layers, seq, micro_batch
  per_layer_act = (34 + 5 * cfg.num_heads * T / D) * T * D * b * compute_bytes / 2
  layer_params = (P - cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)) / L
  out = {
      "params_fp32": 4 * P / shards,
      "grads_fp32": 4 * P / shards,
      "adam_moments_fp32": 8 * P / shards,
      "gathered_layer_weights": 2 * layer_params * compute_bytes,  # current + prefetched layer (FSDP all-gather)
      "activations": (L * b * T * D * compute_bytes + per_layer_act) if remat else L * per_layer_act,
      "logits": 3 * 4 * b * T * cfg.vocab_size,
  }
  out["total"] = sum(out.values())
  return out
