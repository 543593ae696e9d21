"""Every head and MLP of one condition: an attribution screen on all pairs, exact patches of the top ones
(attribution patching then exact verification, after AtP*, Kramár et al. 2024, without its GradDrop), and how
well the screen ranked the verified ones (docs/circuits.md, "Screen and verify").

Components are the study's two families, each a site patched at every position: ``heads`` (``attn_z``, one
head's output before the output projection, [L, H]) and ``mlps`` (``mlp_out``, [L]). The screen estimates
every component's patched metric to first order in one forward and one backward pass
(``patching.attribution_patch``); the exact patch then replaces the estimate for the top ``verify``
components. The screen's known failure, attention saturation when a patch moves the *patched head's own*
queries or keys (AtP*'s softmax recomputation), does not arise here: a head is patched at its output, after
its softmax. What lies downstream (later heads' softmax, norms, MLPs) is still linearised, and a component the
screen underestimates is never verified: the agreement numbers cover the verified set only.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from icl_ft.interp import patching
from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import Params
from icl_ft.model.sharding import to_host
from icl_ft.stats import shifts
from icl_ft.stats.effects import PatchRuns

FAMILIES = {"heads": "attn_z", "mlps": "mlp_out"}


def family_shape(cfg: ModelConfig, family: str) -> tuple[int, ...]:
  return (cfg.num_layers, cfg.num_heads) if family == "heads" else (cfg.num_layers,)


def estimate(cfg: ModelConfig, params: Params, corrupt: patching.Batch, cache: dict) -> dict[str, np.ndarray]:
  """Per family, the screen's estimate of every component's patched metric per pair [N, *shape]: the corrupt
  metric plus the attribution summed over the positions and features the component spans."""
  target, _ = patching.capture(cfg, params, corrupt)
  atp = patching.attribution_patch(cfg, params, corrupt, cache, tuple(FAMILIES.values()))
  heads = atp["attn_z"].sum(axis=(2, 4)).transpose(1, 0, 2)  # [L, N, T, H, dh] -> [N, L, H]
  mlps = atp["mlp_out"].sum(axis=(2, 3)).T  # [L, N, T, D] -> [N, L]
  target, heads, mlps = to_host((target, heads, mlps))
  return {"heads": target[:, None, None] + heads, "mlps": target[:, None] + mlps}


def chosen(screens: list[np.ndarray], target_means: list[float], verify: int) -> np.ndarray:
  """Flat indices of the components to patch exactly: the union over conditions of each one's top ``verify``
  by |mean estimated change| (every component when ``verify`` is 0 or covers them all)."""
  size = screens[0][0].size
  if verify <= 0 or verify >= size:
    return np.arange(size)
  top = set()
  for est, t in zip(screens, target_means):
    top |= shifts.top_k(est.mean(axis=0) - t, verify)
  return np.array(sorted(top))


def exact(cfg: ModelConfig, params: Params, corrupt: patching.Batch, cache: dict, family: str, flat: np.ndarray,
          chunk: int) -> np.ndarray:
  """The exact patched metric [N, M] of the components ``flat`` (flat indices into the family's shape)."""
  site = FAMILIES[family]
  flat = jnp.asarray(flat, jnp.int32)
  if family == "heads":
    layers, masks = flat // cfg.num_heads, patching.head_masks(cfg, site, flat % cfg.num_heads)
  else:
    layers, masks = flat, jnp.ones((flat.shape[0], 1, 1, 1))
  return to_host(patching.patch_list(cfg, params, corrupt, cache, site, layers, masks, chunk)).T


def combine(screened: np.ndarray, flat: np.ndarray, patched: np.ndarray) -> np.ndarray:
  """The screen's per-pair estimates [N, *shape] with the exactly patched components ``flat`` replaced by
  their exact metrics [N, M]."""
  out = screened.reshape(screened.shape[0], -1).copy()
  out[:, flat] = patched
  return out.reshape(screened.shape)


def agreement(screened: PatchRuns, hybrid: PatchRuns, verified: np.ndarray, k: int, tol: float,
              misses: int = 5) -> dict[str, Any]:
  """How the screen ranked the exactly patched components: Spearman of estimated vs exact effects, the share
  of the exact top-k the screen's top-k finds (both among the verified components), and the components the
  screen misjudged most (largest |exact - estimate|)."""
  est, ok = screened.effects(tol)
  true, _ = hybrid.effects(tol)
  out: dict[str, Any] = dict(n_verified=int(verified.sum()), n_components=int(verified.size),
                             exact_share=float(verified.mean()),
                             verified=[[int(x) for x in idx] for idx in zip(*np.nonzero(verified))])
  if not ok or verified.sum() < 2:
    return dict(out, spearman=None, topk_recall=None, largest_misses=[])
  e, t = est.ravel()[verified.ravel()], true.ravel()[verified.ravel()]
  idx = np.flatnonzero(verified.ravel())
  k = min(k, e.size)
  worst = np.argsort(-np.abs(t - e), kind="stable")[:misses]
  return dict(out, spearman=shifts.spearman(e, t), topk_recall=shifts.topk_recall(e, t, k), k=k,
              largest_misses=[dict(component=[int(x) for x in np.unravel_index(idx[i], est.shape)],
                                   estimate=float(e[i]), exact=float(t[i])) for i in worst])
