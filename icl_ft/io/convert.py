"""Checkpoint conversion: Hugging Face safetensors and GGUF tensors <-> our parameter tree.

Every source exposes tensors under their Hugging Face names in the HF ``[out, in]`` layout; one
table (``_hf_layout``) maps them to our leaves. Loading goes leaf by leaf: ``jax.make_array_from_callback``
builds each of this host's shards of a leaf from the HF tensors it covers (a stacked layer leaf reads every
layer's tensor once per shard), so host memory holds this host's shards of one leaf plus the tensors being
read, never the whole state dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import Params, param_axes


class CheckpointError(ValueError):
  """A checkpoint is missing, truncated, or does not match the model config."""


class TensorSource:
  """Read-only access to HF-named tensors as float32 numpy arrays."""

  def keys(self) -> set[str]:
    raise NotImplementedError

  def get(self, name: str) -> np.ndarray:
    raise NotImplementedError


class SafetensorsSource(TensorSource):
  """A local HF directory with ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

  def __init__(self, directory: str | os.PathLike):
    from safetensors import safe_open
    d = Path(directory)
    if not d.is_dir():
      raise CheckpointError(f"checkpoint directory {str(d)!r} does not exist")
    index = d / "model.safetensors.index.json"
    if index.exists():
      files = {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (d / "model.safetensors").exists():
      files = None
    else:
      raise CheckpointError(
          f"{str(d)!r} has neither model.safetensors nor model.safetensors.index.json; "
          "save the model with save_pretrained(..., safe_serialization=True)")
    self._handles: dict[Path, Any] = {}
    paths = set(files.values()) if files else {d / "model.safetensors"}
    for p in sorted(paths):
      if not p.exists():
        raise CheckpointError(f"safetensors shard {str(p)!r} listed in the index is missing")
      try:
        self._handles[p] = safe_open(str(p), framework="numpy")
      except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise CheckpointError(f"cannot read {str(p)!r} (truncated or corrupt safetensors file): {e}") from e
    if files is None:
      (only,) = self._handles
      files = {k: only for k in self._handles[only].keys()}
    self._files = files

  def keys(self) -> set[str]:
    return set(self._files)

  def get(self, name: str) -> np.ndarray:
    path = self._files[name]
    try:
      return np.asarray(self._handles[path].get_tensor(name), dtype=np.float32)
    except Exception as e:
      raise CheckpointError(f"cannot read tensor {name!r} from {str(path)!r} (truncated or corrupt file?): {e}") from e


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


# Per GGUF architecture: its layer tensor names where they differ from Llama's (Gemma 3: the norm before the MLP
# is ffn_norm, plus q/k norms and the norms on the block outputs).
_GGUF_ARCH_LAYER_NAMES = {
    "llama": {}, "qwen2": {},
    "gemma3": {"ffn_norm.weight": "pre_feedforward_layernorm.weight",
               "post_attention_norm.weight": "post_attention_layernorm.weight",
               "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
               "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"},
}
_GGUF_NORM_SHIFT = {"gemma3": 1.0}  # llama.cpp stores Gemma's (1 + w) norm weights as 1 + w


def _gguf_reader(path: str | os.PathLike):
  """(the ``gguf`` reader of ``path``, its architecture); a ``CheckpointError`` for a missing, unreadable or
  unsupported file."""
  import gguf
  if not Path(path).is_file():
    raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:
    raise CheckpointError(f"cannot read GGUF file {str(path)!r} (truncated or corrupt?): {e}") from e
  field = reader.fields.get("general.architecture")
  arch = field.contents() if field else "?"
  if arch not in _GGUF_ARCH_LAYER_NAMES:
    raise CheckpointError(f"GGUF file {str(path)!r} holds a {arch!r} model; GGUF loading supports "
                          f"{', '.join(_GGUF_ARCH_LAYER_NAMES)} (convert other models from their Hugging Face "
                          "directory instead)")
  return reader, arch


def gguf_config_overrides(path: str | os.PathLike) -> dict[str, Any]:
  """Settings of a GGUF file that transformers' GGUF config mapping drops (RoPE scaling, logit softcapping, the
  sliding layers' RoPE base and pattern), as Hugging Face config keys, so ``ModelConfig.from_hf`` applies or
  refuses them instead of loading the model with other numerics."""
  reader, arch = _gguf_reader(path)
  get = lambda key: reader.fields[f"{arch}.{key}"].contents() if f"{arch}.{key}" in reader.fields else None
  out: dict[str, Any] = {}
  if get("rope.scaling.type") not in (None, "none"):
    out["rope_scaling"] = {"rope_type": get("rope.scaling.type"), "factor": get("rope.scaling.factor")}
  for key in ("final_logit_softcapping", "attn_logit_softcapping"):
    if get(key):
      out[key] = get(key)
  if get("rope.freq_base_swa") is not None:
    out["rope_local_base_freq"] = get("rope.freq_base_swa")
  if get("attention.sliding_window_pattern") is not None:
    out["sliding_window_pattern"] = get("attention.sliding_window_pattern")
  return out


def gguf_has_tokenizer(path: str | os.PathLike) -> bool:
  """Whether a GGUF file carries its tokenizer (llama.cpp's ``tokenizer.ggml.*`` metadata)."""
  import gguf
  return "tokenizer.ggml.model" in gguf.GGUFReader(path).fields


class GGUFSource(TensorSource):
  """A llama.cpp GGUF file of one of ``_GGUF_ARCH_LAYER_NAMES``' architectures, dequantized tensor by tensor
  with the ``gguf`` package's own dequantizer (every quantization type it knows: K-quants, Q5_0, Q8_0, ...).

  llama.cpp permutes the q/k rows of Llama checkpoints for its interleaved rotary layout, and stores Gemma's
  norm weights with 1 added; both are undone here so the tensors are the HF ones.
  """

  def __init__(self, path: str | os.PathLike, cfg: ModelConfig):
    import gguf
    reader, self._arch = _gguf_reader(path)
    layer_names = dict(_GGUF_LAYER_NAMES, **_GGUF_ARCH_LAYER_NAMES[self._arch])
    self._cfg = cfg
    self._tensors = {}
    for t in reader.tensors:
      name = _GGUF_NAMES.get(t.name)
      if name is None and t.name.startswith("blk."):
        _, layer, rest = t.name.split(".", 2)
        if rest in layer_names:
          name = f"model.layers.{layer}.{layer_names[rest]}"
      if name is not None:
        self._tensors[name] = t
    self._dequantize = gguf.quants.dequantize

  def keys(self) -> set[str]:
    return set(self._tensors)

  def get(self, name: str) -> np.ndarray:
    t = self._tensors[name]
    w = np.asarray(self._dequantize(t.data, t.tensor_type), dtype=np.float32)
    w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # ggml order is [in, out]
    if self._cfg.arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = self._cfg.num_heads if "q_proj" in name else self._cfg.num_kv_heads
      w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
    if name.endswith("norm.weight"):
      w = w - _GGUF_NORM_SHIFT.get(self._arch, 0.0)
    return w


# Our leaf path -> its HF tensor name ({i}: the layer), per family. A name listed for several leaves is a
# fused tensor (GPT-NeoX's query_key_value, [H, 3, dh] on its output dim): each leaf is one slice of it.
_LLAMA_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "layers/attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers/mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"layers/{n}": f"model.layers.{{i}}.self_attn.{n}_proj.weight" for n in "qkvo"},
    **{f"layers/{n}_bias": f"model.layers.{{i}}.self_attn.{n}_proj.bias" for n in "qkv"},
    **{f"layers/{n}": f"model.layers.{{i}}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")},
    "lm_head": "lm_head.weight",
}
_NEOX_QKV = "gpt_neox.layers.{i}.attention.query_key_value."
_HF_NAMES = {
    "gpt_neox": {
        "embed": "gpt_neox.embed_in.weight",
        "final_norm": "gpt_neox.final_layer_norm.weight",
        "layers/attn_norm": "gpt_neox.layers.{i}.input_layernorm.weight",
        "layers/mlp_norm": "gpt_neox.layers.{i}.post_attention_layernorm.weight",
        **{f"layers/{n}": _NEOX_QKV + "weight" for n in "qkv"},
        **{f"layers/{n}_bias": _NEOX_QKV + "bias" for n in "qkv"},
        "layers/o": "gpt_neox.layers.{i}.attention.dense.weight",
        "layers/up": "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight",
        "layers/down": "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight",
        "lm_head": "embed_out.weight",
    },
    "gpt_neo": {
        "embed": "transformer.wte.weight",
        "pos_embed": "transformer.wpe.weight",
        "final_norm": "transformer.ln_f.weight",
        "layers/attn_norm": "transformer.h.{i}.ln_1.weight",
        "layers/mlp_norm": "transformer.h.{i}.ln_2.weight",
        **{f"layers/{n}": f"transformer.h.{{i}}.attn.attention.{n}_proj.weight" for n in "qkv"},
        "layers/o": "transformer.h.{i}.attn.attention.out_proj.weight",
        "layers/up": "transformer.h.{i}.mlp.c_fc.weight",
        "layers/down": "transformer.h.{i}.mlp.c_proj.weight",
        "lm_head": "lm_head.weight",
    },
}
_HF_NAMES["gemma3_text"] = dict(
    _LLAMA_NAMES, **{
        "layers/mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
        "layers/post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "layers/post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
        "layers/q_norm": "model.layers.{i}.self_attn.q_norm.weight",
        "layers/k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    })
# Names that transformers may also save a tensor under (>= 5 renames GPT-NeoX's embed_out to lm_head).
_ALIASES = {"embed_out.weight": "lm_head.weight"}


def _hf_names(cfg: ModelConfig) -> dict[str, str]:
  names = dict(_HF_NAMES.get(cfg.arch, _LLAMA_NAMES))
  for path in ("final_norm", "layers/attn_norm", "layers/mlp_norm", "layers/o", "layers/up", "layers/down"):
    names.setdefault(f"{path}_bias", names[path].replace(".weight", ".bias"))
  return names


def _hf_layout(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
  """Our leaf path -> (HF name, {i} for the layer; HF->ours transform; ours->HF transform).

  A fused tensor's ours->HF transforms give per-leaf slices that ``iter_hf_tensors`` joins."""
  D, Hq, Hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  ident = lambda w: w
  T = lambda w: w.T
  heads_in = lambda h: (lambda w: w.T.reshape(D, h, dh), lambda w: w.reshape(D, h * dh).T)
  bias = lambda h: (lambda w: w.reshape(h, dh), lambda w: w.reshape(h * dh))
  fused = lambda j: (lambda w: w.reshape(Hq, 3, dh, D)[:, j].transpose(2, 0, 1), lambda w: w.transpose(1, 2, 0))
  fused_bias = lambda j: (lambda w: w.reshape(Hq, 3, dh)[:, j], ident)
  table = {
      "layers/o": (lambda w: w.T.reshape(Hq, dh, D), lambda w: w.reshape(Hq * dh, D).T),
      **{f"layers/{n}": (T, T) for n in ("gate", "up", "down")},
      "lm_head": (T, T),
  }
  for j, (n, h) in enumerate((("q", Hq), ("k", Hkv), ("v", Hkv))):
    is_fused = cfg.arch == "gpt_neox"
    table[f"layers/{n}"] = fused(j) if is_fused else heads_in(h)
    table[f"layers/{n}_bias"] = fused_bias(j) if is_fused else bias(h)
  names = _hf_names(cfg)
  return {path: (names[path], *table.get(path, (ident, ident))) for path in param_axes(cfg)}


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def load_params(cfg: ModelConfig, source: TensorSource, shardings: Mapping[str, jax.sharding.Sharding],
                dtype: Any) -> Params:
  """Streams ``source`` into a parameter tree whose leaf ``path`` lives on ``shardings[path]``."""
  available = source.keys()
  layout = {path: (_ALIASES[name] if name not in available and name in _ALIASES else name, *rest)
            for path, (name, *rest) in _hf_layout(cfg).items()}
  missing = sorted(name.format(i=0) for name, _, _ in layout.values() if name.format(i=0) not in available)
  if missing:
    raise CheckpointError(f"checkpoint lacks tensors the {cfg.arch} config needs: {missing[:5]}")
  params: dict = {}
  axes = param_axes(cfg)
  for path, (name, to_ours, _) in layout.items():
    shape = axes[path][0]
    layered = path.startswith("layers/")

    def read(i, name=name, to_ours=to_ours, path=path, shape=shape, layered=layered):
      hf_name = name.format(i=i)
      w = to_ours(source.get(hf_name))
      expected = shape[1:] if layered else shape
      if w.shape != tuple(expected):
        raise CheckpointError(f"tensor {hf_name!r} has shape {w.shape} after conversion to {path!r}, "
                              f"but the config implies {tuple(expected)}")
      return w

    def shard(index, read=read, layered=layered):
      if not layered:
        return read(0)[index].astype(dtype)
      rows = range(*index[0].indices(shape[0]))
      return np.stack([read(i)[index[1:]] for i in rows]).astype(dtype)

    _set(params, path, jax.make_array_from_callback(shape, shardings[path], shard))
  return params


def iter_hf_tensors(cfg: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, HF-layout float array) for every tensor of ``params``; the slices of a fused
  tensor are stacked on axis 1 and merged with axis 0 (GPT-NeoX's [H, 3, dh, ...])."""
  groups: dict[str, list] = {}
  for path, (name, _, to_hf) in _hf_layout(cfg).items():
    leaf = params
    for p in path.split("/"):
      leaf = leaf[p]
    groups.setdefault(name, []).append((np.asarray(jax.device_get(leaf), dtype=np.float32), to_hf))
  for name, leaves in groups.items():
    for i in range(cfg.num_layers) if "{i}" in name else (None,):
      parts = [to_hf(leaf if i is None else leaf[i]) for leaf, to_hf in leaves]
      w = parts[0] if len(parts) == 1 else np.stack(parts, axis=1).reshape(-1, *parts[0].shape[2:])
      yield name.format(i=i), np.ascontiguousarray(w)


def export_hf(cfg: ModelConfig, params: Params, directory: str | os.PathLike, tokenizer=None) -> Path:
  """Writes ``config.json`` + ``model.safetensors`` (float32) that ``transformers`` loads."""
  from safetensors.numpy import save_file
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  tensors = dict(iter_hf_tensors(cfg, params))
  tmp = d / "model.safetensors.tmp"
  save_file(tensors, str(tmp), metadata={"format": "pt"})
  os.replace(tmp, d / "model.safetensors")
  hf = cfg.to_hf_dict()
  hf["dtype"] = "float32"
  (d / "config.json").write_text(json.dumps(hf, indent=2, default=str))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(d))
  return d
