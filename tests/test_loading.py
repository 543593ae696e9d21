"""Loading, caching, export and the errors bad checkpoints must raise."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import torch_logits
from icl_ft.io import convert
from icl_ft.io import loading
from icl_ft.model.config import ModelConfig, UnsupportedModelError
from icl_ft.model.decoder import forward, positions_from_valid


def _logits(m, ids):
  ids = np.asarray(ids)
  valid = np.ones(ids.shape, bool)
  return np.asarray(forward(m.config, m.params, ids, positions_from_valid(valid), valid)[0])


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def test_export_then_transformers_load_gives_same_logits(hf_dir_factory, tmp_path):
  from transformers import AutoModelForCausalLM
  d, _ = hf_dir_factory("qwen2", 2, False)
  m = loading.load(str(d), use_cache=False)
  out = convert.export_hf(m.config, m.params, tmp_path / "export")
  back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
  ids = np.random.default_rng(0).integers(0, 96, (2, 20))
  assert np.abs(torch_logits(back, ids) - _logits(m, ids)).max() <= 1e-5
  again = loading.load(str(out), use_cache=False)  # and our own loader reads the export back exactly
  jax.tree.map(np.testing.assert_array_equal, again.params, m.params)


def test_orbax_cache_round_trip(hf_dir_factory, tmp_path):
  d, _ = hf_dir_factory("llama", 2, True)
  first = loading.load(str(d))
  entries = list(loading.cache_root().iterdir())
  assert len(entries) == 1 and (entries[0] / "COMPLETE").exists()
  (entries[0] / "params").rename(entries[0] / "moved")  # the second load must come from the cache...
  with pytest.raises(Exception):
    loading.load(str(d))
  (entries[0] / "moved").rename(entries[0] / "params")
  second = loading.load(str(d))
  assert second.config == first.config
  jax.tree.map(np.testing.assert_array_equal, second.params, first.params)


def test_sharded_index_checkpoint(hf_dir_factory, tmp_path):
  d, ref = hf_dir_factory("llama", 2, False)
  out = tmp_path / "sharded"
  ref.save_pretrained(out, max_shard_size="20KB")
  assert (out / "model.safetensors.index.json").exists()
  m = loading.load(str(out), use_cache=False)
  ids = np.arange(12)[None] % 96
  assert np.abs(torch_logits(ref, ids) - _logits(m, ids)).max() <= 1e-5


def test_missing_directory():
  with pytest.raises(loading.ModelNotFoundError, match="Registered models: smollm2-135m"):
    loading.load("./no/such/dir")


def test_unknown_name_lists_registry():
  with pytest.raises(loading.ModelNotFoundError, match="qwen1.5-0.5b"):
    loading.load("no-such-model")


def test_hub_id_without_hub_access_says_how_to_pass_a_directory(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(loading.ModelNotFoundError, match="pass the local directory|pass the\\s+directory"):
    loading.load("qwen1.5-0.5b")


def test_missing_safetensors(hf_dir_factory, tmp_path):
  d = _copy(hf_dir_factory("llama")[0], tmp_path)
  (d / "model.safetensors").unlink()
  with pytest.raises(convert.CheckpointError, match="neither model.safetensors"):
    loading.load(str(d), use_cache=False)


def test_truncated_safetensors(hf_dir_factory, tmp_path):
  d = _copy(hf_dir_factory("llama")[0], tmp_path)
  f = d / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(convert.CheckpointError, match="truncated or corrupt"):
    loading.load(str(d), use_cache=False)


def test_missing_shard_of_index(hf_dir_factory, tmp_path):
  d, ref = hf_dir_factory("llama")
  out = tmp_path / "sharded"
  ref.save_pretrained(out, max_shard_size="20KB")
  next(out.glob("model-00002-*.safetensors")).unlink()
  with pytest.raises(convert.CheckpointError, match="listed in the index is missing"):
    loading.load(str(out), use_cache=False)


def test_unknown_architecture_lists_supported(hf_dir_factory, tmp_path):
  d = _copy(hf_dir_factory("llama")[0], tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = "mamba"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedModelError, match="supported architectures: gemma, gemma3_text, gpt_neo, gpt_neox, llama, mistral, qwen2"):
    loading.load(str(d), use_cache=False)


def test_shape_mismatch_names_the_tensor(hf_dir_factory, tmp_path):
  d = _copy(hf_dir_factory("llama")[0], tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(convert.CheckpointError, match="mlp.gate_proj.weight"):
    loading.load(str(d), use_cache=False)


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope scaling type 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}, "sliding-window"),
])
def test_unsupported_settings_are_rejected(change, match):
  hf = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=2, rope_theta=1e4, max_position_embeddings=64)
  hf.update(change)
  with pytest.raises(UnsupportedModelError, match=match):
    ModelConfig.from_hf(hf)


def test_rope_theta_accepted_at_top_level_and_in_rope_parameters():
  base = dict(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
              num_attention_heads=2)
  assert ModelConfig.from_hf({**base, "rope_theta": 1e6}).rope_theta == 1e6
  assert ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 2e6}}).rope_theta == 2e6


def test_gemma3_is_assembled_once_with_its_checksum_and_a_bad_part_is_refused(tmp_path, monkeypatch):
  import importlib
  pkg = importlib.import_module(loading.GEMMA3_PACKAGE)
  parts = pkg.chunk_paths()
  monkeypatch.setenv("ICL_FT_CACHE", str(tmp_path / "cache"))
  bad = tmp_path / "part00"
  bad.write_bytes(parts[0].read_bytes()[:1000])  # a truncated part
  monkeypatch.setattr(pkg, "chunk_paths", lambda: [bad, *parts[1:]])
  with pytest.raises(convert.CheckpointError, match="a part file is truncated or altered"):
    loading.resolve("gemma3-270m")
  assert not list((tmp_path / "cache" / "gguf").iterdir())  # no file left that a later load would use
  monkeypatch.setattr(pkg, "chunk_paths", lambda: [tmp_path / "missing", *parts[1:]])
  with pytest.raises(loading.ModelNotFoundError, match="gemma3-270m needs the PyPI packages"):
    loading.resolve("gemma3-270m")
  monkeypatch.setattr(pkg, "chunk_paths", lambda: parts)
  # Naming, checking or sizing the model assembles nothing; loading it does.
  assert loading.sizing_config("gemma3-270m").num_params() == 268_098_176
  assert loading.model_facts("gemma3-270m", "float32")["params"] == 268_098_176
  assert not Path(loading.check_name("gemma3-270m")).exists()
  path = loading.resolve("gemma3-270m")
  assert Path(path).stat().st_size == sum(p.stat().st_size for p in parts)
  monkeypatch.setattr(pkg, "chunk_paths", lambda: [bad, *parts[1:]])
  assert loading.resolve("gemma3-270m") == path  # assembled once: later calls reuse it


def test_a_gguf_of_another_architecture_is_refused_by_name(tmp_path):
  import gguf
  path = tmp_path / "mamba.gguf"
  w = gguf.GGUFWriter(str(path), "mamba")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=8, hidden_size=4, intermediate_size=8,
                                 num_hidden_layers=1, num_attention_heads=1, rope_theta=1e4))
  with pytest.raises(convert.CheckpointError, match="holds a 'mamba' model; GGUF loading supports llama, qwen2, gemma3"):
    convert.GGUFSource(path, cfg)


def _write_qwen2_gguf(model, path, quant):
  """A Qwen2-layout GGUF of a transformers model (the gguf package's writer; matrices in ``quant``, norms and
  biases in F32), and the weights it holds, dequantized, as an HF state dict."""
  import gguf
  import torch
  c = model.config
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
           **{f"self_attn.{n}_proj.{p}": f"attn_{n}.{p}" for n in "qkv" for p in ("weight", "bias")},
           "self_attn.o_proj.weight": "attn_output.weight",
           **{f"mlp.{n}_proj.weight": f"ffn_{n}.weight" for n in ("gate", "up", "down")}}
  w = gguf.GGUFWriter(str(path), "qwen2")
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  twin = {}
  for name, t in model.state_dict().items():
    if name.startswith("model.layers."):
      i, rest = name[len("model.layers."):].split(".", 1)
      gname = f"blk.{i}.{layer[rest]}"
    else:
      gname = names[name]
    x = t.float().numpy()
    if x.ndim == 2:
      q = gguf.quants.quantize(x, quant)
      w.add_tensor(gname, q, raw_dtype=quant)
      x = gguf.quants.dequantize(q, quant).reshape(x.shape)
    else:
      w.add_tensor(gname, x)
    twin[name] = torch.from_numpy(np.ascontiguousarray(x))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return twin


def test_a_qwen2_gguf_loads_to_the_logits_of_its_safetensors_twin(hf_dir_factory, tmp_path):
  """The gguf writer cannot produce K-quants; Q8_0 and Q5_0 here (the real Gemma 3 file covers Q4_K and Q6_K)."""
  import gguf
  d, model = hf_dir_factory("qwen2", 2, False)
  ids = np.random.default_rng(2).integers(0, 96, (2, 24))
  for quant in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0):
    twin = _write_qwen2_gguf(model, tmp_path / f"tiny-{quant.name}.gguf", quant)
    twin_dir = _copy(d, tmp_path / quant.name)
    reference = type(model)(model.config)
    reference.load_state_dict(twin)
    reference.save_pretrained(twin_dir)
    ours = loading.load(str(tmp_path / f"tiny-{quant.name}.gguf"), use_cache=False)
    assert ours.config.arch == "qwen2" and ours.config.qkv_bias
    from_twin = loading.load(str(twin_dir), use_cache=False)
    assert np.abs(_logits(ours, ids) - _logits(from_twin, ids)).max() <= 1e-5
    assert np.abs(_logits(ours, ids) - torch_logits(reference.eval(), ids)).max() <= 1e-5


def _gemma3_gguf(path, **extra):
  """A tensor-less Gemma 3 GGUF with the metadata llama.cpp writes (and ``extra`` keys of the gemma3 namespace)."""
  import gguf
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_context_length(128)
  w.add_embedding_length(32)
  w.add_block_count(4)
  w.add_feed_forward_length(64)
  w.add_head_count(2)
  w.add_head_count_kv(1)
  w.add_key_length(16)
  w.add_value_length(16)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_freq_base(1e6)
  w.add_sliding_window(8)
  w.add_vocab_size(96)
  for key, value in extra.items():
    add = w.add_string if isinstance(value, str) else w.add_uint32 if isinstance(value, int) else w.add_float32
    add(f"gemma3.{key}", value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("extra, error", [
    ({"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}, "rope scaling is not implemented"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not implemented"),
])
def test_gguf_settings_transformers_drops_are_refused_not_ignored(tmp_path, extra, error):
  """transformers' GGUF config mapping drops RoPE scaling and softcapping (the 4B+ Gemma 3 files have scaling):
  loaded, such a model would compute other numerics; it is refused."""
  plain = loading.model_config(str(_gemma3_gguf(tmp_path / "plain.gguf")))
  assert (plain.arch, plain.sliding_window, plain.window_layers) == ("gemma3_text", 8, (0, 1, 2, 3))
  with pytest.raises(UnsupportedModelError, match=error):
    loading.model_config(str(_gemma3_gguf(tmp_path / "x.gguf", **extra)))


def test_a_gguf_of_another_architecture_is_refused_by_name_through_load(tmp_path):
  import gguf
  path = tmp_path / "mamba.gguf"
  w = gguf.GGUFWriter(str(path), "mamba")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(convert.CheckpointError, match="holds a 'mamba' model; GGUF loading supports llama, qwen2, gemma3"):
    loading.load(str(path), use_cache=False)


def test_gguf_sliding_pattern_and_local_rope_base_come_from_the_file(tmp_path):
  """transformers fills layer_types and the sliding layers' RoPE base from its defaults; the file's win."""
  cfg = loading.model_config(str(_gemma3_gguf(tmp_path / "g.gguf", **{"attention.sliding_window_pattern": 2,
                                                                       "rope.freq_base_swa": 5000.0})))
  assert (cfg.window_layers, cfg.local_rope_theta, cfg.rope_theta) == ((0, 2), 5000.0, 1e6)
