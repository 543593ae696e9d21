"""The circuit-shift analysis end to end on a tiny model: conditions, shifts, transfer, AtP check, outputs."""

import json

import jax
import numpy as np
import pytest

from icl_ft import circuits, loading


@pytest.fixture(scope="module")
def results(tiny_lm):
  m = loading.load(str(tiny_lm[0]), use_cache=False)
  noisy = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), m.params)
  # A random tiny model barely separates clean from corrupt (logit-diff gap ~4e-4): lower the threshold.
  ccfg = circuits.CircuitConfig(task="expression", n_pairs=3, icl_shots=(1,), n_boot=20, top_k=3, chunk=4, tol=1e-6)
  return m, circuits.analyze(m.config, m.params, m.tokenizer, ccfg, tuned={"same": m.params, "ft": noisy})


def test_conditions_and_shapes(results):
  m, r = results
  L, H = m.config.num_layers, m.config.num_heads
  assert set(r["heads"]["conditions"]) == {"base", "icl1", "same", "ft"}
  assert r["heads"]["conditions"]["base"]["shape"] == [L, H]
  assert r["mlps"]["conditions"]["ft"]["shape"] == [L]
  assert {p["n_pairs"] for p in r["pairs"].values()} == {r["heads"]["conditions"]["base"]["n_pairs"]}
  assert np.asarray(r["_effects"]["icl1"]["resid"]).shape[0] == L


def test_identical_condition_has_zero_shift(results):
  _, r = results
  for family in ("heads", "mlps"):
    s = r[family]["shifts"]["base|same"]
    assert s["tv"]["point"] == pytest.approx(0.0, abs=1e-12)
    assert s["topk"]["point"] == pytest.approx(0.0, abs=1e-12)
  assert r["heads"]["shifts"]["base|ft"]["tv"]["point"] > 0
  assert not r["transfer"]["same"]["separated"]  # base vs itself cannot be separated: no transfer ratio
  assert np.isnan(r["transfer"]["same"]["effects"]).all()  # written as null in circuits.json


def test_unseparated_conditions_report_no_effects(tiny_lm):
  m = loading.load(str(tiny_lm[0]), use_cache=False)
  ccfg = circuits.CircuitConfig(task="expression", n_pairs=2, icl_shots=(), n_boot=5, top_k=2, chunk=4, tol=1.0)
  r = circuits.analyze(m.config, m.params, m.tokenizer, ccfg)
  assert not r["heads"]["conditions"]["base"]["separated"]
  assert all(v is None for v in r["heads"]["conditions"]["base"]["effects"])


def test_attribution_check_and_outputs(results, tmp_path):
  _, r = results
  atp = r["attribution"]
  assert -1 <= atp["spearman_atp_vs_exact"] <= 1 and len(atp["topk"]) == 3
  paths = circuits.write(tmp_path, dict(r))
  data = json.loads(open(paths["json"]).read())
  assert data["heads"]["contrasts"] and "_effects" not in data
  for key in ("heatmaps", "mlps", "shifts"):
    assert open(paths[key], "rb").read(4) == b"\x89PNG"
