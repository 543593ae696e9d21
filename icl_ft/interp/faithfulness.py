"""Faithfulness (Hanna et al. 2024): how much of the clean-corrupt gap a set of components recovers when it
alone is patched, jointly, from the clean run into the corrupted one (docs/circuits.md, "Faithfulness").

A condition's components (heads and MLPs together) are ranked by |effect|; its top-k sets for k = 1, 2, 4,
... up to all are patched jointly, and its *circuit* is the smallest top-k set that recovers at least the
threshold (80%) of the gap. Patching every head output and every MLP output restores the answer position's
residual stream exactly (it is the embeddings plus those outputs), so the curve ends at 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from icl_ft.interp import patching
from icl_ft.interp.screen import FAMILIES
from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import Params

Components = dict[str, np.ndarray]  # family -> bool mask of the family's shape ([L, H] heads, [L] MLPs)


def ranking(effects: dict[str, np.ndarray]) -> list[tuple[str, int]]:
  """Every component as (family, flat index), largest |effect| first across families (ties: heads, then lower
  index); empty when any effect is NaN (the condition does not separate its pairs)."""
  flat = [(f, i, abs(float(v))) for f in FAMILIES for i, v in enumerate(np.asarray(effects[f], np.float64).ravel())]
  if any(np.isnan(v) for _, _, v in flat):
    return []
  return [(f, i) for f, i, _ in sorted(flat, key=lambda x: -x[2])]


def sizes(total: int) -> list[int]:
  """k = 1, 2, 4, ... below ``total``, then ``total``."""
  return [k for k in (2 ** j for j in range(total.bit_length())) if k < total] + [total]


def top_set(order: list[tuple[str, int]], k: int, shapes: dict[str, tuple[int, ...]]) -> Components:
  """The first k components of ``order`` as per-family masks."""
  sets = {f: np.zeros(int(np.prod(s)), bool) for f, s in shapes.items()}
  for f, i in order[:k]:
    sets[f][i] = True
  return {f: m.reshape(shapes[f]) for f, m in sets.items()}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _recovery(cfg: ModelConfig, params: Params, corrupt: patching.Batch, cache: dict, heads: jax.Array,
              mlps: jax.Array) -> jax.Array:
  def one(masks):
    h, m = masks
    return patching.intervene(cfg, params, corrupt, {"attn_z": (cache["attn_z"], h[:, None, None, :, None]),
                                                    "mlp_out": (cache["mlp_out"], m[:, None, None, None])})
  return jax.lax.map(one, (heads, mlps))


def recovery(cfg: ModelConfig, params: Params, corrupt: patching.Batch, cache: dict,
             sets: list[Components]) -> np.ndarray:
  """The metric [N, K] of the corrupted run with each of the K component sets patched jointly from ``cache``
  (the clean run's ``attn_z`` and ``mlp_out``)."""
  heads = jnp.asarray(np.stack([s["heads"] for s in sets]), jnp.float32)
  mlps = jnp.asarray(np.stack([s["mlps"] for s in sets]), jnp.float32)
  return np.asarray(_recovery(cfg, params, corrupt, cache, heads, mlps)).T


def circuit_size(recovered: np.ndarray, ks: list[int], threshold: float) -> int | None:
  """The smallest k whose recovered fraction reaches ``threshold`` (None if none does)."""
  return next((k for k, r in zip(ks, recovered) if np.isfinite(r) and r >= threshold), None)
