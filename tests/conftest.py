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


def build_hf_model(arch="llama", kv_heads=2, tied=False, seed=0, **overrides):
  """A tiny random transformers model (biases and norm weights randomised too), float32, eager."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
  torch.manual_seed(seed)
  kw = dict(TINY, num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=10000.0 + 17 * seed,
            attn_implementation="eager", **overrides)
  config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
  model = model_cls(config_cls(**kw)).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
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


def torch_logits(model, ids, attention_mask=None):
  import torch
  with torch.no_grad():
    kw = {} if attention_mask is None else {"attention_mask": torch.tensor(np.asarray(attention_mask), dtype=torch.long)}
    return model(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.numpy()


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
