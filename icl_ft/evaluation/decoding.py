"""Batched greedy decoding and answer scoring with a KV cache over left-padded prompts."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import KVCache, Params, forward, positions_from_valid


def _prefill(cfg: ModelConfig, params: Params, tokens, valid, cache_size: int):
  """Runs the prompt into a fresh cache; returns (next-token logits [B, V], cache)."""
  B, T = tokens.shape
  cache = KVCache.empty(cfg, B, cache_size, params["embed"].dtype)
  logits, cache = forward(cfg, params, tokens, positions_from_valid(valid), valid, cache,
                          logits_at=jnp.full((B, 1), T - 1))
  return logits[:, 0], cache


def _decode(cfg: ModelConfig, params: Params, logits, cache: KVCache, steps: int):
  """Greedy steps from next-token ``logits``; returns (tokens [B, N], their logits [B, N, V])."""
  B = logits.shape[0]

  def step(carry, _):
    logits, cache = carry
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt, cache = forward(cfg, params, tok[:, None], cache.pos[:, None], jnp.ones((B, 1), bool), cache)
    return (nxt[:, 0], cache), (tok, logits)

  # The last token needs no forward pass: its logits are the final carry.
  (last, _), (toks, seen) = jax.lax.scan(step, (logits, cache), None, length=steps - 1)
  toks = jnp.concatenate([toks, jnp.argmax(last, -1).astype(jnp.int32)[None]])
  return toks.T, jnp.concatenate([seen, last[None]]).transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_generate(cfg: ModelConfig, params: Params, tokens: jax.Array, valid: jax.Array,
                    max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
  """Greedy continuation of a left-padded batch ``tokens``/``valid`` [B, T].

  Returns (new token ids [B, N], float32 logits that chose them [B, N, V]).
  """
  logits, cache = _prefill(cfg, params, tokens, valid, tokens.shape[1] + max_new_tokens)
  return _decode(cfg, params, logits, cache, max_new_tokens)


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefix_kv(cfg: ModelConfig, params: Params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The keys and values [L, 1, Hkv, P, dh] of one prompt prefix ``tokens`` [1, P] (positions 0..P-1), for
  ``generate_and_score(prefix=...)``."""
  P = tokens.shape[1]
  cache = KVCache.empty(cfg, 1, P, params["embed"].dtype)
  _, cache = forward(cfg, params, tokens, jnp.arange(P)[None], jnp.ones((1, P), bool), cache,
                     logits_at=jnp.zeros((1, 1), jnp.int32))
  return cache.k, cache.v


def _with_prefix(cache: KVCache, prefix: tuple[jax.Array, jax.Array]) -> KVCache:
  """``cache`` with the shared prefix's keys and values in its first slots, for every row."""
  k, v = prefix
  P, B = k.shape[3], cache.k.shape[1]
  put = lambda dst, src: dst.at[:, :, :, :P].set(jnp.broadcast_to(src, (*src.shape[:1], B, *src.shape[2:])))
  return cache.replace(k=put(cache.k, k), v=put(cache.v, v), valid=cache.valid.at[:, :P].set(True),
                       positions=cache.positions.at[:, :P].set(jnp.arange(P)), pos=jnp.full((B,), P, jnp.int32),
                       index=jnp.asarray(P, jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def generate_and_score(cfg: ModelConfig, params: Params, tokens, valid, answers, answer_valid,
                       max_new_tokens: int, prefix: tuple[jax.Array, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Teacher-forced scoring of candidate answers inside the prompt's prefill, then greedy decoding.

  The C candidates are appended to the prompt as prefix-sharing segments (each sees the prompt and
  itself, at the positions that follow the prompt), so one pass scores them all; their cache slots are
  then hidden and greedy decoding continues from the prompt alone.

  Args:
    tokens, valid: [B, T] left-padded prompts (with ``prefix``: what follows the shared prefix).
    answers, answer_valid: [B, C, A] right-padded candidate continuations (e.g. gold and foil).
    prefix: optional (k, v) of a prefix every prompt starts with (``prefix_kv``), computed once: the
      prefill then runs only ``tokens``, at positions that continue the prefix's.
  Returns dict with ``tokens`` [B, N] (greedy), ``logprob`` [B, C] (sum over each candidate's tokens),
  ``first_logit`` [B, C] (logit of each candidate's first token at the answer position).
  """
  B, T = tokens.shape
  C, A = answers.shape[1:]
  P = 0 if prefix is None else prefix[0].shape[3]
  n_prompt = P + valid.sum(-1).astype(jnp.int32)
  seq = jnp.concatenate([tokens, answers.reshape(B, C * A)], axis=1)
  seq_valid = jnp.concatenate([valid, answer_valid.reshape(B, C * A)], axis=1)
  positions = jnp.concatenate([P + positions_from_valid(valid),
                               jnp.tile(n_prompt[:, None] + jnp.arange(A), (1, C))], axis=1)
  segments = jnp.concatenate([jnp.zeros((B, T), jnp.int32), jnp.repeat(jnp.arange(1, C + 1), A)[None].repeat(B, 0)],
                             axis=1)
  # logits at the last prompt token (predicts each candidate's first token) and at each candidate's
  # tokens but its last (predict the next)
  at = jnp.concatenate([jnp.array([T - 1]), (T + jnp.arange(C)[:, None] * A + jnp.arange(A - 1)).reshape(-1)])
  cache = KVCache.empty(cfg, B, P + T + C * A + max_new_tokens, params["embed"].dtype)
  cache = cache if prefix is None else _with_prefix(cache, prefix)
  out, cache = forward(cfg, params, seq, positions, seq_valid, cache, logits_at=jnp.tile(at, (B, 1)),
                       segments=segments)
  logits = out[:, 0]
  cand = jnp.concatenate([jnp.repeat(out[:, :1], C, 1)[:, :, None],
                          out[:, 1:].reshape(B, C, A - 1, out.shape[-1])], axis=2)  # [B, C, A, V]
  token_logp = jnp.take_along_axis(jax.nn.log_softmax(cand), answers[..., None], -1)[..., 0]
  cache = cache.replace(valid=cache.valid.at[:, P + T:].set(False), pos=n_prompt)
  new, _ = _decode(cfg, params, logits, cache, max_new_tokens)
  return {"tokens": new, "logprob": jnp.sum(token_logp * answer_valid, axis=-1),
          "first_logit": jnp.take_along_axis(logits, answers[:, :, 0], axis=-1)}


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to ``length`` (default: the longest); returns (ids, valid mask)."""
  return _pad(sequences, pad_id, length, left=True)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  return _pad(sequences, pad_id, length, left=False)


def _pad(sequences, pad_id, length, left):
  length = length or max(1, max(len(s) for s in sequences))
  ids = np.full((len(sequences), length), pad_id, np.int32)
  valid = np.zeros((len(sequences), length), bool)
  for i, s in enumerate(sequences):
    if len(s) > length:
      raise ValueError(f"sequence {i} has {len(s)} tokens, more than the padded length {length}")
    if s:
      sl = slice(length - len(s), length) if left else slice(0, len(s))
      ids[i, sl], valid[i, sl] = s, True
  return ids, valid
