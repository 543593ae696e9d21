"""Circuit-shift metrics: hand-computed values, invariances, ratio-of-means effects, bootstrap and the report."""

import json
import math

import numpy as np
import pytest

from icl_ft.stats import effects, shifts as shift


def test_normalized_importance():
  np.testing.assert_allclose(effects.normalized_importance([1, -3, 0, 4]), [0.125, 0.375, 0, 0.5])
  np.testing.assert_allclose(effects.normalized_importance([[1, -1], [0, 2]]), [[0.25, 0.25], [0, 0.5]])
  np.testing.assert_array_equal(effects.normalized_importance(np.zeros((2, 3))), np.zeros((2, 3)))
  assert np.isnan(effects.normalized_importance([1.0, np.nan])).all()


def test_tv_shift_by_hand():
  assert shift.tv_shift([1, 0, 0, 0], [0, 1, 0, 0]) == pytest.approx(1.0)
  assert shift.tv_shift([1, 1], [1, 3]) == pytest.approx(0.25)  # p = (.5,.5) vs (.25,.75)
  assert shift.tv_shift([[2, 0], [0, 2]], [[1, 1], [0, 2]]) == pytest.approx(0.25)  # (.5,0,0,.5) vs (.25,.25,0,.5)
  a = np.array([0.3, -1.2, 0.5])
  assert shift.tv_shift(a, 3 * a) == pytest.approx(0.0) and shift.tv_shift(a, -a) == pytest.approx(0.0)
  assert math.isnan(shift.tv_shift([0, 0], [1, 0]))
  with pytest.raises(ValueError, match="shapes differ"):
    shift.tv_shift([1, 2], [1, 2, 3])


def test_rank_shift_by_hand():
  assert shift.rank_shift([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(2.0)
  assert shift.rank_shift([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(0.0)
  # Ties: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4): rho = 4.5 / sqrt(4.5 * 5).
  assert shift.rank_shift([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(1 - 4.5 / math.sqrt(22.5))
  # Signed by default; absolute ranks |e|.
  assert shift.rank_shift([-3, 1, 2], [3, 1, 2]) == pytest.approx(1.5)
  assert shift.rank_shift([-3, 1, 2], [3, 1, 2], absolute=True) == pytest.approx(0.0)
  assert math.isnan(shift.rank_shift([1, 1, 1], [1, 2, 3]))


def test_topk_by_hand():
  a, b = [5, 4, 3, 0, 0], [0, -4, 5, 3, 0]
  assert shift.top_k(a, 2) == {0, 1} and shift.top_k(b, 2) == {2, 1}
  assert shift.topk_overlap(a, b, 2) == pytest.approx(1 / 3)
  assert shift.topk_shift(a, b, 2) == pytest.approx(2 / 3)
  assert shift.topk_overlap(a, b, 3) == pytest.approx(2 / 4)  # {0,1,2} vs {1,2,3}
  assert shift.topk_shift(a, b, 5) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="k must be"):
    shift.topk_overlap(a, b, 6)


def test_layer_profile_and_centroid_by_hand():
  a = np.array([[1, 1], [2, 0], [0, -4]])  # P = (.25, .25, .5): centroid 1.25
  b = np.array([[0, 0], [0, 0], [1, 0]])  # centroid 2
  np.testing.assert_allclose(shift.layer_profile(a), [0.25, 0.25, 0.5])
  np.testing.assert_allclose(shift.layer_profile([0.0, 2.0, 2.0]), [0, 0.5, 0.5])  # MLP-like [L]
  assert shift.layer_centroid(a) == pytest.approx(1.25)
  assert shift.centroid_shift(a, b) == pytest.approx(0.75)
  assert shift.centroid_shift(b, a) == pytest.approx(-0.75)


def test_identical_inputs_give_zero_shift():
  e = np.random.default_rng(0).normal(size=(4, 3))
  assert shift.tv_shift(e, e) == 0.0
  assert shift.rank_shift(e, e) == pytest.approx(0.0)
  assert shift.topk_shift(e, e, 5) == 0.0
  assert shift.centroid_shift(e, e) == 0.0


def test_npe_is_a_ratio_of_means():
  target, source = np.array([0.0, 0.0]), np.array([1.0, 9.0])
  patched = np.array([[1.0, 0.5], [0.0, 4.5]])  # per-pair ratios: (1, 0) and (.5, .5)
  e, ok = effects.npe(patched, target, source)
  assert ok
  np.testing.assert_allclose(e, [0.1, 0.5])  # mean of ratios would give (0.5, 0.5)
  np.testing.assert_allclose(np.mean(patched / source[:, None], axis=0), [0.5, 0.5])
  # Noising convention: target = clean LD, source = corrupt LD.
  e_noise, _ = effects.npe(np.array([[2.0], [4.0]]), np.array([4.0, 6.0]), np.array([0.0, 0.0]))
  np.testing.assert_allclose(e_noise, [0.4])  # (E[LD(x)] - E[LD(x<-x~)]) / (E[LD(x)] - E[LD(x~)]) = 2/5


def test_npe_flags_non_separating_pairs():
  e, ok = effects.npe(np.ones((3, 2, 2)), np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]))
  assert not ok and e.shape == (2, 2) and np.isnan(e).all()
  e, ok = effects.npe(np.ones((2, 1)), np.zeros(2), np.full(2, 5e-4))
  assert not ok and np.isnan(e).all()
  e, ok = effects.npe(np.ones((2, 1)), np.zeros(2), np.full(2, 5e-4), tol=1e-4)
  assert ok and np.isfinite(e).all()


def _runs(rng, n, weights, noise=0.3, sep=2.0):
  """Per-pair LDs with per-component effect ~ weights (shape [L, H])."""
  target = rng.normal(0.0, 0.2, n)
  source = target + sep + rng.normal(0, 0.2, n)
  patched = target[:, None, None] + sep * weights[None] + rng.normal(0, noise, (n,) + weights.shape)
  return effects.PatchRuns(patched, target, source)


W_BASE = np.array([[0.6, 0.1, 0.0], [0.1, 0.3, 0.0], [0.0, 0.0, 0.1], [0.0, 0.05, 0.0]])


@pytest.fixture(scope="module")
def conditions():
  rng = np.random.default_rng(1)
  w_base = W_BASE
  w_icl = np.array([[0.0, 0.1, 0.0], [0.1, 0.1, 0.0], [0.2, 0.1, 0.5], [0.0, 0.3, 0.4]])
  w_ft = w_base + np.array([[0, 0, 0.1], [0, 0, 0], [0, 0, 0], [0, 0, 0.05]])
  return {"base": _runs(rng, 80, w_base), "icl": _runs(rng, 80, w_icl), "ft": _runs(rng, 80, w_ft)}


@pytest.mark.parametrize("name", ["tv", "rank", "topk", "centroid"])
def test_bootstrap_ci_contains_point(conditions, name):
  fn = shift.default_metrics(k=4)[name]
  point, lo, hi = shift.bootstrap(fn, conditions["base"], conditions["icl"], n_boot=200, seed=0)
  assert lo <= point <= hi and lo < hi
  if name in ("tv", "rank"):  # a replicate of base (same true effects, fresh noise) shifts less than ICL does
    replicate = _runs(np.random.default_rng(7), 80, W_BASE)
    _, _, hi_same = shift.bootstrap(fn, conditions["base"], replicate, n_boot=200, seed=0)
    assert hi_same < lo
  assert shift.bootstrap(fn, conditions["base"], conditions["icl"], n_boot=200, seed=0) == (point, lo, hi)


def test_bootstrap_accepts_plain_per_pair_effects_and_checks_pairing():
  rng = np.random.default_rng(2)
  a, b = rng.normal(1, 0.1, (30, 5)), rng.normal(1, 0.1, (30, 5))
  point, lo, hi = shift.bootstrap(shift.tv_shift, a, b, n_boot=100)
  assert point == pytest.approx(shift.tv_shift(a.mean(0), b.mean(0)))
  assert lo <= point <= hi
  with pytest.raises(ValueError, match="same pairs"):
    shift.bootstrap(shift.tv_shift, a, b[:20], n_boot=10)
  assert np.isfinite(shift.bootstrap(shift.tv_shift, a, b[:20], n_boot=10, paired=False)).all()


def test_noise_floor(conditions):
  med, p95 = shift.noise_floor(shift.tv_shift, conditions["base"], n_boot=200, seed=0)
  assert 0 < med <= p95 < 0.5
  tv_icl = shift.tv_shift(conditions["base"].effects()[0], conditions["icl"].effects()[0])
  assert tv_icl > p95
  # Identical pairs: every resample equals the full set.
  flat = effects.PatchRuns(np.ones((10, 3)) * [1, 2, 3], np.zeros(10), np.ones(10))
  assert shift.noise_floor(shift.tv_shift, flat, n_boot=20) == (0.0, 0.0)


def test_shift_report(conditions):
  report = shift.shift_report(conditions, baseline="base", n_boot=100, seed=0, k=4)
  text = json.dumps(report, allow_nan=False)
  assert json.loads(text) == report
  assert list(report["conditions"]) == ["base", "icl", "ft"]
  assert set(report["shifts"]) == {"base|icl", "base|ft", "icl|ft"}
  assert set(report["contrasts"]) == {"icl-ft"}
  base = report["conditions"]["base"]
  assert base["separated"] and base["n_pairs"] == 80 and base["shape"] == [4, 3]
  assert sum(base["importance"]) == pytest.approx(1.0) and len(base["layer_profile"]) == 4
  e_base, e_icl = conditions["base"].effects()[0], conditions["icl"].effects()[0]
  icl = report["shifts"]["base|icl"]
  assert icl["tv"]["point"] == pytest.approx(shift.tv_shift(e_base, e_icl))
  assert icl["centroid"]["point"] == pytest.approx(shift.centroid_shift(e_base, e_icl))
  for m in ("tv", "rank", "topk", "centroid"):
    item = icl[m]
    assert item["lo"] <= item["point"] <= item["hi"]
    assert item["floor_median"] == base["noise_floor"][m]["median"]
    assert item["minus_floor"] == pytest.approx(abs(item["point"]) - item["floor_median"])
  assert icl["tv"]["exceeds_floor"]
  # ICL moved importance far more than FT: the paper's claim on this synthetic data.
  contrast = report["contrasts"]["icl-ft"]["tv"]
  assert contrast["point"] == pytest.approx(icl["tv"]["point"] - report["shifts"]["base|ft"]["tv"]["point"])
  assert contrast["lo"] > 0


def test_shift_report_non_separating_condition(conditions):
  n = conditions["base"].n
  dead = effects.PatchRuns(np.zeros((n, 4, 3)), np.zeros(n), np.zeros(n))
  report = shift.shift_report({"base": conditions["base"], "dead": dead}, n_boot=20, k=4)
  json.dumps(report, allow_nan=False)
  assert report["conditions"]["dead"]["separated"] is False
  assert report["conditions"]["dead"]["effects"] == [None] * 12
  assert report["shifts"]["base|dead"]["tv"]["point"] is None
  assert report["shifts"]["base|dead"]["tv"]["n_valid"] == 0


def test_shift_report_checks_inputs(conditions):
  with pytest.raises(ValueError, match="baseline"):
    shift.shift_report(conditions, baseline="zero", n_boot=2)
  short = dict(conditions, ft=conditions["ft"].take(np.arange(10)))
  with pytest.raises(ValueError, match="same pairs"):
    shift.shift_report(short, n_boot=2)
  assert shift.shift_report(short, n_boot=5, paired=False, k=4)["paired"] is False


def test_rank_and_top_k_helpers_by_hand():
  a, b = [3.0, 1.0, 2.0, -5.0], [1.0, 2.0, 3.0, -4.0]
  assert shift.spearman(a, b) == pytest.approx(0.4)  # ranks [3,1,2,0] vs [1,2,3,0]
  assert np.isnan(shift.spearman([1.0, 1.0], [1.0, 2.0]))
  assert shift.ranked(a, 3) == [3, 0, 2]  # by |e|, largest first
  assert shift.ranked([1.0, -1.0, 1.0], 2) == [0, 1]  # ties: lower index first
  assert shift.topk_recall(a, b, 2) == 0.5  # {3, 0} vs {3, 2}


def test_signed_noise_floor_takes_absolute_values(conditions):
  signed = shift.noise_floor(shift.centroid_shift, conditions["base"], n_boot=100, seed=0, signed=True)
  raw = shift.noise_floor(shift.centroid_shift, conditions["base"], n_boot=100, seed=0)
  assert signed[0] >= 0 and signed[0] >= raw[0]


def test_percentile_interval():
  from icl_ft.stats import resampling
  lo, hi = resampling.interval(np.r_[np.arange(101.0), np.nan])
  assert (lo, hi) == pytest.approx((2.5, 97.5))
  assert all(np.isnan(resampling.interval(np.array([np.nan]))))
