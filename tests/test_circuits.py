"""The circuit-shift analysis end to end on a tiny model: conditions, shifts, transfer, AtP check, outputs."""

import json

import jax
import numpy as np
import pytest

from icl_ft.interp import circuits
from icl_ft.io import files, loading
from icl_ft.report import plots


@pytest.fixture(scope="module")
def results(tiny_lm):
  m = loading.load(str(tiny_lm[0]), use_cache=False)
  noisy = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), m.params)
  # A random tiny model barely separates clean from corrupt (logit-diff gap ~4e-4): lower the threshold.
  ccfg = circuits.CircuitConfig(task="expression", n_pairs=3, icl_shots=(1,), n_boot=20, top_k=3, chunk=4, tol=1e-6)
  found = circuits.analyze(m.config, m.params, m.tokenizer, ccfg, tuned={"ft": noisy})
  return m, dict(found.numbers, _effects=found.effects, _params_ft=noisy)


def test_conditions_and_shapes(results):
  m, r = results
  L, H = m.config.num_layers, m.config.num_heads
  assert set(r["heads"]["conditions"]) == {"base", "icl1", "ft"}
  assert r["heads"]["conditions"]["base"]["shape"] == [L, H]
  assert r["mlps"]["conditions"]["ft"]["shape"] == [L]
  assert {p["n_pairs"] for p in r["pairs"].values()} == {r["heads"]["conditions"]["base"]["n_pairs"]}
  assert np.asarray(r["_effects"]["icl1"]["resid"]).shape[0] == L


def test_tuned_condition_runs_on_the_tuned_parameters(results):
  from icl_ft.interp import pairs as pairs_lib
  from icl_ft.interp import patching
  m, r = results
  ccfg = circuits.CircuitConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["config"].items()})
  base = pairs_lib.build_pairs(ccfg.task, m.tokenizer, ccfg.n_pairs, ccfg.seed, ccfg.fmt, 0)
  icl = pairs_lib.build_pairs(ccfg.task, m.tokenizer, ccfg.n_pairs, ccfg.seed, ccfg.fmt, 1)
  common = sorted(set(base.query_index.tolist()) & set(icl.query_index.tolist()))
  p = base.take([base.query_index.tolist().index(q) for q in common])
  clean, corrupt = circuits._batches(p)
  noisy = r["_params_ft"]
  for params, name in ((m.params, "base"), (noisy, "ft")):  # each condition's unpatched metrics, recomputed
    cond = r["heads"]["conditions"][name]
    assert cond["mean_source"] == pytest.approx(float(np.mean(patching.capture(m.config, params, clean)[0])), abs=1e-6)
    assert cond["mean_target"] == pytest.approx(float(np.mean(patching.capture(m.config, params, corrupt)[0])), abs=1e-6)
  assert r["heads"]["conditions"]["ft"]["mean_source"] != pytest.approx(r["heads"]["conditions"]["base"]["mean_source"])
  assert r["heads"]["shifts"]["base|ft"]["tv"]["point"] > 0


def test_unseparated_conditions_report_no_effects(tiny_lm):
  m = loading.load(str(tiny_lm[0]), use_cache=False)
  ccfg = circuits.CircuitConfig(task="expression", n_pairs=2, icl_shots=(), n_boot=5, top_k=2, chunk=4, tol=1.0)
  r = circuits.analyze(m.config, m.params, m.tokenizer, ccfg).numbers
  assert not r["heads"]["conditions"]["base"]["separated"]
  assert all(v is None for v in r["heads"]["conditions"]["base"]["effects"])


def test_attribution_check_and_outputs(results, tmp_path):
  _, r = results
  atp = r["attribution"]
  # A random tiny model's clean-corrupt differences are small, so first-order AtP is close to exact.
  assert atp["spearman_atp_vs_exact"] > 0.9 and atp["topk_overlap_with_exact"] >= 2 / 3
  base = r["heads"]["conditions"]["base"]
  H = r["heads"]["conditions"]["base"]["shape"][1]
  for item in atp["topk"]:
    assert item["atp"] == pytest.approx(item["exact"], rel=0.05)
    # its exact value is the sweep's (unnormalised) effect of that head
    effect = base["effects"][item["layer"] * H + item["head"]] * base["separation"]
    assert item["exact"] == pytest.approx(effect, rel=1e-4, abs=1e-9)
  numbers = {k: v for k, v in r.items() if not k.startswith("_")}
  files.write_json(tmp_path / "circuits.json", numbers)
  assert json.loads((tmp_path / "circuits.json").read_text())["heads"]["contrasts"]
  for name, draw in plots.CIRCUIT_FIGURES.items():
    assert open(draw(tmp_path, numbers, r["_effects"]), "rb").read(4) == b"\x89PNG", name


def test_shift_bars_draw_an_interval_that_excludes_its_point(tmp_path):
  item = lambda point, lo, hi: {"point": point, "lo": lo, "hi": hi}
  shifts = {"base|icl1": {"tv": item(0.2, 0.25, 0.4), "rank": item(0.5, 0.1, 0.3), "topk": item(None, None, None)}}
  results = {f: {"shifts": shifts} for f in ("heads", "mlps")}
  path = plots.plot_shifts(tmp_path, results, {})
  assert open(path, "rb").read(4) == b"\x89PNG"
