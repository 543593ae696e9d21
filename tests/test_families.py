"""GPT-NeoX (Pythia), GPT-Neo, Gemma and sliding-window Mistral: parity with transformers at random weights
(float32), padding and KV-cache equivalences across the window, export, real-size configs, and the ICL,
patching and fine-tuning code paths on a tiny model of each family."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_byte_tokenizer, build_hf_model, jax_logits as _logits, torch_logits
from icl_ft.io import convert
from icl_ft.training import dataset as ft_data
from icl_ft.evaluation import engine as icl
from icl_ft.evaluation import decoding as inference
from icl_ft.io import loading
from icl_ft.model import lora
from icl_ft.interp import patching
from icl_ft.training import trainer as training
from icl_ft.model.config import ModelConfig, UnsupportedModelError
from icl_ft.model.decoder import positions_from_valid

CASES = {  # id -> (arch, kv_heads, tied, overrides); windows are 8 tokens (conftest.FAMILY)
    "gpt_neox": ("gpt_neox", 4, False, {}),
    "gpt_neox-sequential-nobias": ("gpt_neox", 4, False, dict(use_parallel_residual=False, attention_bias=False)),
    "gpt_neo": ("gpt_neo", 4, True, {}),
    "gemma": ("gemma", 4, True, {}),
    "gemma-mqa": ("gemma", 1, True, {}),
    "mistral-window": ("mistral", 2, False, {}),
    "mistral-full": ("mistral", 2, False, dict(sliding_window=None)),  # the registry's full-attention Mistral
    "gemma3": ("gemma3_text", 1, True, {}),
}
FAMILIES = ["gpt_neox", "gpt_neo", "gemma", "mistral-window", "gemma3"]


def _load(hf_dir_factory, case):
  arch, kv, tied, overrides = CASES[case]
  d, ref = hf_dir_factory(arch, kv, tied, **overrides)
  return loading.load(str(d), use_cache=False), ref


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(hf_dir_factory, case):
  m, ref = _load(hf_dir_factory, case)
  c = m.config
  assert c.arch == CASES[case][0]
  assert c.rotary_dim == {"gpt_neox": 4, "gpt_neo": 0}.get(c.arch, c.head_dim)  # Pythia: rotary_pct 0.5 of 8
  assert c.window_layers == {"gpt_neo": (1,), "mistral": (0, 1) if c.sliding_window else (),
                             "gemma3_text": (0,)}.get(c.arch, ())
  ids = np.random.default_rng(0).integers(0, 96, (3, 40))  # 40 tokens: five windows
  theirs = torch_logits(ref, ids)
  diff = np.abs(_logits(m, ids) - theirs).max()
  print(f"{case}: max |logits diff| = {diff:.2e}")
  assert diff <= 1e-5, diff
  if c.sliding_window:  # the window is live at this length: without it the logits differ, by > 10x the tolerance
    unwindowed = dataclasses.replace(m, config=dataclasses.replace(c, sliding_window=0))
    assert np.abs(_logits(unwindowed, ids) - theirs).max() > 1e-4
  for field in ("local_rope_theta", "qk_norm", "sandwich_norm"):  # and each Gemma 3 difference is live
    if getattr(c, field):
      off = dataclasses.replace(m, config=dataclasses.replace(c, **{field: type(getattr(c, field))()}))
      assert np.abs(_logits(off, ids) - theirs).max() > 1e-4, field


@pytest.mark.parametrize("case", FAMILIES)
def test_left_padding_and_cached_decoding(hf_dir_factory, case):
  m, ref = _load(hf_dir_factory, case)
  rng = np.random.default_rng(1)
  seqs = [list(rng.integers(0, 96, n)) for n in (5, 23, 14)]
  ids, valid = inference.left_pad(seqs, pad_id=0)
  batched = _logits(m, ids, valid)
  theirs = torch_logits(ref, ids, valid, positions_from_valid(valid))  # positions matter for GPT-Neo's wpe
  new, step_logits = inference.greedy_generate(m.config, m.params, jnp.asarray(ids), jnp.asarray(valid), 12)
  for i, s in enumerate(seqs):
    np.testing.assert_allclose(batched[i, -len(s):], theirs[i, -len(s):], atol=1e-5)
    full = list(s) + list(np.asarray(new[i]))
    alone = _logits(m, [full])[0]
    np.testing.assert_allclose(batched[i, -len(s):], alone[:len(s)], atol=1e-5)
    # the cached decode crosses the window: its logits equal the full forward pass of the continuation
    np.testing.assert_allclose(np.asarray(step_logits[i]), alone[len(s) - 1:len(full) - 1], atol=1e-5)


@pytest.mark.parametrize("case", ["gpt_neox", "gpt_neo", "gemma", "gemma3"])
def test_greedy_generation_matches_transformers_generate(hf_dir_factory, case):
  import torch
  m, ref = _load(hf_dir_factory, case)
  seq = list(np.random.default_rng(3).integers(0, 96, 11))
  ours, _ = inference.greedy_generate(m.config, m.params, jnp.asarray([seq]), jnp.ones((1, 11), bool), 10)
  theirs = ref.generate(torch.tensor([seq]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 11:]
  assert list(np.asarray(ours[0])) == theirs.tolist()


@pytest.mark.parametrize("case", [*FAMILIES, "mistral-full"])
def test_export_round_trip(hf_dir_factory, tmp_path, case):
  from transformers import AutoModelForCausalLM
  m, _ = _load(hf_dir_factory, case)
  out = convert.export_hf(m.config, m.params, tmp_path / "export")
  ids = np.random.default_rng(5).integers(0, 96, (2, 20))
  reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
  assert np.abs(torch_logits(reloaded, ids) - _logits(m, ids)).max() <= 1e-5
  again = loading.load(str(out), use_cache=False)
  assert again.config == m.config
  jax.tree.map(np.testing.assert_array_equal, again.params, m.params)


REAL = {  # the study's checkpoints' config.json (the fields that matter)
    "pythia-1.4b": dict(model_type="gpt_neox", hidden_act="gelu", hidden_size=2048, intermediate_size=8192,
                        layer_norm_eps=1e-5, max_position_embeddings=2048, num_attention_heads=16,
                        num_hidden_layers=24, rotary_emb_base=10000, rotary_pct=0.25, tie_word_embeddings=False,
                        use_parallel_residual=True, vocab_size=50304),
    "gpt-neo-1.3b": dict(model_type="gpt_neo", activation_function="gelu_new", hidden_size=2048,
                         intermediate_size=None, layer_norm_epsilon=1e-5, max_position_embeddings=2048,
                         attention_types=[[["global", "local"], 12]], num_heads=16, num_layers=24, vocab_size=50257,
                         window_size=256),
    "gemma-7b": dict(model_type="gemma", attention_bias=False, head_dim=256, hidden_act="gelu", hidden_size=3072,
                     intermediate_size=24576, max_position_embeddings=8192, num_attention_heads=16,
                     num_hidden_layers=28, num_key_value_heads=16, rms_norm_eps=1e-6, rope_scaling=None,
                     rope_theta=10000.0, vocab_size=256000),
    "mistral-7b-v0.1": dict(model_type="mistral", hidden_act="silu", hidden_size=4096, intermediate_size=14336,
                            max_position_embeddings=32768, num_attention_heads=32, num_hidden_layers=32,
                            num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                            tie_word_embeddings=False, vocab_size=32000),
    "gemma-3-270m": dict(model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh", hidden_size=640,
                         intermediate_size=2048, head_dim=256, num_attention_heads=4, num_key_value_heads=1,
                         num_hidden_layers=18, query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                         rope_local_base_freq=10_000.0, sliding_window=512, sliding_window_pattern=6,
                         max_position_embeddings=32768, vocab_size=262144, final_logit_softcapping=None,
                         attn_logit_softcapping=None),
}


@pytest.mark.parametrize("name", REAL)
def test_real_configs(name):
  import torch
  import transformers
  hf = REAL[name]
  cfg = ModelConfig.from_hf(hf)
  expected = {"pythia-1.4b": dict(rotary_dim=32, parallel_residual=True, norm="layer", act="gelu", gated_mlp=False),
              "gpt-neo-1.3b": dict(intermediate_size=8192, attn_scale=1.0, act="gelu_tanh", sliding_window=256,
                                   window_layers=tuple(range(1, 24, 2)), tie_embeddings=True, learned_positions=True),
              "gemma-7b": dict(head_dim=256, act="gelu_tanh", norm="rms_1p", embed_scale=True, tie_embeddings=True),
              "mistral-7b-v0.1": dict(sliding_window=4096, window_layers=tuple(range(32))),
              "gemma-3-270m": dict(attn_scale=1 / 16, rope_theta=1e6, local_rope_theta=1e4, qk_norm=True,
                                   sandwich_norm=True, tie_embeddings=True, sliding_window=512,
                                   window_layers=tuple(i for i in range(18) if (i + 1) % 6))}[name]
  assert {k: getattr(cfg, k) for k in expected} == expected
  assert ModelConfig.from_hf(cfg.to_hf_dict()) == cfg
  hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
  assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_registry_pythia_is_the_releases_v0_checkpoint():
  assert loading.REGISTRY["pythia-1.4b"] == "EleutherAI/pythia-1.4b-v0"  # the release's final grid (docs/study.md)


def test_registry_names():
  assert loading.REGISTRY["gpt-neo-1.3b"] == "EleutherAI/gpt-neo-1.3B"
  assert loading.REGISTRY["gemma-7b"] == "google/gemma-7b"
  assert loading.REGISTRY["mistral-7b-v0.1"] == "mistralai/Mistral-7B-v0.1"


# --- the ICL, patching and fine-tuning code paths on a tiny model of each family (byte tokenizer) ---


@pytest.fixture(scope="module")
def family_lm(tmp_path_factory):
  """family -> (directory, torch model, tokenizer, loaded model), built on first use."""
  made = {}
  tok = build_byte_tokenizer()

  def get(case):
    if case not in made:
      arch, kv, tied, overrides = CASES[case]
      model = build_hf_model(arch, kv, tied, seed=5, vocab_size=len(tok), max_position_embeddings=1024,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **overrides)
      d = tmp_path_factory.mktemp(f"lm-{case}")
      model.save_pretrained(d)
      tok.save_pretrained(d)
      made[case] = (d, model, tok, loading.load(str(d), use_cache=False))
    return made[case]

  return get


@pytest.mark.parametrize("case", FAMILIES)
def test_icl_engine_equals_transformers_generate(family_lm, case):
  import torch
  _, ref, tok, m = family_lm(case)
  qs = icl.icl_queries("parity", "misleading", "paper", 1, 2, seed=3)
  engine = icl.EngineConfig(batch_size=2, length_multiple=32, progress=False)
  records, skipped = icl.run(m, qs, engine)
  assert skipped == []
  for q, r in zip(qs, records):
    ids = tok(q.prompt).input_ids
    assert len(ids) > 8  # longer than the window
    out = ref.generate(torch.tensor([ids]), max_new_tokens=q.strict_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(ids):]
    assert r["completion"] == tok.decode(out, skip_special_tokens=True)
    with torch.no_grad():
      ans = tok(q.gold, add_special_tokens=False).input_ids
      logp = torch.log_softmax(ref(torch.tensor([ids + ans])).logits[0], -1)
    assert abs(r["logprob_gold"] - sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(ans))) < 1e-4


@pytest.mark.parametrize("case", FAMILIES)
def test_patching_paths(family_lm, case):
  *_, m = family_lm(case)
  cfg, params = m.config, m.params
  B, T = 2, 16
  rng = np.random.default_rng(0)
  clean = rng.integers(0, 256, (B, T)).astype(np.int32)
  corrupt = clean.copy()
  corrupt[:, 3] = (clean[:, 3] + 7) % 256
  mk = lambda ids: patching.Batch(jnp.asarray(ids), jnp.ones((B, T), bool), jnp.full((B,), T - 1),
                                  jnp.asarray([1, 2]), jnp.asarray([3, 4]))
  clean_ld, cache = patching.capture(cfg, params, mk(clean), taps=("resid_pre", "attn_z"))
  # Replacing the whole residual stream at any layer reproduces the clean run: the layer-by-layer re-run in
  # patching (model.block with attention_mask) equals the scanned forward, windowed layers included.
  resid = patching.patch_sweep(cfg, params, mk(corrupt), cache, "resid_pre", ("layer",))
  np.testing.assert_allclose(np.asarray(resid[:, 0]), np.broadcast_to(clean_ld, (cfg.num_layers, B)), atol=1e-4)
  heads = patching.patch_sweep(cfg, params, mk(corrupt), cache, "attn_z", ("layer", "head"), chunk=4)
  mask = jnp.zeros((cfg.num_layers, 1, 1, cfg.num_heads, 1)).at[1, :, :, 2].set(1.0)
  one = patching.patched_metric(cfg, params, mk(corrupt), "attn_z", cache["attn_z"], mask)
  np.testing.assert_allclose(np.asarray(heads[1, 2]), np.asarray(one), atol=1e-5)
  atp = patching.attribution_patch(cfg, params, mk(corrupt), cache, ("attn_z",))
  assert np.isfinite(np.asarray(atp["attn_z"])).all()


TRAIN = training.TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, weight_decay=0.1, save_every=10,
                             peak_flops=1e9)


def test_full_fine_tuning_of_a_windowed_family(family_lm, tmp_path):
  *_, tok, m = family_lm("gpt_neo")
  ds = ft_data.build(ft_data.FTDataConfig(tasks=("parity",), n_per_task=4, length_multiple=32), tok)
  res = training.train(m.config, m.params, ds, TRAIN, tmp_path, progress=False)
  assert all(np.isfinite(r["loss"]) for r in res.metrics)
  assert set(res.params["layers"]) == set(m.params["layers"])  # the window layout is config, not a parameter
  assert not np.allclose(np.asarray(res.params["layers"]["q"]), np.asarray(m.params["layers"]["q"]))


def test_lora_targets_of_a_non_gated_mlp(family_lm, tmp_path):
  *_, tok, m = family_lm("gpt_neox")
  ds = ft_data.build(ft_data.FTDataConfig(tasks=("parity",), n_per_task=4, length_multiple=32), tok)
  with pytest.raises(ValueError, match="no gate projection.*LoRA targets it has: q, k, v, o, up, down"):
    training.train(m.config, m.params, ds, dataclasses.replace(TRAIN, lora=lora.LoRAConfig()), tmp_path,
                   progress=False)
  lcfg = lora.LoRAConfig(rank=2, targets=("q", "k", "v", "o", "up", "down"))
  res = training.train(m.config, m.params, ds, dataclasses.replace(TRAIN, lora=lcfg), tmp_path / "lora",
                       progress=False)
  assert all(np.isfinite(r["loss"]) for r in res.metrics)


def test_gemma3_config_defaults_follow_transformers_and_export_keeps_the_attention_scale():
  hf = dict(REAL["gemma-3-270m"])
  del hf["sliding_window"], hf["hidden_activation"], hf["head_dim"]
  cfg = ModelConfig.from_hf(hf)  # transformers' defaults: window 4096, tanh GELU, head_dim 256
  assert (cfg.sliding_window, cfg.act, cfg.head_dim) == (4096, "gelu_tanh", 256)
  with pytest.raises(UnsupportedModelError, match="sliding layers need a sliding_window"):
    ModelConfig.from_hf(dict(hf, sliding_window=None))
  odd = ModelConfig.from_hf(dict(REAL["gemma-3-270m"], query_pre_attn_scalar=24))
  bare = dataclasses.replace(odd, hf_config={})
  assert ModelConfig.from_hf(bare.to_hf_dict()).attn_scale == pytest.approx(24 ** -0.5)


def test_a_padding_slot_past_the_position_table_leaves_valid_rows_finite(hf_dir_factory):
  # GPT-Neo's learned positions: a padded (invalid) slot whose position id lies past the table must not
  # fill NaN that the attention's zero weights then spread into the valid slots' values
  from icl_ft.model import decoder
  m, _ = _load(hf_dir_factory, "gpt_neo")
  ids, valid = inference.left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
  positions = np.asarray(positions_from_valid(valid))
  logits, *_ = decoder.forward(m.config, m.params, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(valid))
  far = np.where(valid, positions, m.config.max_position_embeddings + 50)  # only invalid slots move
  moved, *_ = decoder.forward(m.config, m.params, jnp.asarray(ids), jnp.asarray(far), jnp.asarray(valid))
  np.testing.assert_allclose(np.asarray(moved)[valid], np.asarray(logits)[valid], atol=1e-6)
