"""Parity of the JAX decoder with transformers' PyTorch models at random weights (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jax_logits as _jax_logits, torch_logits
from icl_ft.evaluation import decoding as inference
from icl_ft.io import loading
from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import KVCache, positions_from_valid

CASES = [  # (arch, kv_heads, tied): GQA, MHA, tied and untied heads, with and without q/k/v biases
    ("llama", 2, False), ("llama", 4, True), ("qwen2", 2, True), ("qwen2", 1, False)]


@pytest.mark.parametrize("arch,kv_heads,tied", CASES)
def test_logits_match_transformers(hf_dir_factory, arch, kv_heads, tied):
  d, ref = hf_dir_factory(arch, kv_heads, tied)
  m = loading.load(str(d), use_cache=False)
  assert m.config.arch == arch and m.config.tie_embeddings == tied and m.config.qkv_bias == (arch == "qwen2")
  ids = np.random.default_rng(0).integers(0, 96, (3, 40))
  diff = np.abs(_jax_logits(m, ids) - torch_logits(ref, ids)).max()
  assert diff <= 1e-5, diff


@pytest.mark.parametrize("arch,kv_heads,tied", CASES[:3:2])
def test_left_padded_batch_equals_single_sequences(hf_dir_factory, arch, kv_heads, tied):
  d, ref = hf_dir_factory(arch, kv_heads, tied)
  m = loading.load(str(d), use_cache=False)
  rng = np.random.default_rng(1)
  seqs = [list(rng.integers(0, 96, n)) for n in (5, 17, 12)]
  ids, valid = inference.left_pad(seqs, pad_id=0)
  batched = _jax_logits(m, ids, valid)
  for i, s in enumerate(seqs):
    alone = _jax_logits(m, [s])[0]
    np.testing.assert_allclose(batched[i, -len(s):], alone, atol=1e-5)
    # transformers with the same left padding agrees too
    np.testing.assert_allclose(batched[i, -len(s):], torch_logits(ref, ids, valid)[i, -len(s):], atol=1e-5)


def test_cached_decoding_equals_full_forward(hf_dir_factory):
  d, _ = hf_dir_factory("qwen2", 2, True)
  m = loading.load(str(d), use_cache=False)
  rng = np.random.default_rng(2)
  seqs = [list(rng.integers(0, 96, n)) for n in (9, 4, 14)]
  ids, valid = inference.left_pad(seqs, pad_id=0)
  new, step_logits = inference.greedy_generate(m.config, m.params, jnp.asarray(ids), jnp.asarray(valid), 6)
  new, step_logits = np.asarray(new), np.asarray(step_logits)
  for i, s in enumerate(seqs):
    full = list(s) + list(new[i])
    logits = _jax_logits(m, [full])[0]
    # logits at the last prompt token and after each generated token (but the last) chose the tokens
    np.testing.assert_allclose(step_logits[i], logits[len(s) - 1:len(full) - 1], atol=1e-5)
    assert list(np.argmax(logits[len(s) - 1:len(full) - 1], -1)) == list(new[i])


@pytest.mark.parametrize("arch,kv_heads,tied", CASES[1:3])
def test_greedy_generation_matches_transformers_generate(hf_dir_factory, arch, kv_heads, tied):
  import torch
  d, ref = hf_dir_factory(arch, kv_heads, tied)
  m = loading.load(str(d), use_cache=False)
  seq = list(np.random.default_rng(3).integers(0, 96, 11))
  ours, _ = inference.greedy_generate(m.config, m.params, jnp.asarray([seq]), jnp.ones((1, 11), bool), 8)
  theirs = ref.generate(torch.tensor([seq]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 11:]
  assert list(np.asarray(ours[0])) == theirs.tolist()


def test_decode_positions_continue_per_sequence():
  cache = KVCache.empty(ModelConfig.from_hf(dict(
      model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
      num_attention_heads=2, rope_theta=1e4)), 2, 6)
  assert cache.k.shape == (1, 2, 2, 6, 4) and not cache.valid.any()
  np.testing.assert_array_equal(positions_from_valid(jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)),
                                [[0, 0, 0, 1], [0, 1, 2, 3]])


def test_bfloat16_params_run_and_stay_close(hf_dir_factory):
  d, ref = hf_dir_factory("llama", 2, False)
  m = loading.load(str(d), dtype="bfloat16", use_cache=False)
  assert m.params["layers"]["q"].dtype == jnp.bfloat16
  ids = np.random.default_rng(4).integers(0, 96, (2, 16))
  logits = _jax_logits(m, ids)
  assert logits.dtype == np.float32
  # bf16 rounding only: far from the 1e-5 float32 bound, but clearly the same function
  assert np.abs(logits - torch_logits(ref, ids)).max() < 0.1
