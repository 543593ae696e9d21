"""Typed model configuration, built from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("gemma", "gemma3_text", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2")
_LLAMA_LIKE = ("gemma", "gemma3_text", "llama", "mistral", "qwen2")  # Llama's tensor names and hyper-parameter keys

# Hugging Face activation name -> ours ("gelu": erf GELU; "gelu_tanh": its tanh approximation)
_ACTS = {"silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class UnsupportedModelError(ValueError):
  """The checkpoint uses an architecture or setting this port does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of one decoder; hashable, so it can be a static jit argument.

  The family differences are explicit fields: the norm (``rms``; ``rms_1p``: Gemma's ``x * (1 + w)``;
  ``layer``: LayerNorm with bias), the MLP (``gated``: ``act(gate) * up``, else ``act(up)``), biases,
  positions (RoPE on the first ``rotary_dim`` dims of each head, and/or ``learned_positions``),
  ``parallel_residual`` (GPT-NeoX: attention and MLP both read the layer input), ``attn_scale``,
  ``embed_scale`` (Gemma: embeddings times sqrt(hidden)), windowed attention (``window_layers`` see
  keys at most ``sliding_window - 1`` positions back, with RoPE base ``local_rope_theta`` where set), and
  Gemma 3's per-head query/key norms (``qk_norm``) and norms on the attention and MLP outputs
  (``sandwich_norm``).
  """

  arch: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  norm_eps: float
  rope_theta: float
  rotary_dim: int  # 0: no RoPE
  attn_scale: float
  max_position_embeddings: int
  tie_embeddings: bool
  qkv_bias: bool
  o_bias: bool = False
  mlp_bias: bool = False
  norm: str = "rms"
  act: str = "silu"
  gated_mlp: bool = True
  parallel_residual: bool = False
  learned_positions: bool = False
  embed_scale: bool = False
  sliding_window: int = 0  # 0: none
  window_layers: tuple[int, ...] = ()
  local_rope_theta: float = 0.0  # RoPE base of the windowed layers; 0: rope_theta
  qk_norm: bool = False  # queries and keys normalised per head (weights [head_dim]) before RoPE
  sandwich_norm: bool = False  # attention and MLP outputs normalised before they join the residual
  # The original Hugging Face config, kept for export; excluded from hashing and equality.
  hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def mlp_kernels(self) -> int:
    return 3 if self.gated_mlp else 2

  def num_params(self) -> int:
    """Parameter count (embedding and head counted once each when untied)."""
    d, f, dh = self.hidden_size, self.intermediate_size, self.head_dim
    norm = 2 * d if self.norm == "layer" else d
    attn = d * dh * (2 * self.num_heads + 2 * self.num_kv_heads)
    bias = (dh * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0) + (d if self.o_bias else 0)
    mlp = self.mlp_kernels * d * f + (f + d if self.mlp_bias else 0)  # biases: non-gated MLPs only
    layer = attn + bias + mlp + 2 * norm + (2 * dh if self.qk_norm else 0) + (2 * norm if self.sandwich_norm else 0)
    head = 0 if self.tie_embeddings else self.vocab_size * d
    pos = self.max_position_embeddings * d if self.learned_positions else 0
    return self.num_layers * layer + self.vocab_size * d + head + pos + norm

  def to_hf_dict(self) -> dict[str, Any]:
    """A Hugging Face config dict for this model (the original one, with our shapes enforced)."""
    out = dict(self.hf_config)
    out.update(model_type=self.arch, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
               intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
               tie_word_embeddings=self.tie_embeddings)
    act = {"gelu_tanh": "gelu_new" if self.arch == "gpt_neo" else "gelu_pytorch_tanh"}.get(self.act, self.act)
    if self.arch == "gpt_neo":
      types = ["local" if i in self.window_layers else "global" for i in range(self.num_layers)]
      out.update(num_layers=self.num_layers, num_heads=self.num_heads, layer_norm_epsilon=self.norm_eps,
                 window_size=self.sliding_window, attention_layers=types,
                 attention_types=[[[t], 1] for t in types], activation_function=act)
    else:
      out.update(num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, hidden_act=act,
                 rope_theta=self.rope_theta)
      out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
      out.pop("rope_scaling", None)
    if self.arch == "gpt_neox":
      pct = self.rotary_dim / self.head_dim
      out["rope_parameters"]["partial_rotary_factor"] = pct
      out.update(layer_norm_eps=self.norm_eps, use_parallel_residual=self.parallel_residual,
                 attention_bias=self.o_bias, rotary_pct=pct, rotary_emb_base=self.rope_theta)
    if self.arch in _LLAMA_LIKE:
      out.update(num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.norm_eps)
    if self.arch == "mistral":
      out["sliding_window"] = self.sliding_window or None
    if self.arch == "gemma":
      out.pop("hidden_activation", None)
    if self.arch == "gemma3_text":
      out.pop("hidden_act", None)
      out["hidden_activation"] = act
      out["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
                                "full_attention": {"rope_type": "default", "rope_theta": self.rope_theta}}
      out["layer_types"] = ["sliding_attention" if i in self.window_layers else "full_attention"
                            for i in range(self.num_layers)]
      out["sliding_window"] = self.sliding_window
      out["query_pre_attn_scalar"] = round(self.attn_scale ** -2)  # an int in transformers
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
    heads = _first(hf, "num_attention_heads", "num_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
      raise UnsupportedModelError(f"{arch}: {heads} query heads are not a multiple of {kv_heads} KV heads")
    head_dim = hf.get("head_dim") or (256 if arch == "gemma3_text" else hf["hidden_size"] // heads)  # transformers
    num_layers = _first(hf, "num_hidden_layers", "num_layers")
    kw = dict(family(arch, hf, head_dim, num_layers))
    return cls(
        arch=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", arch in ("gemma", "gemma3_text", "gpt_neo"))),
        attn_scale=kw.pop("attn_scale", head_dim ** -0.5),
        hf_config=hf,
        **kw,
    )

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
    with open(path) as f:
      return cls.from_hf(json.load(f))


def family(arch: str, hf: dict, head_dim: int, num_layers: int) -> dict[str, Any]:
  """The family-specific ``ModelConfig`` fields of a Hugging Face config, validated."""
  if arch == "gpt_neo":
    types = hf.get("attention_layers") or [t for kinds, n in hf.get("attention_types", [[["global", "local"], 12]])
                                           for _ in range(n) for t in kinds]
    if len(types) != num_layers or not set(types) <= {"global", "local"}:
      raise UnsupportedModelError(f"gpt_neo: attention_layers {types} must be 'global'/'local', one per layer")
    return dict(norm="layer", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), rope_theta=0.0, rotary_dim=0,
                learned_positions=True, attn_scale=1.0, qkv_bias=False, o_bias=True, mlp_bias=True, gated_mlp=False,
                act=_act(hf, arch, "activation_function", ("gelu", "gelu_new", "gelu_pytorch_tanh")),
                sliding_window=int(hf.get("window_size", 256)),
                window_layers=tuple(i for i, t in enumerate(types) if t == "local"))
  if arch == "gemma3_text":
    return _gemma3(hf, head_dim, num_layers)
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type not in ("default", None):
    raise UnsupportedModelError(
        f"{arch}: rope scaling type {rope_type!r} is not implemented (only plain RoPE is); "
        "use a checkpoint without rope_scaling")
  theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0 if arch == "gpt_neox" else None)))
  if theta is None:
    raise UnsupportedModelError(f"{arch}: config has no rope_theta (top level or rope_parameters)")
  if arch == "gpt_neox":
    pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    bias = bool(hf.get("attention_bias", True))
    return dict(norm="layer", norm_eps=float(hf.get("layer_norm_eps", 1e-5)), rope_theta=float(theta),
                rotary_dim=int(head_dim * pct), qkv_bias=bias, o_bias=bias, mlp_bias=True, gated_mlp=False,
                parallel_residual=bool(hf.get("use_parallel_residual", True)),
                act=_act(hf, arch, "hidden_act", ("gelu", "gelu_new", "gelu_pytorch_tanh", "silu")))
  if arch != "qwen2" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise UnsupportedModelError(f"{arch}: attention_bias/mlp_bias are not supported")
  window = 0
  if arch == "mistral" and hf.get("sliding_window"):
    window = int(hf["sliding_window"])
  elif hf.get("use_sliding_window"):
    raise UnsupportedModelError(
        f"{arch}: sliding-window attention is implemented for mistral and gpt_neo only; "
        "use a checkpoint with full attention (use_sliding_window false)")
  kw = dict(norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rotary_dim=head_dim,
            qkv_bias=arch == "qwen2", sliding_window=window, window_layers=tuple(range(num_layers)) if window else ())
  if arch == "gemma":  # transformers reads the legacy hidden_act "gelu" of Gemma configs as the tanh GELU
    if hf.get("hidden_activation"):
      hf = {**hf, "hidden_act": hf["hidden_activation"]}
    act = _act(hf, arch, "hidden_act", ("gelu_pytorch_tanh", "gelu"))
    return dict(kw, norm="rms_1p", act="gelu_tanh" if act == "gelu" else act, embed_scale=True)
  return dict(kw, act=_act(hf, arch, "hidden_act", ("silu",)))


def _gemma3(hf: dict, head_dim: int, num_layers: int) -> dict[str, Any]:
  """Gemma 3's fields: Gemma's norm, activation and embedding scale, plus per-head q/k norms, norms on the block
  outputs, attention scaled by ``query_pre_attn_scalar``, and sliding-window layers (``layer_types``, or every
  layer but each ``sliding_window_pattern``-th) with their own RoPE base."""
  for key in ("final_logit_softcapping", "attn_logit_softcapping"):
    if hf.get(key):
      raise UnsupportedModelError(f"gemma3_text: {key}={hf[key]} is not implemented; use a checkpoint without it")
  if hf.get("use_bidirectional_attention") or hf.get("attention_bias"):
    raise UnsupportedModelError("gemma3_text: bidirectional attention and attention biases are not implemented")
  rope = hf.get("rope_parameters") or {}
  per_type = {t: dict(rope.get(t) or {}) for t in ("sliding_attention", "full_attention")}
  if any(p.get("rope_type", "default") != "default" for p in per_type.values()) or hf.get("rope_scaling"):
    raise UnsupportedModelError("gemma3_text: rope scaling is not implemented (only plain RoPE is); use a "
                                "checkpoint without it (e.g. the 270M and 1B models)")
  theta = per_type["full_attention"].get("rope_theta", hf.get("rope_theta", 1_000_000.0))
  local = per_type["sliding_attention"].get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
  pattern = int(hf.get("sliding_window_pattern") or 6)
  types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                    for i in range(num_layers)]
  if len(types) != num_layers or not set(types) <= {"sliding_attention", "full_attention"}:
    raise UnsupportedModelError(f"gemma3_text: layer_types {types} must be sliding/full_attention, one per layer")
  act = _act({**hf, "hidden_act": hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"},
             "gemma3_text", "hidden_act", ("gelu_pytorch_tanh", "gelu"))
  window = hf.get("sliding_window", 4096)  # transformers' default
  if not window and "sliding_attention" in types:
    raise UnsupportedModelError(f"gemma3_text: sliding layers need a sliding_window, got {window!r}")
  return dict(norm="rms_1p", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
              local_rope_theta=float(local), rotary_dim=head_dim, qkv_bias=False, embed_scale=True,
              act=act, qk_norm=True, sandwich_norm=True,
              attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5, sliding_window=int(window or 0),
              window_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"))


def _act(hf, arch, key, allowed):
  value = hf.get(key, allowed[0])
  if value not in allowed:
    raise UnsupportedModelError(f"{arch}: {key}={value!r} is not supported (supported: {allowed})")
  return _ACTS[value]


def _first(hf, *keys):
  """The value of the first of ``keys`` that ``hf`` sets (families name some sizes differently)."""
  for k in keys:
    if hf.get(k) is not None:
      return hf[k]
  raise UnsupportedModelError(f"{hf.get('model_type')}: config sets none of {keys}")


_HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "gemma": "GemmaForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "gpt_neo": "GPTNeoForCausalLM"}
