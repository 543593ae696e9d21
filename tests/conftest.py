"""Shared fixtures: tiny random Hugging Face models built and saved by the tests themselves."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rms_norm_eps=1e-6)


# Tiny settings of each family that exercise what sets it apart (window 8 < the tested lengths).
FAMILY = {
    "llama": {}, "qwen2": {},
    "mistral": dict(sliding_window=8),
    "gemma": dict(head_dim=16, hidden_act="gelu_pytorch_tanh"),  # 4 heads x 16 != hidden 32, as Gemma-7B
    # Gemma 3: a sliding layer (window 8, its own RoPE base) then a global one, attention scaled by a
    # query_pre_attn_scalar other than head_dim
    "gemma3_text": dict(head_dim=16, hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
                        rope_local_base_freq=1000.0),
    "gpt_neox": dict(rotary_pct=0.5, hidden_act="gelu"),
    "gpt_neo": dict(window_size=8, attention_types=[[["global", "local"], 1]], activation_function="gelu_new",
                    bos_token_id=0, eos_token_id=0),
}
_RENAME = {"gpt_neo": {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                       "rms_norm_eps": "layer_norm_epsilon"},
           "gpt_neox": {"rms_norm_eps": "layer_norm_eps", "rope_theta": "rotary_emb_base"}}


def build_hf_model(arch="llama", kv_heads=2, tied=False, seed=0, **overrides):
  """A tiny random transformers model (biases and norm weights randomised too), float32, eager."""
  import torch
  import transformers
  torch.manual_seed(seed)
  kw = dict(TINY, num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=10000.0 + 17 * seed)
  if arch in ("gpt_neo", "gpt_neox"):  # multi-head attention only
    assert kv_heads == TINY["num_attention_heads"], arch
    del kw["num_key_value_heads"]
  if arch == "gpt_neo":
    del kw["rope_theta"]
  kw = {_RENAME.get(arch, {}).get(k, k): v for k, v in kw.items()}
  kw.update(FAMILY[arch], attn_implementation="eager", **overrides)
  config = transformers.AutoConfig.for_model(arch, **kw)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      norm = "norm" in name or ".ln_" in name
      if name.endswith("bias") or norm:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if norm and name.endswith("weight") else 0.0))
  return model


@pytest.fixture(scope="session")
def hf_dir_factory(tmp_path_factory):
  """Returns make(arch, kv_heads, tied) -> (directory, torch model), cached per combination."""
  made = {}

  def make(arch="llama", kv_heads=2, tied=False, **overrides):
    key = (arch, kv_heads, tied, tuple(sorted(overrides.items())))
    if key not in made:
      model = build_hf_model(arch, kv_heads, tied, **overrides)
      d = tmp_path_factory.mktemp(f"{arch}-kv{kv_heads}-{'tied' if tied else 'untied'}")
      model.save_pretrained(d)
      made[key] = (d, model)
    return made[key]

  return make


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("ICL_FT_CACHE", str(tmp_path / "icl_ft_cache"))


def torch_logits(model, ids, attention_mask=None, position_ids=None):
  import torch
  kw = {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in
        (("attention_mask", attention_mask), ("position_ids", position_ids)) if v is not None}
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.numpy()


def jax_logits(m, ids, valid=None):
  """Our jitted float32 logits of a loaded model for (left-padded) ``ids``."""
  import jax.numpy as jnp
  from icl_ft.model.decoder import forward, positions_from_valid
  ids = jnp.asarray(ids)
  valid = jnp.ones(ids.shape, bool) if valid is None else jnp.asarray(valid)
  logits, _ = jax.jit(forward, static_argnums=0)(m.config, m.params, ids, positions_from_valid(valid), valid)
  return np.asarray(logits)


def build_byte_tokenizer():
  """A byte-level tokenizer (256 byte tokens + <eos>) built offline: exact round trip of any text."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab["<eos>"] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
  """(directory, torch model, tokenizer): a tiny random Qwen2 LM with a byte tokenizer, saved like a hub checkpoint."""
  tok = build_byte_tokenizer()
  model = build_hf_model("qwen2", kv_heads=2, tied=False, seed=5, vocab_size=len(tok), max_position_embeddings=4096,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  d = tmp_path_factory.mktemp("tiny-lm")
  model.save_pretrained(d)
  tok.save_pretrained(d)
  return d, model, tok


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  """The embedded SmolLM2-135M GGUF's own tokenizer (byte-level BPE, GPT-2 style pre-tokenizer)."""
  from transformers import AutoTokenizer
  from icl_ft.io import loading
  path = loading.embedded_gguf_path()
  return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2_vocab_lm(tmp_path_factory, smollm2_tokenizer):
  """(directory, torch model, tokenizer): a tiny random Llama over SmolLM2's real 49,152-token vocabulary."""
  tok = smollm2_tokenizer
  model = build_hf_model("llama", kv_heads=2, seed=11, vocab_size=len(tok), max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  d = tmp_path_factory.mktemp("smollm2-vocab-lm")
  model.save_pretrained(d)
  tok.save_pretrained(d)
  return d, model, tok


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """``gs://`` paths served from a local directory through etils.epath's backend table; returns that directory.

  Exercises the code path of an object-store work directory without a network (the scheme must survive every
  path operation; a mangled ``gs:/`` path would land in the current directory instead)."""
  from etils.epath import backend, gpath
  root = tmp_path / "gcs"
  root.mkdir()
  local = lambda p: str(root / os.fspath(p).removeprefix("gs://"))
  remote = lambda p: "gs://" + os.path.relpath(p, root)

  class Bucket(type(backend.os_backend)):
    def open(self, path, mode):
      return super().open(local(path), mode)

    def glob(self, path):
      return [remote(p) for p in super().glob(local(path))]

    def walk(self, top, *a, **k):
      for r, dirs, names in super().walk(local(top), *a, **k):
        yield remote(r), dirs, names

    def __getattribute__(self, name):
      attr = super().__getattribute__(name)
      if name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "rmtree", "remove", "stat"):
        return lambda path, *a, **k: attr(local(path), *a, **k)
      if name in ("rename", "replace", "copy"):
        return lambda path, dst, *a, **k: attr(local(path), local(dst), *a, **k)
      return attr

  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", Bucket())
  import importlib.machinery
  import sys
  import types
  fake = types.ModuleType("gcsfs")  # the real backend's package, which the fake stands in for
  fake.__spec__ = importlib.machinery.ModuleSpec("gcsfs", None)
  monkeypatch.setitem(sys.modules, "gcsfs", fake)
  return root
