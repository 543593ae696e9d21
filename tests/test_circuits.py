"""The circuit-shift analysis end to end on a tiny model: conditions and controls, screen and verify,
faithfulness, function vectors, transfer, statistics, resume and outputs."""

import json

import jax
import numpy as np
import pytest

from icl_ft.interp import circuits, patching, screen
from icl_ft.io import files, loading
from icl_ft.io.units import Units
from icl_ft.report import plots
from icl_ft.stats import significance

# A random tiny model barely separates clean from corrupt (logit-diff gap ~1e-3): a low threshold.
CCFG = dict(task="expression", n_pairs=6, icl_shots=(2,), n_boot=20, top_k=3, chunk=4, tol=1e-6, verify=3,
            n_perm=20, n_splits=10, single_token_answers=False)  # the byte tokenizer splits every answer


@pytest.fixture(scope="module")
def model(tiny_lm):
  m = loading.load(str(tiny_lm[0]), use_cache=False)
  noisy = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), m.params)
  return m, noisy


@pytest.fixture(scope="module")
def results(model, tmp_path_factory):
  m, noisy = model
  ccfg = circuits.CircuitConfig(**CCFG)
  units = Units(tmp_path_factory.mktemp("units"))
  with pytest.MonkeyPatch.context() as mp:
    _declare_gaps_real(mp)
    found = circuits.analyze(m.config, m.params, m.tokenizer, ccfg, tuned={"ft": noisy}, units=units)
  return m, ccfg, found, units


def _declare_gaps_real(mp):
  """A random tiny model's clean-corrupt gap (~1e-5 logits) is not distinguishable from 0 over 6 pairs, so no
  condition would have a circuit; declaring each gap's interval to be its point lets every step that needs a
  circuit (shifts, contrasts, faithfulness) run. ``test_a_gap_whose_interval_includes_0_has_no_circuit`` covers
  the real interval."""
  mp.setattr(significance, "gap_interval", lambda run, n_boot=0, seed=0: (float(np.mean(run.source - run.target)),) * 3)


def test_conditions_controls_and_shapes(results):
  m, _, found, _ = results
  r = found.numbers
  L, H = m.config.num_layers, m.config.num_heads
  assert set(r["heads"]["conditions"]) == {"base", "icl2", "icl2-shuffled", "icl2-irrelevant", "ft"}
  assert r["heads"]["conditions"]["base"]["shape"] == [L, H]
  assert r["mlps"]["conditions"]["ft"]["shape"] == [L]
  assert len({p["n_pairs"] for p in r["pairs"].values()}) == 1
  assert r["pairs"]["icl2-shuffled"]["control"] == "shuffled" and r["pairs"]["icl2"]["control"] is None
  assert np.asarray(found.effects["icl2"]["resid"]).shape[0] == L


def test_tuned_condition_runs_on_the_tuned_parameters(results, model):
  m, ccfg, found, _ = results
  _, noisy = model
  p = circuits.condition_pairs(m.tokenizer, ccfg)["base"]
  mk = lambda ids: patching.Batch(ids, p.valid, p.answer_pos, p.clean_answer, p.corrupt_answer)
  for params, name in ((m.params, "base"), (noisy, "ft")):  # each condition's unpatched metrics, recomputed in full
    cond = found.numbers["heads"]["conditions"][name]
    assert cond["mean_source"] == pytest.approx(float(np.mean(patching.capture(m.config, params, mk(p.clean_ids))[0])),
                                                abs=1e-6)
    assert cond["mean_target"] == pytest.approx(
        float(np.mean(patching.capture(m.config, params, mk(p.corrupt_ids))[0])), abs=1e-6)


def test_verified_components_carry_exact_effects_and_the_rest_the_screen(results):
  """Each condition's effects: the exact sweep's on the verified components, the attribution screen's elsewhere;
  the screen agrees with the exact effects on a tiny model (small differences: first order is close)."""
  m, ccfg, found, _ = results
  p = circuits.condition_pairs(m.tokenizer, ccfg)["icl2"]
  mk = lambda ids: patching.Batch(ids, p.valid, p.answer_pos, p.clean_answer, p.corrupt_answer)
  clean, corrupt = mk(p.clean_ids), mk(p.corrupt_ids)
  clean_ld, cache = patching.capture(m.config, m.params, clean, taps=("attn_z",))
  corrupt_ld, _ = patching.capture(m.config, m.params, corrupt)
  sweep = np.asarray(patching.patch_sweep(m.config, m.params, corrupt, cache, "attn_z", ("layer", "head"), chunk=4))
  exact = (sweep.mean(-1) - np.mean(corrupt_ld)) / (np.mean(clean_ld) - np.mean(corrupt_ld))
  effects = np.asarray(found.effects["icl2"]["heads"])
  agree = found.numbers["screen"]["icl2"]["heads"]
  verified = np.zeros(effects.shape, bool)
  verified[tuple(np.array(agree["verified"]).T)] = True
  assert agree["n_verified"] == verified.sum() >= ccfg.verify
  scale = np.abs(exact).max()
  gap = abs(np.mean(clean_ld) - np.mean(corrupt_ld))  # patched metrics agree to 1e-6 logits (measured ~2e-8); effects divide by the gap
  np.testing.assert_allclose(effects[verified], exact[verified], atol=1e-6 / gap)
  np.testing.assert_allclose(effects, exact, atol=0.1 * scale)  # elsewhere the screen: close on a tiny model
  assert agree["spearman"] > 0.8


def test_all_components_exact_when_verify_is_zero(model):
  m, _ = model
  ccfg = circuits.CircuitConfig(**dict(CCFG, verify=0, icl_shots=(), controls=()))
  found = circuits.analyze(m.config, m.params, m.tokenizer, ccfg)
  p = circuits.condition_pairs(m.tokenizer, ccfg)["base"]
  mk = lambda ids: patching.Batch(ids, p.valid, p.answer_pos, p.clean_answer, p.corrupt_answer)
  clean_ld, cache = patching.capture(m.config, m.params, mk(p.clean_ids), taps=("mlp_out",))
  corrupt_ld, _ = patching.capture(m.config, m.params, mk(p.corrupt_ids))
  sweep = np.asarray(patching.patch_sweep(m.config, m.params, mk(p.corrupt_ids), cache, "mlp_out", ("layer",)))[:, 0]
  exact = (sweep.mean(-1) - np.mean(corrupt_ld)) / (np.mean(clean_ld) - np.mean(corrupt_ld))
  gap = abs(np.mean(clean_ld) - np.mean(corrupt_ld))  # patched metrics agree to 1e-6 logits (measured ~2e-8); effects divide by the gap
  np.testing.assert_allclose(found.effects["base"]["mlps"], exact, atol=1e-6 / gap)
  assert found.numbers["screen"]["base"]["mlps"]["exact_share"] == 1.0


def test_faithfulness_of_all_components_is_one(results):
  _, _, found, _ = results
  f = found.numbers["faithfulness"]
  assert f["ks"][-1] == sum(np.asarray(found.effects["base"][fam]).size for fam in ("heads", "mlps"))
  for name, c in f["conditions"].items():
    assert c["recovered"][-1]["point"] == pytest.approx(1.0, abs=1e-3), name
    if c["circuit_size"] is not None:
      assert c["cross"][name]["point"] >= f["threshold"]  # a condition's own circuit recovers its threshold


def test_function_vectors_and_transfer_are_reported_per_layer(results):
  m, _, found, _ = results
  fv = found.numbers["vectors"]
  assert len(fv["layers"]) == m.config.num_layers and fv["n_fit"] + fv["n_held_out"] == 6
  assert fv["layers"][0]["norm"] == pytest.approx(0.0, abs=1e-6)  # layer 0 sees only the answer token's embedding
  assert all(row["gain"]["lo"] <= row["gain"]["point"] <= row["gain"]["hi"] for row in fv["layers"])
  t = found.numbers["transfer"]["ft"]
  assert len(t["heads"]) == 3 and t["separated"]


def test_a_rerun_reuses_every_unit_and_gives_the_same_numbers(results, model, monkeypatch):
  m, ccfg, found, units = results
  before = units.computed
  _declare_gaps_real(monkeypatch)
  again = circuits.analyze(m.config, m.params, m.tokenizer, ccfg, tuned={"ft": model[1]}, units=units)
  assert units.computed == before
  strip = lambda n: json.dumps(files.json_safe({k: v for k, v in n.items() if k != "seconds"}), sort_keys=True)
  assert strip(again.numbers) == strip(found.numbers)


def test_unseparated_conditions_report_no_effects(model):
  m, _ = model
  ccfg = circuits.CircuitConfig(**dict(CCFG, icl_shots=(), controls=(), tol=1.0, n_pairs=4))
  r = circuits.analyze(m.config, m.params, m.tokenizer, ccfg).numbers
  assert not r["heads"]["conditions"]["base"]["separated"]
  assert all(v is None for v in r["heads"]["conditions"]["base"]["effects"])
  assert "reason" in r["faithfulness"]["conditions"]["base"]


def test_bad_configs_say_what_to_change():
  with pytest.raises(ValueError, match="k >= 2"):
    circuits.CircuitConfig(task="expression", icl_shots=(1,))
  with pytest.raises(ValueError, match="unknown control"):
    circuits.CircuitConfig(task="expression", controls=("random",))
  with pytest.raises(ValueError, match="at least 4"):
    circuits.CircuitConfig(task="expression", n_pairs=3)


def test_outputs_are_json_and_figures_draw(results, tmp_path):
  _, _, found, _ = results
  files.write_json(tmp_path / "circuits.json", found.numbers)
  assert json.loads((tmp_path / "circuits.json").read_text())["heads"]["contrasts"]
  for name, draw in plots.CIRCUIT_FIGURES.items():
    assert open(draw(tmp_path, found.numbers, found.effects), "rb").read(4) == b"\x89PNG", name


def test_shift_bars_draw_an_interval_that_excludes_its_point(tmp_path):
  item = lambda point, lo, hi: {"point": point, "lo": lo, "hi": hi}
  shifts = {"base|icl1": {"tv": item(0.2, 0.25, 0.4), "rank": item(0.5, 0.1, 0.3), "topk": item(None, None, None)},
            "base|ft": {"tv": {"point": None, "reason": "no circuit in ft"}}}
  results = {f: {"shifts": shifts} for f in ("heads", "mlps")}
  path = plots.plot_shifts(tmp_path, results, {})
  assert open(path, "rb").read(4) == b"\x89PNG"


def test_screen_combines_estimates_and_exact_patches():
  est = np.arange(12.0).reshape(2, 2, 3)
  out = screen.combine(est, np.array([1, 4]), np.array([[-1.0, -2.0], [-3.0, -4.0]]))
  assert out[0, 0, 1] == -1 and out[1, 1, 1] == -4 and out[0, 0, 0] == 0
  assert screen.chosen([est], [0.0], 2).tolist() == [4, 5] and screen.chosen([est], [0.0], 0).size == 6


def test_a_gap_whose_interval_includes_0_has_no_circuit(model):
  """The random tiny model's gaps are noise: no circuit, no shifts, contrasts or faithfulness curves."""
  m, noisy = model
  ccfg = circuits.CircuitConfig(**dict(CCFG, controls=()))
  r = circuits.analyze(m.config, m.params, m.tokenizer, ccfg, tuned={"ft": noisy}).numbers
  conds = r["heads"]["conditions"]
  assert not any(c["has_circuit"] for c in conds.values())
  assert all(c["gap_lo"] <= 0 <= c["gap_hi"] for c in conds.values())
  assert all(s["tv"]["point"] is None and "no circuit" in s["tv"]["reason"] for s in r["heads"]["shifts"].values())
  assert all("no circuit" in c["tv"]["reason"] for c in r["heads"]["contrasts"].values())
  assert all("no circuit" in c["reason"] for c in r["faithfulness"]["conditions"].values())
