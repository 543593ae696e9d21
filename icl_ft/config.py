"""Typed model configuration, built from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
  """The checkpoint uses an architecture or setting this port does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of one decoder; hashable, so it can be a static jit argument."""

  arch: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  max_position_embeddings: int
  tie_embeddings: bool
  qkv_bias: bool
  # The original Hugging Face config, kept for export; excluded from hashing and equality.
  hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def num_params(self) -> int:
    """Parameter count (embedding and head counted once each when untied)."""
    d, f, dh = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * dh * (2 * self.num_heads + 2 * self.num_kv_heads)
    bias = dh * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
    layer = attn + bias + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.num_layers * layer + self.vocab_size * d + head + d

  def to_hf_dict(self) -> dict[str, Any]:
    """A Hugging Face config dict for this model (the original one, with our shapes enforced)."""
    out = dict(self.hf_config)
    out.update(
        model_type=self.arch,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_embeddings,
        rope_theta=self.rope_theta,
        hidden_act="silu",
    )
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
    out.pop("rope_scaling", None)
    if self.arch == "llama":
      out.update(attention_bias=False, mlp_bias=False)
    out.setdefault("architectures", [_HF_CLASS[self.arch]])
    return out

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
    """Validates a Hugging Face config dict and builds the typed config."""
    hf = dict(hf)
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
      raise UnsupportedModelError(
          f"model_type {arch!r} is not supported; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    _require(hf, "hidden_act", ("silu",), arch)
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
      raise UnsupportedModelError(
          f"{arch}: rope scaling type {rope_type!r} is not implemented (only plain RoPE is); "
          "use a checkpoint without rope_scaling")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
      raise UnsupportedModelError(f"{arch}: config has no rope_theta (top level or rope_parameters)")
    if hf.get("use_sliding_window") or (arch == "mistral" and hf.get("sliding_window")):
      window = hf.get("sliding_window")
      if window is not None and window < hf.get("max_position_embeddings", 0):
        raise UnsupportedModelError(
            f"{arch}: sliding-window attention (window {window}) is not implemented; "
            "use a checkpoint with full attention (sliding_window null)")
    if arch in ("llama", "mistral") and (hf.get("attention_bias") or hf.get("mlp_bias")):
      raise UnsupportedModelError(f"{arch}: attention_bias/mlp_bias are not supported")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
      raise UnsupportedModelError(f"{arch}: {heads} query heads are not a multiple of {kv_heads} KV heads")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return cls(
        arch=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        hf_config=hf,
    )

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
    with open(path) as f:
      return cls.from_hf(json.load(f))


_HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _require(hf, key, allowed, arch):
  value = hf.get(key, allowed[0])
  if value not in allowed:
    raise UnsupportedModelError(f"{arch}: {key}={value!r} is not supported (supported: {allowed})")
