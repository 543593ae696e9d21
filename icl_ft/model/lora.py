"""LoRA: low-rank adapters on the decoder's projection kernels.

Adapter leaves are ``layers/{target}_lora_a`` [L, in, r] and ``layers/{target}_lora_b`` [L, r, out]; the
model adds ``(h @ a) @ b`` (``b`` pre-scaled by alpha / r) to the frozen projection. ``merge`` folds them
into the kernels for export.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import Params, param_axes

# target -> number of leading (input) dims of its kernel after the layer axis
TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

  def __post_init__(self):
    bad = [t for t in self.targets if t not in TARGETS]
    if bad:
      raise ValueError(f"unknown LoRA target module(s) {bad}; valid targets: {', '.join(TARGETS)}")
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be positive, got {self.rank}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _in_out(cfg: ModelConfig, target: str) -> tuple[int, int, tuple[int, ...]]:
  shape = param_axes(cfg)[f"layers/{target}"][0]
  n_in = TARGETS[target]
  return math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:]), shape


def num_params(cfg: ModelConfig, lcfg: LoRAConfig) -> int:
  """Adapter parameters (A and B of every target in every layer)."""
  return cfg.num_layers * lcfg.rank * sum(sum(_in_out(cfg, t)[:2]) for t in lcfg.targets)


def init(cfg: ModelConfig, lcfg: LoRAConfig, key: jax.Array) -> Params:
  """A ~ N(0, 1/in) and B = 0, so training starts from the base model exactly."""
  have = [t for t in TARGETS if f"layers/{t}" in param_axes(cfg)]
  absent = [t for t in lcfg.targets if t not in have]
  if absent:
    raise ValueError(f"the {cfg.arch} model has no {', '.join(absent)} projection (e.g. no gate in a non-gated "
                     f"MLP); LoRA targets it has: {', '.join(have)}")
  out = {}
  for target, k in zip(lcfg.targets, jax.random.split(key, len(lcfg.targets))):
    d_in, d_out, _ = _in_out(cfg, target)
    out[target] = {"a": jax.random.normal(k, (cfg.num_layers, d_in, lcfg.rank), jnp.float32) / math.sqrt(d_in),
                   "b": jnp.zeros((cfg.num_layers, lcfg.rank, d_out), jnp.float32)}
  return out


def attach(base: Params, adapters: Params, lcfg: LoRAConfig) -> Params:
  """The base tree plus adapter leaves (adapter form); the base arrays are shared, not copied."""
  layers = dict(base["layers"])
  for target, ab in adapters.items():
    layers[f"{target}_lora_a"] = ab["a"]
    layers[f"{target}_lora_b"] = ab["b"] * lcfg.scale
  return {**base, "layers": layers}


def merge(cfg: ModelConfig, base: Params, adapters: Params, lcfg: LoRAConfig) -> Params:
  """Plain parameters with ``W + scale * A @ B`` folded into each target kernel."""
  layers = dict(base["layers"])
  for target, ab in adapters.items():
    *_, shape = _in_out(cfg, target)
    delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"]) * lcfg.scale
    layers[target] = (layers[target].astype(jnp.float32) + delta.reshape(shape)).astype(layers[target].dtype)
  return {**base, "layers": layers}
