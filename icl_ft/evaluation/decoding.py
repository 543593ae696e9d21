"""Batched greedy decoding and answer scoring with a KV cache over left-padded prompts."""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import KVCache, Params, Segments, forward, positions_from_valid


def _prefill(cfg: ModelConfig, params: Params, tokens, valid, cache_size: int):
  """Runs the prompt into a fresh cache; returns (next-token logits [B, V], cache)."""
  B, T = tokens.shape
  cache = KVCache.empty(cfg, B, cache_size, params["embed"].dtype)
  logits, cache = forward(cfg, params, tokens, positions_from_valid(valid), valid, cache,
                          logits_at=jnp.full((B, 1), T - 1))
  return logits[:, 0], cache


def _decode(cfg: ModelConfig, params: Params, logits, cache: KVCache, steps: int, positions,
            segments: Segments | None = None):
  """Greedy steps from next-token ``logits`` [B, K, V] of K continuations per row, at ``positions`` [B, K] (each
  step appends K tokens, of ``segments.ids`` when given); returns (tokens [B, K, N], their logits [B, K, N, V])."""
  def step(carry, i):
    logits, cache = carry
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt, cache = forward(cfg, params, tok, positions + i, jnp.ones(tok.shape, bool), cache, segments=segments)
    return (nxt, cache), (tok, logits)

  # The last token needs no forward pass: its logits are the final carry.
  (last, _), (toks, seen) = jax.lax.scan(step, (logits, cache), jnp.arange(steps - 1))
  toks = jnp.concatenate([toks, jnp.argmax(last, -1).astype(jnp.int32)[None]])
  return toks.transpose(1, 2, 0), jnp.concatenate([seen, last[None]]).transpose(1, 2, 0, 3)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_generate(cfg: ModelConfig, params: Params, tokens: jax.Array, valid: jax.Array,
                    max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
  """Greedy continuation of a left-padded batch ``tokens``/``valid`` [B, T].

  Returns (new token ids [B, N], float32 logits that chose them [B, N, V]).
  """
  logits, cache = _prefill(cfg, params, tokens, valid, tokens.shape[1] + max_new_tokens)
  new, seen = _decode(cfg, params, logits[:, None], cache, max_new_tokens, cache.pos[:, None])
  return new[:, 0], seen[:, 0]


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
  """``cache`` with the shared prefix's keys and values in its first slots (segment 0), for every row."""
  k, v = prefix
  P, B = k.shape[3], cache.k.shape[1]
  put = lambda dst, src: dst.at[:, :, :, :P].set(jnp.broadcast_to(src, (*src.shape[:1], B, *src.shape[2:])))
  return cache.replace(k=put(cache.k, k), v=put(cache.v, v), valid=cache.valid.at[:, :P].set(True),
                       positions=cache.positions.at[:, :P].set(jnp.arange(P)), pos=jnp.full((B,), P, jnp.int32),
                       index=jnp.asarray(P, jnp.int32))


@flax.struct.dataclass
class Packed:
  """Rows of K prompts each, packed by ``pack``: the prompts of a row share token prefixes (a shot sweep with
  nested demos: every k-shot prompt is a prefix of the longest plus its own question), so the shared tokens run
  once. Segment 0 is padding and the cached shared prefix; the longest prompt (the trunk) is cut into pieces at
  the other prompts' branch points (segments 1..); each other prompt's own tail is a segment; then, appended by
  ``generate_and_score``, segment ``G0 + k*C + c`` holds candidate c of prompt k and ``G0 + K*C + k`` its greedy
  tokens (G0 = 2K)."""
  tokens: jax.Array  # [B, T] int32, left-padded
  valid: jax.Array  # [B, T] bool
  positions: jax.Array  # [B, T] int32: each token's position in its own prompt, counted from its first packed token
  segments: jax.Array  # [B, T] int32
  sees: jax.Array  # [B, G, G] bool, G = 2K + K*C + K (``decoder.Segments``)
  ends: jax.Array  # [B, K] int32: the slot of each prompt's last token
  lengths: jax.Array  # [B, K] int32: each prompt's packed length (the position of its first continuation token)


def pack(rows: Sequence[Sequence[Sequence[int]]], T: int, pad_id: int, candidates: int) -> Packed:
  """Packs ``rows`` (each K >= 1 non-empty token lists: prompts, after any shared prefix) into [B, T] (see
  ``Packed``) for ``candidates`` answers per prompt. A prompt sees the trunk up to its longest common prefix
  with the trunk (leaving it at least one token of its own), then its own tail."""
  K, C = len(rows[0]), candidates
  G0 = 2 * K
  G = G0 + K * C + K
  out = dict(tokens=np.full((len(rows), T), pad_id, np.int32), valid=np.zeros((len(rows), T), bool),
             positions=np.zeros((len(rows), T), np.int32), segments=np.zeros((len(rows), T), np.int32),
             sees=np.zeros((len(rows), G, G), bool), ends=np.zeros((len(rows), K), np.int32),
             lengths=np.zeros((len(rows), K), np.int32))
  for b, prompts in enumerate(rows):
    if len(prompts) != K or not all(prompts):
      raise ValueError(f"every row needs {K} non-empty prompts; row {b} has lengths {[len(p) for p in prompts]}")
    _pack_row(prompts, T, C, {name: a[b] for name, a in out.items()}, b)
  return Packed(**out)


def _pack_row(prompts, T: int, C: int, row: dict, b: int):
  """Writes one row of ``pack`` into the arrays ``row`` (views)."""
  K = len(prompts)
  trunk, split = _layout(prompts)
  top = prompts[trunk]
  bounds = sorted({0, len(top), *split})
  tails = [k for k in range(K) if k != trunk]
  used = _width(prompts, split)
  if used > T:
    raise ValueError(f"row {b} packs {used} tokens into a width of {T}")
  s = T - used  # left padding
  row["tokens"][s:s + len(top)], row["positions"][s:s + len(top)] = top, np.arange(len(top))
  for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):  # trunk pieces: segments 1.., each sees those before
    row["segments"][s + lo:s + hi] = 1 + i
    row["sees"][1 + i, :2 + i] = True
  views = {}  # prompt k -> the segments its continuations see
  for k in range(K):
    views[k] = [0] + [1 + i for i, hi in enumerate(bounds[1:]) if hi <= split[k]]
  row["ends"][trunk] = s + len(top) - 1
  at = s + len(top)
  for j, k in enumerate(tails):
    tail, seg = prompts[k][split[k]:], K + 1 + j
    row["tokens"][at:at + len(tail)], row["segments"][at:at + len(tail)] = tail, seg
    row["positions"][at:at + len(tail)] = split[k] + np.arange(len(tail))
    views[k].append(seg)
    row["sees"][seg, views[k]] = True
    at += len(tail)
    row["ends"][k] = at - 1
  row["valid"][s:] = True
  row["sees"][0, 0] = True
  G0 = 2 * K
  for k in range(K):
    row["lengths"][k] = len(prompts[k])
    for seg in [G0 + k * C + c for c in range(C)] + [G0 + K * C + k]:
      row["sees"][seg, views[k] + [seg]] = True


def _layout(prompts: Sequence[Sequence[int]]) -> tuple[int, list[int]]:
  """The trunk (the longest prompt) and where each prompt leaves it (its length, for the trunk)."""
  trunk = max(range(len(prompts)), key=lambda k: len(prompts[k]))
  top = prompts[trunk]
  return trunk, [len(top) if k == trunk else min(common_prefix(p, top), len(p) - 1) for k, p in enumerate(prompts)]


def packed_width(prompts: Sequence[Sequence[int]]) -> int:
  """The tokens ``pack`` lays ``prompts`` out in: the trunk and every other prompt's own tail."""
  return _width(prompts, _layout(prompts)[1])


def _width(prompts, split) -> int:
  """The packed width of ``prompts`` that leave the trunk at ``split`` (``_layout``)."""
  return sum(len(p) - s for p, s in zip(prompts, split)) + max(split)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """The length of the longest common prefix of ``a`` and ``b``."""
  return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def generate_and_score(cfg: ModelConfig, params: Params, packed: Packed, answers, answer_valid, max_new_tokens: int,
                       prefix: tuple[jax.Array, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Teacher-forced scoring of candidate answers inside the prompts' prefill, then greedy decoding, for the K
  prompts of every packed row (``pack``).

  Each prompt's C candidates are appended as segments that see that prompt and themselves (at the positions
  that follow it), so one pass scores them all; greedy decoding then continues every prompt at once (K tokens
  per step, each seeing only its own prompt and its own tokens).

  Args:
    packed: [B, T] rows of K prompts (with ``prefix``: what follows the shared prefix).
    answers, answer_valid: [B, K, C, A] right-padded candidate continuations (e.g. gold and foil).
    prefix: optional (k, v) of a prefix every prompt starts with (``prefix_kv``), computed once: the
      prefill then runs only the packed rows, at positions that continue the prefix's.
  Returns dict with ``tokens`` [B, K, N] (greedy), ``logprob`` [B, K, C] (sum over each candidate's tokens),
  ``first_logit`` [B, K, C] (logit of each candidate's first token at the answer position).
  """
  B, T = packed.tokens.shape
  K, C, A = answers.shape[1:]
  G0 = 2 * K
  if packed.ends.shape[1] != K or packed.sees.shape[1] != G0 + K * C + K:
    raise ValueError(f"packed for {packed.ends.shape[1]} prompts with {packed.sees.shape[1]} segments, but the "
                     f"answers are for {K} prompts x {C} candidates: pack(candidates={C}) rows of {K}")
  P = 0 if prefix is None else prefix[0].shape[3]
  lengths = P + packed.lengths
  wide = lambda x: jnp.broadcast_to(x, (B, *x.shape[-1:]))
  seq = jnp.concatenate([packed.tokens, answers.reshape(B, -1)], axis=1)
  seq_valid = jnp.concatenate([packed.valid, answer_valid.reshape(B, -1)], axis=1)
  cand_pos = jnp.broadcast_to(lengths[:, :, None, None] + jnp.arange(A), (B, K, C, A)).reshape(B, -1)
  positions = jnp.concatenate([P + packed.positions, cand_pos], axis=1)
  ids = jnp.concatenate([packed.segments, wide(G0 + jnp.repeat(jnp.arange(K * C), A))], axis=1)
  # logits at each prompt's last token (predicts its candidates' first tokens) and at each candidate's tokens
  # but its last (predict the next)
  at = jnp.concatenate([packed.ends, wide(T + (jnp.arange(K * C)[:, None] * A + jnp.arange(A - 1)).reshape(-1))], 1)
  cache = KVCache.empty(cfg, B, P + T + K * C * A + K * max_new_tokens, params["embed"].dtype)
  cache = cache if prefix is None else _with_prefix(cache, prefix)
  out, cache = forward(cfg, params, seq, positions, seq_valid, cache, logits_at=at,
                       segments=Segments(ids, packed.sees))
  logits = out[:, :K]  # [B, K, V]
  first = jnp.take_along_axis(logits, answers[..., 0], axis=-1)  # [B, K, C]
  # each candidate token's log-probability, without materialising [B, K, C, A, V]
  lse = jax.nn.logsumexp(out, axis=-1)  # [B, K + K*C*(A-1)]
  rest = jnp.take_along_axis(out[:, K:], answers[..., 1:].reshape(B, -1, 1), -1)[..., 0] - lse[:, K:]
  token_logp = jnp.concatenate([(first - lse[:, :K, None])[..., None], rest.reshape(B, K, C, A - 1)], axis=-1)
  decoding = Segments(wide(G0 + K * C + jnp.arange(K)), packed.sees)
  new, _ = _decode(cfg, params, logits, cache, max_new_tokens, lengths, decoding)
  return {"tokens": new, "logprob": jnp.sum(token_logp * answer_valid, axis=-1), "first_logit": first}


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
