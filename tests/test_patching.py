"""Patching transforms and sweeps against PyTorch forward hooks on the transformers model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as reference
from icl_ft.io import loading
from icl_ft.interp import patching
from icl_ft.stats.effects import npe
from icl_ft.model.decoder import Hooks, run

T, B = 10, 3


@pytest.fixture(scope="module")
def setup(hf_dir_factory):
  d, ref = hf_dir_factory("qwen2", 2, False)
  m = loading.load(str(d), use_cache=False)
  rng = np.random.default_rng(0)
  clean = rng.integers(0, 96, (B, T)).astype(np.int32)
  corrupt = clean.copy()
  corrupt[:, 3] = (clean[:, 3] + 7) % 96
  corrupt[:, 6] = (clean[:, 6] + 11) % 96
  gold, foil = rng.integers(0, 96, B).astype(np.int32), rng.integers(0, 96, B).astype(np.int32)
  mk = lambda ids: patching.Batch(jnp.asarray(ids), jnp.ones((B, T), bool), jnp.full((B,), T - 1), jnp.asarray(gold),
                                  jnp.asarray(foil))
  return m, ref, mk(clean), mk(corrupt), (clean, corrupt, gold, foil)


def test_head_sweep_matches_torch_hooks(setup):
  m, ref, clean, corrupt, (c_ids, x_ids, gold, foil) = setup
  _, cache = patching.capture(m.config, m.params, clean, taps=("attn_z",))
  effects = np.asarray(patching.patch_sweep(m.config, m.params, corrupt, cache, "attn_z", ("layer", "head"), chunk=3))
  H, dh = m.config.num_heads, m.config.head_dim
  assert effects.shape == (m.config.num_layers, H, B)
  for layer in range(m.config.num_layers):
    o_proj = ref.model.layers[layer].self_attn.o_proj
    src = reference.capture(ref, c_ids, o_proj, pre=True)
    for h in range(H):
      index = (Ellipsis, slice(h * dh, (h + 1) * dh))
      expected = reference.logit_diff(ref, x_ids, gold, foil, [(o_proj, reference.splice(src, index), True)])
      np.testing.assert_allclose(effects[layer, h], expected, atol=1e-4)


def test_residual_position_sweep_matches_torch_hooks(setup):
  m, ref, clean, corrupt, (c_ids, x_ids, gold, foil) = setup
  _, cache = patching.capture(m.config, m.params, clean, taps=("resid_pre",))
  effects = np.asarray(patching.patch_sweep(m.config, m.params, corrupt, cache, "resid_pre", ("layer", "pos"), chunk=4))
  assert effects.shape == (m.config.num_layers, T, B)
  for layer in range(m.config.num_layers):
    mod = ref.model.layers[layer]
    src = reference.capture(ref, c_ids, mod, pre=True)
    for pos in (0, 3, 6, T - 1):
      expected = reference.logit_diff(ref, x_ids, gold, foil, [(mod, reference.splice(src, (slice(None), pos)), True)])
      np.testing.assert_allclose(effects[layer, pos], expected, atol=1e-4)


def test_mlp_layer_sweep_matches_torch_hooks(setup):
  m, ref, clean, corrupt, (c_ids, x_ids, gold, foil) = setup
  _, cache = patching.capture(m.config, m.params, clean, taps=("mlp_out",))
  effects = np.asarray(patching.patch_sweep(m.config, m.params, corrupt, cache, "mlp_out", ("layer",)))
  for layer in range(m.config.num_layers):
    mlp = ref.model.layers[layer].mlp
    src = reference.capture(ref, c_ids, mlp, pre=False)
    expected = reference.logit_diff(ref, x_ids, gold, foil, [(mlp, lambda mod, a, out, src=src: src, False)])
    np.testing.assert_allclose(effects[layer, 0], expected, atol=1e-4)


def test_sweep_equals_patches_one_by_one(setup):
  m, _, clean, corrupt, _ = setup
  _, cache = patching.capture(m.config, m.params, clean, taps=("attn_z",))
  swept = np.asarray(patching.patch_sweep(m.config, m.params, corrupt, cache, "attn_z", ("layer", "head", "pos"), chunk=7))
  L, H = m.config.num_layers, m.config.num_heads
  assert swept.shape == (L, H * T, B)
  for layer, h, pos in ((0, 0, 3), (1, 2, 6), (1, 3, T - 1), (0, 1, 0)):
    mask = np.zeros((L, 1, T, H, 1), np.float32)
    mask[layer, 0, pos, h] = 1
    one = patching.patched_metric(m.config, m.params, corrupt, "attn_z", cache["attn_z"], jnp.asarray(mask))
    np.testing.assert_allclose(swept[layer, h * T + pos], np.asarray(one), atol=1e-5)


def test_per_head_outputs_sum_to_attention_output(setup):
  m, _, clean, _, _ = setup
  _, cache = patching.capture(m.config, m.params, clean, taps=("attn_z", "attn_out"))
  per_head = jnp.einsum("lbthk,lhkd->lbthd", cache["attn_z"], m.params["layers"]["o"])
  np.testing.assert_allclose(np.asarray(per_head.sum(3)), np.asarray(cache["attn_out"]), atol=1e-5)


def test_full_residual_patch_recovers_and_empty_patch_does_nothing(setup):
  m, _, clean, corrupt, _ = setup
  clean_ld, cache = patching.capture(m.config, m.params, clean, taps=("resid_post",))
  corrupt_ld, _ = patching.capture(m.config, m.params, corrupt)
  L = m.config.num_layers
  full = np.zeros((L, 1, 1, 1), np.float32)
  full[L - 1] = 1
  for mask, expected in ((full, 1.0), (np.zeros_like(full), 0.0)):
    ld = patching.patched_metric(m.config, m.params, corrupt, "resid_post", cache["resid_post"], jnp.asarray(mask))
    effect, _ = npe(np.asarray(ld)[:, None], np.asarray(corrupt_ld), np.asarray(clean_ld), tol=0.0)
    assert abs(float(effect[0]) - expected) < 1e-5


def test_attribution_equals_exact_effect_to_first_order(setup):
  m, _, clean, corrupt, _ = setup
  L = m.config.num_layers
  _, tgt = patching.capture(m.config, m.params, corrupt, taps=("resid_mid", "attn_z"))
  base, _ = patching.capture(m.config, m.params, corrupt)
  rng = np.random.default_rng(1)
  for site in ("resid_mid", "attn_z"):
    d = jnp.asarray(rng.normal(size=tgt[site].shape).astype(np.float32))
    for eps in (1e-3,):
      src = {site: tgt[site] + eps * d}
      est = patching.attribution_patch(m.config, m.params, corrupt, src, (site,))[site]
      for layer in range(L):
        mask = np.zeros((L,) + (1,) * (tgt[site].ndim - 1), np.float32)
        mask[layer] = 1
        exact = patching.patched_metric(m.config, m.params, corrupt, site, src[site], jnp.asarray(mask)) - base
        approx = est[layer].reshape(B, -1).sum(-1)
        np.testing.assert_allclose(np.asarray(approx), np.asarray(exact), rtol=2e-2, atol=1e-4)


def test_bad_input(setup):
  m, _, clean, corrupt, _ = setup
  with pytest.raises(ValueError, match="valid sites: resid_pre, q, k, v"):
    patching.capture(m.config, m.params, clean, taps=("resid",))
  with pytest.raises(ValueError, match="valid sites"):
    run(m.config, m.params, clean.tokens, clean.positions, clean.valid, hooks=Hooks(taps=("mlp_in",)))
  _, cache = patching.capture(m.config, m.params, clean, taps=("attn_z",))
  with pytest.raises(ValueError, match="does not broadcast"):
    patching.patched_metric(m.config, m.params, corrupt, "attn_z", cache["attn_z"], jnp.ones((2, 1, T, 5, 1)))
  short = patching.Batch(corrupt.tokens[:, :-2], corrupt.valid[:, :-2], corrupt.answer_pos - 2, corrupt.gold, corrupt.foil)
  with pytest.raises(ValueError, match="same batch size and token length"):
    patching.patch_sweep(m.config, m.params, short, cache, "attn_z")
  with pytest.raises(ValueError, match="no head axis"):
    patching.patch_sweep(m.config, m.params, corrupt, {"mlp_out": cache["attn_z"]}, "mlp_out", ("layer", "head"))


def test_shared_prefix_gives_the_full_runs_numbers(setup):
  """Runs that start after a cached common prefix (left padding included) give the full runs' metrics,
  sweeps, list patches and attribution, restricted to the suffix."""
  m, _, clean, corrupt, _ = setup
  pad = lambda b: patching.Batch(b.tokens, b.valid.at[0, :2].set(False), b.answer_pos, b.gold, b.foil)
  clean, corrupt = pad(clean), pad(corrupt)
  start = 3  # the first position where the prompts differ
  c2, x2 = patching.shared_prefix(m.config, m.params, clean, corrupt, start)
  assert c2.tokens.shape == (B, T - start)
  full_ld, full = patching.capture(m.config, m.params, clean, taps=("attn_z", "mlp_out", "resid_pre"))
  ld, cut = patching.capture(m.config, m.params, c2, taps=("attn_z", "mlp_out", "resid_pre"))
  np.testing.assert_allclose(np.asarray(ld), np.asarray(full_ld), atol=1e-5)
  np.testing.assert_allclose(np.asarray(cut["attn_z"]), np.asarray(full["attn_z"][:, :, start:]), atol=1e-5)
  heads = patching.patch_sweep(m.config, m.params, corrupt, full, "attn_z", ("layer", "head"), chunk=3)
  np.testing.assert_allclose(np.asarray(patching.patch_sweep(m.config, m.params, x2, cut, "attn_z", ("layer", "head"),
                                                             chunk=3)), np.asarray(heads), atol=1e-5)
  resid = np.asarray(patching.patch_sweep(m.config, m.params, corrupt, full, "resid_pre", ("layer", "pos")))
  np.testing.assert_allclose(np.asarray(patching.patch_sweep(m.config, m.params, x2, cut, "resid_pre", ("layer", "pos"))),
                             resid[:, start:], atol=1e-5)
  target, _ = patching.capture(m.config, m.params, corrupt)
  np.testing.assert_allclose(resid[:, :start], np.broadcast_to(np.asarray(target), resid[:, :start].shape), atol=1e-5)
  layers, which = jnp.asarray([1, 0, 1]), jnp.asarray([2, 0, 3])
  masks = patching.head_masks(m.config, "attn_z", which)
  listed = patching.patch_list(m.config, m.params, x2, cut, "attn_z", layers, masks, chunk=2)
  np.testing.assert_allclose(np.asarray(listed), np.asarray(heads)[np.asarray(layers), np.asarray(which)], atol=1e-5)
  atp = patching.attribution_patch(m.config, m.params, x2, cut, ("mlp_out",))["mlp_out"]
  atp_full = patching.attribution_patch(m.config, m.params, corrupt, full, ("mlp_out",))["mlp_out"]
  np.testing.assert_allclose(np.asarray(atp).sum((2, 3)), np.asarray(atp_full).sum((2, 3)), atol=1e-5)
  with pytest.raises(ValueError, match="differ before position 4"):
    patching.shared_prefix(m.config, m.params, clean, corrupt, 4)


def test_patch_list_equals_the_sweep(setup):
  m, _, clean, corrupt, _ = setup
  _, cache = patching.capture(m.config, m.params, clean, taps=("attn_z",))
  heads = np.asarray(patching.patch_sweep(m.config, m.params, corrupt, cache, "attn_z", ("layer", "head"), chunk=3))
  L, H = m.config.num_layers, m.config.num_heads
  layers = jnp.repeat(jnp.arange(L), H)[::-1]  # every head, deepest first: patch_list sorts them
  which = jnp.tile(jnp.arange(H), L)[::-1]
  listed = patching.patch_list(m.config, m.params, corrupt, cache, "attn_z", layers,
                               patching.head_masks(m.config, "attn_z", which), chunk=5)
  np.testing.assert_allclose(np.asarray(listed), heads[np.asarray(layers), np.asarray(which)], atol=1e-5)


def test_joint_patch_of_every_head_and_mlp_recovers_the_clean_run(setup):
  """The answer position's residual is the embeddings plus every head's and MLP's output: patching them all
  from the clean run restores the clean metric exactly (the faithfulness curve's endpoint)."""
  m, _, clean, corrupt, _ = setup
  clean_ld, cache = patching.capture(m.config, m.params, clean, taps=("attn_z", "mlp_out"))
  ld = patching.intervene(m.config, m.params, corrupt, {s: (cache[s], jnp.ones(())) for s in ("attn_z", "mlp_out")})
  np.testing.assert_allclose(np.asarray(ld), np.asarray(clean_ld), atol=1e-5)


def test_function_vector_injection_equals_patching_the_same_delta_by_hand(setup):
  from icl_ft.interp import vectors
  m, _, _, corrupt, _ = setup
  L, D = m.config.num_layers, m.config.hidden_size
  v = jnp.asarray(np.random.default_rng(3).normal(size=(L, D)).astype(np.float32))
  injected = np.asarray(vectors.inject(m.config, m.params, corrupt, v))
  _, tgt = patching.capture(m.config, m.params, corrupt, taps=("resid_pre",))
  for layer in range(L):
    mask = np.zeros((L, 1, T, 1), np.float32)
    mask[layer, 0, T - 1] = 1  # the answer position
    src = tgt["resid_pre"] + jnp.asarray(mask) * v[:, None, None, :]
    by_hand = patching.patched_metric(m.config, m.params, corrupt, "resid_pre", src, jnp.asarray(mask))
    np.testing.assert_allclose(injected[layer], np.asarray(by_hand), atol=1e-5)
  resid = vectors.answer_residuals(m.config, m.params, corrupt)
  np.testing.assert_allclose(np.asarray(resid), np.asarray(tgt["resid_pre"][:, :, T - 1]), atol=1e-6)


def test_bench_torch_references_equal_our_head_sweep_with_left_padding(setup):
  """``bench patching``'s two PyTorch references (the plain hook loop and the FLOP-matched batched hooks from
  layer l) give our sweep's effects, a left-padded row included."""
  from icl_ft import bench
  m, ref, _, _, (c_ids, x_ids, gold, foil) = setup
  valid = np.ones((B, T), bool)
  valid[0, :2] = False  # row 0 is left-padded by two tokens
  p = bench._RandomPairs(c_ids, x_ids, valid, gold, foil, T)
  mk = lambda ids: patching.Batch(jnp.asarray(ids), jnp.asarray(valid), jnp.full((B,), T - 1), jnp.asarray(gold),
                                  jnp.asarray(foil))
  _, cache = patching.capture(m.config, m.params, mk(c_ids), taps=("attn_z",))
  ours = np.asarray(patching.patch_sweep(m.config, m.params, mk(x_ids), cache, "attn_z", ("layer", "head"), chunk=3))
  grid = [(l, h) for l in range(m.config.num_layers) for h in range(m.config.num_heads)]
  for method in (bench._hooks_plain, bench._hooks_batched):
    theirs = method(ref, p, m.config.head_dim, grid)
    for l, h in grid:
      np.testing.assert_allclose(theirs[l, h], ours[l, h], atol=1e-4, err_msg=f"{method.__name__} L{l}H{h}")
