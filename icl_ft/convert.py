"""Checkpoint conversion: Hugging Face safetensors and GGUF tensors <-> our parameter tree.

Every source exposes tensors under their Hugging Face names in the HF ``[out, in]`` layout; one
table (``_hf_layout``) maps them to our leaves. Loading is streamed: each device shard is built by
``jax.make_array_from_callback`` from the few HF tensors it covers, so host memory holds at most
one layer's tensor at a time and never the whole state dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from icl_ft.config import ModelConfig
from icl_ft.model import Params, param_axes


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
_GGUF_LAYER_NAMES = {
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


class GGUFSource(TensorSource):
  """A llama.cpp GGUF file, dequantized tensor by tensor with the ``gguf`` package.

  llama.cpp permutes the q/k rows of Llama checkpoints for its interleaved rotary layout; we undo
  that permutation here so the tensors are in the HF rotate-half layout.
  """

  def __init__(self, path: str | os.PathLike, cfg: ModelConfig):
    import gguf
    if not Path(path).is_file():
      raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    try:
      reader = gguf.GGUFReader(str(path))
    except Exception as e:
      raise CheckpointError(f"cannot read GGUF file {str(path)!r} (truncated or corrupt?): {e}") from e
    self._cfg = cfg
    self._tensors = {}
    for t in reader.tensors:
      name = _GGUF_NAMES.get(t.name)
      if name is None and t.name.startswith("blk."):
        _, layer, rest = t.name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
          name = f"model.layers.{layer}.{_GGUF_LAYER_NAMES[rest]}"
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
    return w


def _hf_layout(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
  """Our leaf path -> (HF name, {i} for the layer; HF->ours transform; ours->HF transform)."""
  D, Hq, Hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  ident = lambda w: w
  T = lambda w: w.T
  heads_in = lambda h: (lambda w: w.T.reshape(D, h, dh), lambda w: w.reshape(D, h * dh).T)
  bias = lambda h: (lambda w: w.reshape(h, dh), lambda w: w.reshape(h * dh))
  attn = "model.layers.{i}.self_attn."
  mlp = "model.layers.{i}.mlp."
  table = {
      "embed": ("model.embed_tokens.weight", ident, ident),
      "final_norm": ("model.norm.weight", ident, ident),
      "layers/attn_norm": ("model.layers.{i}.input_layernorm.weight", ident, ident),
      "layers/mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", ident, ident),
      "layers/q": (attn + "q_proj.weight", *heads_in(Hq)),
      "layers/k": (attn + "k_proj.weight", *heads_in(Hkv)),
      "layers/v": (attn + "v_proj.weight", *heads_in(Hkv)),
      "layers/o": (attn + "o_proj.weight", lambda w: w.T.reshape(Hq, dh, D), lambda w: w.reshape(Hq * dh, D).T),
      "layers/gate": (mlp + "gate_proj.weight", T, T),
      "layers/up": (mlp + "up_proj.weight", T, T),
      "layers/down": (mlp + "down_proj.weight", T, T),
      "lm_head": ("lm_head.weight", T, T),
  }
  for n, h in (("q", Hq), ("k", Hkv), ("v", Hkv)):
    table[f"layers/{n}_bias"] = (attn + f"{n}_proj.bias", *bias(h))
  return {path: table[path] for path in param_axes(cfg)}


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def load_params(cfg: ModelConfig, source: TensorSource, shardings: Mapping[str, jax.sharding.Sharding],
                dtype: Any) -> Params:
  """Streams ``source`` into a parameter tree whose leaf ``path`` lives on ``shardings[path]``."""
  available = source.keys()
  layout = _hf_layout(cfg)
  missing = sorted(name.format(i=0) for name, _, _ in layout.values() if name.format(i=0) not in available)
  if missing:
    raise CheckpointError(f"checkpoint lacks tensors the {cfg.arch} config needs: {missing[:5]}")
  params: dict = {}
  for path, (shape, _) in param_axes(cfg).items():
    name, to_ours, _ = layout[path]
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
  """Yields (HF name, HF-layout float array) for every tensor of ``params``."""
  for path, (name, _, to_hf) in _hf_layout(cfg).items():
    leaf = params
    for p in path.split("/"):
      leaf = leaf[p]
    leaf = np.asarray(jax.device_get(leaf), dtype=np.float32)
    if path.startswith("layers/"):
      for i in range(cfg.num_layers):
        yield name.format(i=i), np.ascontiguousarray(to_hf(leaf[i]))
    else:
      yield name, np.ascontiguousarray(to_hf(leaf))


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
