"""The decoder: one table of parameter leaves (shapes and logical sharding axes), a Flax NNX module that
declares them (used only through ``nnx.eval_shape``, for the abstract tree checkpoints load into), and pure
functions that compute.

Parameters are a plain nested dict (``Params``) with layers stacked on a leading axis and
head-split attention kernels, so they work directly with ``jax.jit``, ``jax.vmap``, ``jax.grad``,
optax and Orbax:

  embed       [V, D]            layers/q  [L, D, Hq, dh]   layers/o     [L, Hq, dh, D]
  final_norm  [D]               layers/k  [L, D, Hkv, dh]  layers/gate  [L, D, F] (gated MLPs)
  lm_head     [D, V] (untied)   layers/v  [L, D, Hkv, dh]  layers/up    [L, D, F]
  layers/{attn_norm,mlp_norm} [L, D]   layers/{q,k,v}_bias [L, H, dh]   layers/down [L, F, D]
  pos_embed   [P, D] (gpt_neo)  layers/{o,up,down}_bias [L, D or F]   {final,attn,mlp}_norm_bias (LayerNorm)

One decoder covers every family (Llama, Mistral, Qwen2, Gemma, Gemma 3, GPT-NeoX, GPT-Neo): their differences
are ``ModelConfig`` fields (Gemma 3 adds ``layers/{q,k}_norm`` [L, dh] and ``layers/post_{attn,mlp}_norm``). ``forward`` is the math; parameters are the plain tree, never module state.
Norms, softmax and logits are computed in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from icl_ft.model.config import ModelConfig

Params = dict[str, Any]
F32 = jnp.float32


def param_axes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Every parameter's shape and logical axes, keyed by '/'-joined path: the one table of leaves.

  D-sized vectors (norm weights and biases, output biases) use the replicated ``norm`` axis."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  Hq, Hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  table = {
      "embed": ((V, D), ("vocab", "embed")),
      "layers/attn_norm": ((L, D), ("layers", "norm")),
      "layers/q": ((L, D, Hq, dh), ("layers", "embed", "q_heads", "head_dim")),
      "layers/k": ((L, D, Hkv, dh), ("layers", "embed", "kv_heads", "head_dim")),
      "layers/v": ((L, D, Hkv, dh), ("layers", "embed", "kv_heads", "head_dim")),
      "layers/o": ((L, Hq, dh, D), ("layers", "q_heads", "head_dim", "embed")),
      "layers/mlp_norm": ((L, D), ("layers", "norm")),
      "layers/gate": ((L, D, F), ("layers", "embed", "mlp")),
      "layers/up": ((L, D, F), ("layers", "embed", "mlp")),
      "layers/down": ((L, F, D), ("layers", "mlp", "embed")),
      "final_norm": ((D,), ("norm",)),
  }
  if not cfg.gated_mlp:
    del table["layers/gate"]
  if cfg.qk_norm:
    table["layers/q_norm"] = ((L, dh), ("layers", "norm"))
    table["layers/k_norm"] = ((L, dh), ("layers", "norm"))
  if cfg.sandwich_norm:
    table["layers/post_attn_norm"] = ((L, D), ("layers", "norm"))
    table["layers/post_mlp_norm"] = ((L, D), ("layers", "norm"))
  if cfg.learned_positions:
    table["pos_embed"] = ((cfg.max_position_embeddings, D), ("length", "embed"))
  if cfg.norm == "layer":
    for name in ("layers/attn_norm", "layers/mlp_norm", "final_norm"):
      table[f"{name}_bias"] = table[name]
  if cfg.qkv_bias:
    table["layers/q_bias"] = ((L, Hq, dh), ("layers", "q_heads", "head_dim"))
    table["layers/k_bias"] = ((L, Hkv, dh), ("layers", "kv_heads", "head_dim"))
    table["layers/v_bias"] = ((L, Hkv, dh), ("layers", "kv_heads", "head_dim"))
  if cfg.o_bias:
    table["layers/o_bias"] = ((L, D), ("layers", "norm"))
  if cfg.mlp_bias:
    table["layers/up_bias"] = ((L, F), ("layers", "mlp"))
    table["layers/down_bias"] = ((L, D), ("layers", "norm"))
  if not cfg.tie_embeddings:
    table["lm_head"] = ((D, V), ("embed", "vocab"))
  return table


def windowed_layers(cfg: ModelConfig) -> np.ndarray:
  """[L] bool: which layers attend within ``cfg.sliding_window`` (scanned alongside the stacked layers;
  config, not parameters, so training and export never see it)."""
  return np.isin(np.arange(cfg.num_layers), cfg.window_layers)


class _Group(nnx.Module):
  """A named group of parameters (the stacked layers)."""


class Decoder(nnx.Module):
  """The decoder of every supported family. Holds ``nnx.Param`` leaves tagged with logical ``axes``.

  ``nnx.eval_shape`` of ``Decoder(cfg, rngs=...)`` gives the abstract tree used to load checkpoints straight
  into their shardings (no values are ever materialised here).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = F32):
    self.config = cfg
    self.layers = _Group()
    for path, (shape, axes) in param_axes(cfg).items():
      if path.endswith("norm"):
        value = jnp.full(shape, 0.0 if cfg.norm == "rms_1p" else 1.0, dtype)
      elif path.endswith("bias"):
        value = jnp.zeros(shape, dtype)
      else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
      owner, name = (self.layers, path[7:]) if path.startswith("layers/") else (self, path)
      setattr(owner, name, nnx.Param(value, axes=axes))

  @property
  def params(self) -> Params:
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))


def abstract_params(cfg: ModelConfig, dtype: Any = F32) -> Params:
  """Shapes and dtypes of the parameter tree, without allocating it."""
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  return model.params


@flax.struct.dataclass
class KVCache:
  """Key/value cache shared by a left-padded batch.

  Slots are filled left to right at the same ``index`` for every sequence; ``valid`` marks real
  (non-padding) slots and ``pos`` is each sequence's next position id, so sequences of different
  lengths decode together.
  """
  k: jax.Array  # [L, B, Hkv, S, dh] (head-major: attention reads it without a transpose)
  v: jax.Array  # [L, B, Hkv, S, dh]
  valid: jax.Array  # [B, S] bool
  pos: jax.Array  # [B] int32
  index: jax.Array  # [] int32
  positions: jax.Array  # [B, S] int32: each slot's position id (sliding windows are measured in positions)
  segments: jax.Array  # [B, S] int32: each slot's segment (``Segments``; 0 when written without)

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, size: int, dtype: Any = F32) -> "KVCache":
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, size, cfg.head_dim)
    slots = jnp.zeros((batch, size), jnp.int32)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, size), bool),
               jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32), slots, slots)


@flax.struct.dataclass
class Segments:
  """Which parts of a packed row see which: several prompts and continuations that share token prefixes run as
  one sequence. A token of segment ``g`` attends an earlier key of segment ``h`` only when ``sees[g, h]``
  (causality and padding still apply)."""
  ids: jax.Array  # [B, T] int32: each new token's segment
  sees: jax.Array  # [B, G, G] bool


def positions_from_valid(valid: jax.Array) -> jax.Array:
  """Position ids for a left-padded batch: 0 at each sequence's first real token."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def norm(cfg: ModelConfig, x: jax.Array, w: Params, name: str) -> jax.Array:
  """The family's norm of ``x`` with weight ``w[name]`` in float32: RMSNorm (Gemma: weight ``1 + w``) or
  LayerNorm (bias ``w[name + '_bias']``)."""
  xf = x.astype(F32)
  if cfg.norm == "layer":
    xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
  y = y * ((1.0 + w[name].astype(F32)) if cfg.norm == "rms_1p" else w[name].astype(F32))
  if cfg.norm == "layer":
    y = y + w[f"{name}_bias"].astype(F32)
  return y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float, dim: int) -> jax.Array:
  """Rotary embedding of the first ``dim`` dims of each head in the rotate-half layout (dim i pairs with
  i + dim/2; the rest pass through); x is [B, T, H, dh]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=F32) / dim))
  angles = positions.astype(F32)[..., None] * inv_freq  # [B, T, dim/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x[..., :dim].astype(F32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  return jnp.concatenate([rotated, x[..., dim:]], axis=-1) if dim < x.shape[-1] else rotated


_ACT = {"silu": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


SITES = ("resid_pre", "q", "k", "v", "pattern", "attn_z", "attn_out", "resid_mid", "mlp_post", "mlp_out",
         "resid_post")
"""Activation sites of every layer (shapes per layer; L is prepended when stacked over layers):
resid_pre/resid_mid/resid_post/attn_out/mlp_out [B, T, D]; q and attn_z (the o_proj input) [B, T, Hq, dh];
k, v [B, T, Hkv, dh] (projections, before RoPE); pattern [B, Hq, T, S] (post-softmax, opt-in: it is large);
mlp_post [B, T, F] (the down_proj input).
With Gemma 3's sandwich norms attn_out and mlp_out are the normalised outputs, as added to the residual.
With GPT-NeoX's parallel residual the MLP reads ``norm(resid_pre)``, not ``resid_mid``: there
resid_mid = resid_pre + attn_out is only the partial sum before mlp_out is added (patching it changes
resid_post, never this layer's MLP)."""


@flax.struct.dataclass
class Hooks:
  """Functional interventions for one forward pass, stacked over layers (leading axis L).

  ``patch[site] = (src, mask)`` replaces the activation ``a`` by ``a + mask * (src - a)`` (1 = replace,
  fractional = interpolate; ``mask`` broadcasts against ``src``); ``delta[site]`` is added to ``a``
  (differentiate with respect to it for attribution patching); ``taps`` are the sites to return.
  """
  patch: dict = flax.struct.field(default_factory=dict)
  delta: dict = flax.struct.field(default_factory=dict)
  taps: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

  def sites(self) -> set[str]:
    return set(self.patch) | set(self.delta) | set(self.taps)


class _Site:
  """Applies one layer's slice of ``Hooks`` at each named site and records the tapped values."""

  def __init__(self, hooks: Hooks | None):
    self.hooks = hooks
    self.captured: dict[str, jax.Array] = {}

  def wants(self, name: str) -> bool:
    return self.hooks is not None and name in self.hooks.sites()

  def __call__(self, name: str, a: jax.Array) -> jax.Array:
    if self.hooks is None:
      return a
    if name in self.hooks.patch:
      src, mask = self.hooks.patch[name]
      a = (a + mask * (src - a)).astype(a.dtype)
    if name in self.hooks.delta:
      a = a + self.hooks.delta[name].astype(a.dtype)
    if name in self.hooks.taps:
      self.captured[name] = a
    return a


def attention(q, k, v, mask, site: _Site | None = None, scale: float | None = None):
  """Grouped-query attention. q [B,T,Hq,dh], k/v [B,Hkv,S,dh] (head-major), mask [B,T,S] bool -> z [B,T,Hq,dh].

  Scores are scaled by ``scale`` (default dh^-0.5; GPT-Neo uses 1).
  Head-major layouts, with each KV head's query group stacked into one [G*T, dh] matrix, make both
  products plain batched matmuls with no transposes of the [T, S] scores (~1.5x faster on XLA CPU);
  head-major keys/values let a decode step read the cache in place.
  Query head h uses KV head h // G, as transformers' ``repeat_kv``.
  """
  B, T, Hq, dh = q.shape
  Hkv, S = k.shape[1], k.shape[2]
  G = Hq // Hkv
  q = q.reshape(B, T, Hkv, G, dh).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, dh)
  scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=F32) * (dh ** -0.5 if scale is None else scale)
  scores = jnp.where(mask[:, None, None], scores.reshape(B, Hkv, G, T, S), jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if site is not None and site.wants("pattern"):
    probs = site("pattern", probs.reshape(B, Hq, T, S)).reshape(B, Hkv, G, T, S)
  z = jnp.einsum("bkms,bksd->bkmd", probs.reshape(B, Hkv, G * T, S).astype(v.dtype), v)
  return z.reshape(B, Hkv, G, T, dh).transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, dh)


@jax.custom_vjp
def _dense(h: jax.Array, kernel: jax.Array) -> jax.Array:
  """h [B, T, *K] contracted with kernel [*K, *N] -> [B, T, *N]: the same product as autodiff's einsum,
  with a hand-written backward.

  The kernel gradient is one 2-D ``h^T @ g`` over the flattened B*T tokens. Left to autodiff, XLA CPU
  computes it with the token axis contracted in place, which needs a transposed copy of the [B*T, F]
  gradient (fused into the SwiGLU backward, an expensive strided write); this form measured 5-10%
  faster on a whole SmolLM2-135M train step. The forward is unchanged (bitwise).
  """
  n = h.ndim - 2
  return jax.lax.dot_general(h, kernel, ((tuple(range(2, h.ndim)), tuple(range(n))), ((), ())))


def _dense_fwd(h, kernel):
  return _dense(h, kernel), (h, kernel)


def _dense_bwd(res, g):
  h, kernel = res
  n, m = h.ndim - 2, g.ndim - 2
  dh = jax.lax.dot_general(g, kernel, ((tuple(range(2, g.ndim)), tuple(range(n, n + m))), ((), ())))
  dk = h.reshape(-1, math.prod(h.shape[2:])).T @ g.reshape(-1, math.prod(g.shape[2:]))
  return dh.astype(h.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def _proj(eq: str, h: jax.Array, w: Params, name: str) -> jax.Array:
  """``einsum(eq, h, w[name])``, plus ``w[name + '_bias']`` where the family has it, plus the LoRA update
  ``(h @ a) @ b`` when adapters are attached."""
  y = _dense(h, w[name]) if h.dtype == w[name].dtype else jnp.einsum(eq, h, w[name])
  if f"{name}_bias" in w:
    y = y + w[f"{name}_bias"]
  if f"{name}_lora_a" in w:
    flat = h.reshape(*h.shape[:2], -1)
    y = y + ((flat @ w[f"{name}_lora_a"].astype(h.dtype)) @ w[f"{name}_lora_b"].astype(h.dtype)).reshape(y.shape)
  return y


def block(cfg: ModelConfig, w: Params, x, positions, mask, kv=None, hooks: Hooks | None = None, windowed=False):
  """One pre-norm transformer layer with its activation sites.

  ``w``/``hooks`` are this layer's slices; ``mask`` comes from ``attention_mask``; ``windowed`` (this
  layer's entry of ``windowed_layers``) limits attention to ``cfg.sliding_window``; ``kv`` is None (no
  cache) or (k_cache, v_cache, index): the tokens attend to the cache with their own keys/values written
  at ``index``. Returns (x, (k, v) of these tokens after RoPE, head-major [B, Hkv, T, dh], captured sites).
  """
  site = _Site(hooks)
  x = site("resid_pre", x)
  h = norm(cfg, x, w, "attn_norm")
  q = _proj("btd,dhk->bthk", h, w, "q")
  k = _proj("btd,dhk->bthk", h, w, "k")
  v = _proj("btd,dhk->bthk", h, w, "v")
  q, k, v = site("q", q), site("k", k), site("v", v)
  if cfg.qk_norm:
    q, k = norm(cfg, q, w, "q_norm"), norm(cfg, k, w, "k_norm")
  if cfg.rotary_dim:
    theta = jnp.where(windowed, cfg.local_rope_theta, cfg.rope_theta) if cfg.local_rope_theta else cfg.rope_theta
    q, k = rope(q, positions, theta, cfg.rotary_dim), rope(k, positions, theta, cfg.rotary_dim)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  keys, values = k, v
  if kv is not None:
    k_cache, v_cache, index = kv
    keys = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=2)
    values = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=2)
  allowed = mask.allowed
  if cfg.sliding_window:
    allowed &= (mask.distance < cfg.sliding_window) | ~windowed
  z = site("attn_z", attention(q, keys, values, allowed, site, cfg.attn_scale))
  out = _proj("bthk,hkd->btd", z, w, "o")
  mid = site("resid_mid", x + site("attn_out", norm(cfg, out, w, "post_attn_norm") if cfg.sandwich_norm else out))
  h = norm(cfg, x if cfg.parallel_residual else mid, w, "mlp_norm")
  fn = _ACT[cfg.act]
  if cfg.gated_mlp:
    act = site("mlp_post", fn(_proj("btd,df->btf", h, w, "gate")) * _proj("btd,df->btf", h, w, "up"))
  else:
    act = site("mlp_post", fn(_proj("btd,df->btf", h, w, "up")))
  out = _proj("btf,fd->btd", act, w, "down")
  x = site("resid_post", mid + site("mlp_out", norm(cfg, out, w, "post_mlp_norm") if cfg.sandwich_norm else out))
  return x, (k, v), site.captured


@flax.struct.dataclass
class AttentionMask:
  """Which key slots each query may attend, shared by all layers; windowed layers (``block``) further
  require ``distance < cfg.sliding_window``."""
  allowed: jax.Array  # [B, T, S] bool: causal over valid key slots (and segments)
  distance: jax.Array  # [B, T, S] int32: how many positions (by position id) the key lies before the query


def attention_mask(valid, cache: KVCache | None, T: int, segments: Segments | None = None, positions=None):
  """The ``AttentionMask`` of ``T`` new tokens, the key-valid mask [B, S] and the key segments [B, S] after this
  step.

  ``segments`` (optional): which earlier keys each token may see, by segment (cached slots keep the segment
  they were written with); without it no segment rule applies, whatever the cache holds. ``positions`` [B, T] defaults to consecutive ids after each sequence's valid
  tokens (``positions_from_valid``). Windows are measured in position ids, not slots, so packed segments do
  not shift them; for left-padded sequences this equals transformers' slot-based windows.
  """
  if positions is None:
    positions = positions_from_valid(valid) + (0 if cache is None else cache.pos[:, None])
  new_seg = jnp.zeros(valid.shape, jnp.int32) if segments is None else segments.ids
  if cache is None:
    key_valid, key_pos, key_seg = valid, positions, new_seg
    q_slot, k_slot = jnp.arange(T), jnp.arange(T)
  else:
    write = lambda cached, new: jax.lax.dynamic_update_slice_in_dim(cached, new, cache.index, axis=1)
    key_valid, key_pos = write(cache.valid, valid), write(cache.positions, positions.astype(jnp.int32))
    key_seg = write(cache.segments, new_seg)
    q_slot, k_slot = cache.index + jnp.arange(T), jnp.arange(cache.valid.shape[1])
  allowed = key_valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])
  if segments is not None:
    rows = jnp.take_along_axis(segments.sees, segments.ids[:, :, None], axis=1)  # [B, T, G]: what each token sees
    allowed &= jnp.take_along_axis(rows, jnp.broadcast_to(key_seg[:, None, :], allowed.shape), axis=2)
  distance = (positions[:, :, None] - key_pos[:, None, :]).astype(jnp.int32)
  return AttentionMask(allowed, distance), key_valid, key_seg


def unembed(cfg: ModelConfig, params: Params, x, logits_at=None):
  """Final norm and LM head (float32 logits), only at ``logits_at`` [B, N] positions when given."""
  x = norm(cfg, x, params, "final_norm")
  if logits_at is not None:
    x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
  head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  return jnp.einsum("btd,dv->btv", x, head, preferred_element_type=F32)


def forward(cfg: ModelConfig, params: Params, tokens, positions, valid, cache: KVCache | None = None,
            logits_at=None, remat: bool = False, segments: Segments | None = None):
  """Runs the decoder on ``tokens`` [B, T].

  Args:
    positions: [B, T] position ids (see ``positions_from_valid`` for left padding).
    valid: [B, T] bool, False at padding.
    cache: if given, the tokens fill slots ``cache.index ...`` and attend to all valid earlier slots.
    logits_at: optional [B, N] indices into T; logits are computed only there (saves the vocab matmul).
    remat: recompute each layer's activations in the backward pass (saves memory when training).
    segments: optional packing of several sequences that share prefixes into one row (``Segments``).
  Returns:
    (float32 logits [B, T or N, V], updated cache or None).
  """
  logits, cache, _ = run(cfg, params, tokens, positions, valid, cache=cache, logits_at=logits_at, remat=remat,
                         segments=segments)
  return logits, cache


def run(cfg: ModelConfig, params: Params, tokens, positions, valid, *, hooks: Hooks | None = None,
        cache: KVCache | None = None, logits_at=None, remat: bool = False, unroll: int | bool = 1,
        segments: Segments | None = None):
  """``forward`` with interventions: returns (logits, cache, captured sites stacked over layers [L, ...]).

  ``unroll`` is ``lax.scan``'s over the layers (True: fully unrolled; faster training steps on XLA CPU,
  longer compiles)."""
  if hooks is not None:
    unknown = hooks.sites() - set(SITES)
    if unknown:
      raise ValueError(f"unknown activation site(s) {sorted(unknown)}; valid sites: {', '.join(SITES)}")
  T = tokens.shape[1]
  x = jnp.take(params["embed"], tokens, axis=0)
  if cfg.embed_scale:  # Gemma: sqrt(hidden) rounded to the embedding dtype first, as transformers
    x = x * jnp.asarray(math.sqrt(cfg.hidden_size), F32).astype(x.dtype)
  if cfg.learned_positions:
    # clip: a padding slot's id may pass the table, and the default NaN fill would reach valid slots through
    # attention's zero weights (0 * NaN); a valid token past it is a prompt too long, which callers check first
    # (the engine's PromptTooLongError)
    x = x + jnp.take(params["pos_embed"], positions, axis=0, mode="clip")
  mask, key_valid, key_seg = attention_mask(valid, cache, T, segments, positions)
  layer_kv = None if cache is None else (cache.k, cache.v)

  def body(x, layer):
    w, kv, h, windowed = layer
    kv = None if kv is None else (*kv, cache.index)
    x, new_kv, captured = block(cfg, w, x, positions, mask, kv, h, windowed)
    return x, (new_kv, captured)

  x, ((k_all, v_all), captured) = jax.lax.scan(jax.checkpoint(body) if remat else body, x,
                                               (params["layers"], layer_kv, hooks, windowed_layers(cfg)),
                                               unroll=unroll)
  logits = unembed(cfg, params, x, logits_at)
  if cache is not None:  # only the new slots are written: in place when the cache is a loop carry or donated
    k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k_all.astype(cache.k.dtype), cache.index, axis=3)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v_all.astype(cache.v.dtype), cache.index, axis=3)
    key_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions.astype(jnp.int32), cache.index, axis=1)
    cache = KVCache(k_all, v_all, key_valid, cache.pos + valid.sum(-1).astype(jnp.int32), cache.index + T, key_pos,
                    key_seg)
  return logits, cache, captured
