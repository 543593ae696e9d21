"""Function vectors (Hendel et al. 2023; Todd et al. 2024): is what the demos add a compact signal that can be
transplanted into a 0-shot run? (docs/circuits.md, "Function vectors").

The vector of layer l is the mean residual stream entering layer l at the answer position over k-shot prompts,
minus the same mean over the 0-shot prompts of the same queries. Added at that layer and position to 0-shot
runs of *other* queries, it either moves them towards the k-shot behaviour or does nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from icl_ft.interp import patching
from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import Params


@functools.partial(jax.jit, static_argnames=("cfg",))
def answer_residuals(cfg: ModelConfig, params: Params, batch: patching.Batch) -> jax.Array:
  """``resid_pre`` of every layer at the answer position, [L, B, D]."""
  _, cache = patching.capture(cfg, params, batch, taps=("resid_pre",))
  r = cache["resid_pre"]  # [L, B, T, D]
  return jnp.take_along_axis(r, batch.answer_pos[None, :, None, None], axis=2)[:, :, 0]


def delta_at(vector: jax.Array, layer, batch: patching.Batch, num_layers: int) -> jax.Array:
  """A ``resid_pre`` delta [L, B, T, D] that adds ``vector`` [D] at ``layer``, at each prompt's answer position."""
  B, T = batch.tokens.shape
  where = (jnp.arange(num_layers)[:, None, None] == layer) & (jnp.arange(T)[None, None, :] == batch.answer_pos[None, :, None])
  return where[..., None].astype(vector.dtype) * vector


@functools.partial(jax.jit, static_argnames=("cfg",))
def inject(cfg: ModelConfig, params: Params, batch: patching.Batch, vectors: jax.Array) -> jax.Array:
  """The metric [L, B] of ``batch`` with ``vectors[l]`` ([L, D]) added to the residual entering layer l at the
  answer position, one layer at a time."""
  L = cfg.num_layers
  return jax.lax.map(lambda l: patching.intervene(cfg, params, batch, delta={"resid_pre": delta_at(vectors[l], l, batch, L)}),
                     jnp.arange(L))
