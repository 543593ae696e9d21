"""Batched greedy decoding with a KV cache over left-padded prompts."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from icl_ft.config import ModelConfig
from icl_ft.model import KVCache, Params, forward, positions_from_valid


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_generate(cfg: ModelConfig, params: Params, tokens: jax.Array, valid: jax.Array,
                    max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
  """Greedy continuation of a left-padded batch.

  Args:
    tokens, valid: [B, T] prompt ids and real-token mask (padding on the left).
  Returns:
    (new token ids [B, N], float32 logits that chose them [B, N, V]).
  """
  B, T = tokens.shape
  cache = KVCache.empty(cfg, B, T + max_new_tokens, params["embed"].dtype)
  last = jnp.full((B, 1), T - 1)
  logits, cache = forward(cfg, params, tokens, positions_from_valid(valid), valid, cache, logits_at=last)
  logits = logits[:, 0]

  def step(carry, _):
    logits, cache = carry
    tok = jnp.argmax(logits, axis=-1).astype(tokens.dtype)
    nxt, cache = forward(cfg, params, tok[:, None], cache.pos[:, None], jnp.ones((B, 1), bool), cache)
    return (nxt[:, 0], cache), (tok, logits)

  _, (toks, all_logits) = jax.lax.scan(step, (logits, cache), None, length=max_new_tokens)
  return toks.T, all_logits.transpose(1, 0, 2)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to ``length`` (default: the longest); returns (ids, valid mask)."""
  length = length or max(len(s) for s in sequences)
  ids = np.full((len(sequences), length), pad_id, np.int32)
  valid = np.zeros((len(sequences), length), bool)
  for i, s in enumerate(sequences):
    if len(s) > length:
      raise ValueError(f"sequence {i} has {len(s)} tokens, more than the padded length {length}")
    if s:
      ids[i, length - len(s):] = s
      valid[i, length - len(s):] = True
  return ids, valid
