"""Activation patching as functional transforms, batched sweeps, and attribution patching.

Everything is a pure function of (params, batch), so it composes with ``jit``, ``vmap`` and ``grad``.
A sweep evaluates every patched run of a granularity in one compiled computation: ``lax.map`` over
layers (layers before the patched one are identical to the target run, so each run starts from the
target's cached ``resid_pre`` at that layer and runs only the remaining layers) and ``lax.map`` with
``batch_size=chunk`` (i.e. ``vmap`` in chunks) over the components of a layer. Logits are computed only
at the answer position.

Metric: logit difference LD = logit[y] - logit[y'] at the answer position, where y is the clean answer
token and y' the corrupted one. Denoising patches clean activations into the corrupted run; noising
patches corrupted activations into the clean run. Normalised effect (ratio of means over the batch):
(E[LD patched] - E[LD target]) / (E[LD source] - E[LD target]): 0 = no effect, 1 = full recovery.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import (SITES, Hooks, KVCache, Params, attention_mask, block, forward,
                                  positions_from_valid, run, unembed, windowed_layers)

GRANULARITIES = {("layer",), ("layer", "head"), ("layer", "pos"), ("layer", "head", "pos")}
_HEAD_SITES = {"q": "num_heads", "attn_z": "num_heads", "k": "num_kv_heads", "v": "num_kv_heads"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
  """Prompts of equal padded length with the answer tokens the metric contrasts."""
  tokens: jax.Array  # [B, T] left-padded
  valid: jax.Array  # [B, T]
  answer_pos: jax.Array  # [B] position whose next-token logits are scored
  gold: jax.Array  # [B] token y (clean answer)
  foil: jax.Array  # [B] token y' (corrupted answer)
  prefix: KVCache | None = None  # keys/values of earlier tokens every run shares (``shared_prefix``)

  @property
  def positions(self):
    p = positions_from_valid(self.valid)
    return p if self.prefix is None else p + self.prefix.pos[:, None]


def shared_prefix(cfg: ModelConfig, params: Params, clean: Batch, corrupt: Batch, start: int) -> tuple[Batch, Batch]:
  """(clean, corrupt) holding only tokens ``start``.. with the first ``start`` tokens, identical in both, as a
  key/value cache computed once.

  Patching clean into corrupt (or back) at positions where the two runs agree changes nothing, and by
  causality every activation before the first differing token agrees; so every patched run may start at
  ``start`` (at most the first differing position) and attend to the cached prefix. Metrics, sweeps and
  attribution on the returned batches equal those on the full ones; activations cover positions ``start``..
  only. On ICL prompts, where the demos precede the edit, this divides the cost of a run by about T / (T -
  start)."""
  if clean.prefix is not None or corrupt.prefix is not None:
    raise ValueError("the batches already have a prefix cache")
  T = clean.tokens.shape[1]
  if not 0 <= start < T:
    raise ValueError(f"the shared prefix must end before the last token ({T}), got {start}")
  if not (bool(jnp.all(clean.tokens[:, :start] == corrupt.tokens[:, :start])) and
          bool(jnp.all(clean.valid == corrupt.valid))):
    raise ValueError(f"clean and corrupt prompts differ before position {start}: no shared prefix")
  if start == 0:
    return clean, corrupt
  cache = _prefix_cache(cfg, params, clean.tokens[:, :start], clean.valid[:, :start], T)
  cut = lambda b: Batch(b.tokens[:, start:], b.valid[:, start:], b.answer_pos - start, b.gold, b.foil, cache)
  return cut(clean), cut(corrupt)


@functools.partial(jax.jit, static_argnames=("cfg", "size"))
def _prefix_cache(cfg: ModelConfig, params: Params, tokens, valid, size: int) -> KVCache:
  cache = KVCache.empty(cfg, tokens.shape[0], size, params["embed"].dtype)
  return forward(cfg, params, tokens, positions_from_valid(valid), valid, cache, logits_at=jnp.zeros((tokens.shape[0], 1),
                                                                                                     jnp.int32))[1]


def logit_diff(logits: jax.Array, batch: Batch) -> jax.Array:
  """[B] logit[gold] - logit[foil] from answer-position logits [B, 1, V]."""
  l = logits[:, 0].astype(jnp.float32)
  take = lambda ids: jnp.take_along_axis(l, ids[:, None], axis=-1)[:, 0]
  return take(batch.gold) - take(batch.foil)


def _check_site(site: str) -> None:
  if site not in SITES:
    raise ValueError(f"unknown activation site {site!r}; valid sites: {', '.join(SITES)}")


def capture(cfg: ModelConfig, params: Params, batch: Batch, taps=("resid_pre",)):
  """(metric [B], captured sites [L, B, ...]) of one unpatched run."""
  for s in taps:
    _check_site(s)
  logits, _, cache = run(cfg, params, batch.tokens, batch.positions, batch.valid, hooks=Hooks(taps=tuple(taps)),
                         cache=batch.prefix, logits_at=batch.answer_pos[:, None])
  return logit_diff(logits, batch), cache


def patched_metric(cfg: ModelConfig, params: Params, batch: Batch, site: str, src: jax.Array, mask: jax.Array):
  """Metric [B] of ``batch`` with ``site`` patched towards ``src`` [L, B, ...] by ``mask`` (broadcastable to src)."""
  return intervene(cfg, params, batch, {site: (src, mask)})


def intervene(cfg: ModelConfig, params: Params, batch: Batch, patch: dict | None = None, delta: dict | None = None):
  """Metric [B] of ``batch`` with several sites at once patched (``patch[site] = (src [L, B, ...], mask)``, the
  mask broadcastable to src) and/or shifted (``delta[site]``, [L, B, ...])."""
  checked = {}
  for site, (src, mask) in (patch or {}).items():
    _check_site(site)
    if jnp.ndim(mask) > jnp.ndim(src):
      raise ValueError(f"mask of shape {jnp.shape(mask)} has more dimensions than the {site} activations {src.shape}")
    try:
      checked[site] = (src, jnp.broadcast_to(mask, src.shape).astype(src.dtype))
    except ValueError as e:
      raise ValueError(f"mask of shape {jnp.shape(mask)} does not broadcast to the {site} activations "
                       f"{src.shape}") from e
  for site in delta or {}:
    _check_site(site)
  logits, _, _ = run(cfg, params, batch.tokens, batch.positions, batch.valid,
                     hooks=Hooks(patch=checked, delta=dict(delta or {})), cache=batch.prefix,
                     logits_at=batch.answer_pos[:, None])
  return logit_diff(logits, batch)


def component_masks(cfg: ModelConfig, site: str, shape: tuple[int, ...], granularity: tuple[str, ...],
                    positions: jax.Array | None = None) -> jax.Array:
  """One-hot masks [M, 1, T or 1, H or 1(, 1)] for the components of one layer, broadcastable to the
  per-layer activation ``shape`` [B, T, ...]; M is 1, H, P or H*P (component m = head * P + p), where the
  P positions are all T, or ``positions`` (e.g. the query segment) when given.
  """
  if tuple(granularity) not in GRANULARITIES:
    raise ValueError(f"granularity {granularity} is not one of {sorted(GRANULARITIES)}")
  _check_site(site)
  if site == "pattern":
    raise ValueError("sweeps over the attention pattern are not supported; patch it with patched_metric")
  by_head = "head" in granularity
  if by_head and site not in _HEAD_SITES:
    raise ValueError(f"site {site!r} has no head axis; per-head sweeps need one of {sorted(_HEAD_SITES)}")
  H = getattr(cfg, _HEAD_SITES[site]) if by_head else 1
  if "pos" not in granularity:
    pos_onehot = jnp.ones((1, 1))  # [P=1, T=1]: all positions together
  else:
    pos = jnp.arange(shape[1]) if positions is None else jnp.asarray(positions)
    pos_onehot = (pos[:, None] == jnp.arange(shape[1])[None, :]).astype(jnp.float32)  # [P, T]
  P = pos_onehot.shape[0]
  eye = jnp.eye(H * P).reshape(H * P, H, P).transpose(0, 2, 1)  # [M, P, H], component m = h * P + p
  eye = jnp.einsum("mph,pt->mth", eye, pos_onehot)  # [M, T or 1, H]
  if site in _HEAD_SITES:
    return eye[:, None, :, :, None]  # broadcasts against [B, T, H, dh]
  return eye[:, None, :, :]  # H == 1: broadcasts against [B, T, D]


def _run_from(cfg, params, batch, layer, x, site, src, mask, start=None):
  """Layers ``start``..L-1 (default ``layer``) from residual ``x``, with ``site`` at ``layer`` patched; returns
  the metric [B]."""
  L = cfg.num_layers
  prefix = batch.prefix
  att_mask, *_ = attention_mask(batch.valid, prefix, batch.tokens.shape[1], positions=batch.positions)
  positions = batch.positions

  def body(i, x):
    w = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, i, keepdims=False), params["layers"])
    here = (i == layer).astype(src.dtype)
    src_i = jax.lax.dynamic_index_in_dim(src, i, keepdims=False)
    kv = None if prefix is None else (prefix.k[i], prefix.v[i], prefix.index)
    x, _, _ = block(cfg, w, x, positions, att_mask, kv, Hooks(patch={site: (src_i, mask * here)}),
                    jnp.asarray(windowed_layers(cfg))[i])
    return x

  x = jax.lax.fori_loop(layer if start is None else start, L, body, x)
  return logit_diff(unembed(cfg, params, x, batch.answer_pos[:, None]), batch)


@functools.partial(jax.jit, static_argnames=("cfg", "site", "granularity", "chunk"))
def patch_sweep(cfg: ModelConfig, params: Params, target: Batch, source_cache: dict, site: str,
                granularity: tuple[str, ...] = ("layer", "head"), chunk: int = 16, positions=None):
  """Metric [L, M, B] of every single-component patch of ``site`` from ``source_cache`` into ``target``.

  ``source_cache`` holds ``site`` [L, B, ...] from ``capture`` of the source batch. M enumerates the
  components of a layer (see ``component_masks``; ``positions`` restricts per-position sweeps, e.g. to
  the query segment); reshape to [L, H, P, B] etc. ``chunk`` (the only memory knob) bounds how many
  patched runs are evaluated together.
  """
  _check_site(site)
  src = source_cache[site]
  _check_pair(src, target)
  _, tgt = capture(cfg, params, target, taps=("resid_pre",))
  masks = component_masks(cfg, site, src.shape[1:], granularity, positions)

  def per_layer(layer):
    x0 = tgt["resid_pre"][layer]
    return jax.lax.map(lambda m: _run_from(cfg, params, target, layer, x0, site, src, m), masks, batch_size=chunk)

  return jax.lax.map(per_layer, jnp.arange(cfg.num_layers))


@functools.partial(jax.jit, static_argnames=("cfg", "site", "chunk"))
def patch_list(cfg: ModelConfig, params: Params, target: Batch, source_cache: dict, site: str, layers: jax.Array,
               masks: jax.Array, chunk: int = 16) -> jax.Array:
  """Metric [M, B] of M single patches of ``site``: patch m replaces, at layer ``layers[m]``, what
  ``masks[m]`` (broadcastable to the per-layer activation [B, T, ...]) selects, from ``source_cache``.

  For sweeping a chosen set of components (e.g. the heads an attribution screen ranks highest): patches are
  sorted by layer and evaluated ``chunk`` at a time, each chunk starting from the target's cached residual at
  its lowest layer, so the cost follows the components' depth, not the model's.
  """
  _check_site(site)
  src = source_cache[site]
  _check_pair(src, target)
  _, tgt = capture(cfg, params, target, taps=("resid_pre",))
  order = jnp.argsort(layers, stable=True)
  m = layers.shape[0]
  pad = -m % chunk
  ls = jnp.concatenate([layers[order], jnp.repeat(layers[order][-1:], pad)]).reshape(-1, chunk)
  ms = jnp.concatenate([masks[order], jnp.repeat(masks[order][-1:], pad, axis=0)]).reshape(
      (-1, chunk) + masks.shape[1:])

  def per_chunk(args):
    chunk_layers, chunk_masks = args
    start = chunk_layers.min()
    x0 = jax.lax.dynamic_index_in_dim(tgt["resid_pre"], start, keepdims=False)
    return jax.vmap(lambda layer, mask: _run_from(cfg, params, target, layer, x0, site, src, mask, start))(
        chunk_layers, chunk_masks)

  out = jax.lax.map(per_chunk, (ls, ms)).reshape(-1, target.tokens.shape[0])[:m]
  return out[jnp.argsort(order)]


def head_masks(cfg: ModelConfig, site: str, heads: jax.Array) -> jax.Array:
  """Per-layer one-hot masks [M, 1, 1, H, 1] of heads ``heads`` (indices within their layer), all positions."""
  return jax.nn.one_hot(heads, getattr(cfg, _HEAD_SITES[site]))[:, None, None, :, None]


def _check_pair(src: jax.Array, target: Batch) -> None:
  if src.shape[1:3] != target.tokens.shape:
    raise ValueError(f"source activations cover (batch, tokens) {src.shape[1:3]} but the target batch is "
                     f"{target.tokens.shape}: prompt pairs must have the same batch size and token length")


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def attribution_patch(cfg: ModelConfig, params: Params, target: Batch, source_cache: dict, sites: tuple[str, ...]):
  """First-order estimate of every patch at once: (src - tgt) * dMetric/da at each site, [L, B, ...].

  One forward with taps and one backward with respect to zero perturbations ``delta`` on the target run
  (Syed et al., 2023). Sum over the axes a component spans (e.g. the last for heads) to get its effect.
  """
  for s in sites:
    _check_pair(source_cache[s], target)
  _, tgt = capture(cfg, params, target, taps=sites)

  def metric(delta):
    logits, _, _ = run(cfg, params, target.tokens, target.positions, target.valid, hooks=Hooks(delta=delta),
                       cache=target.prefix, logits_at=target.answer_pos[:, None])
    return jnp.sum(logit_diff(logits, target))

  grads = jax.grad(metric)({s: jnp.zeros_like(tgt[s]) for s in sites})
  return {s: (source_cache[s] - tgt[s]) * grads[s] for s in sites}
