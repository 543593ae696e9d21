"""The circuit-shift section of ``REPORT.md``: per task, each condition's gap and circuit, the shifts from the
base model against their noise floors, the tested contrasts, faithfulness, function vectors and transfer, and
a reading that states only what the intervals support (docs/circuits.md)."""

from __future__ import annotations

SHIFT_METRICS = ("tv", "tv_sel", "rank_sel", "topk_sel", "centroid")
CONTRAST_METRICS = ("tv", "rank", "topk", "centroid")
FAMILIES = ("heads", "mlps")


def _num(x: float | None, digits: int = 3) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


def _g(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.3g}"


def _ci(item: dict | None) -> str:
  """``point [lo, hi]``, with ``*`` when the item's interval lies beyond its noise floor."""
  if not item or item.get("point") is None:
    return (item or {}).get("reason", "n/a")
  ci = f" [{item['lo']:.3f}, {item['hi']:.3f}]" if item.get("lo") is not None else ""
  return f"{item['point']:.3f}{ci}{' *' if item.get('exceeds_floor') else ''}"


def intro(ft_step: int | None) -> list[str]:
  return ["## Circuit shift", "",
          "Denoising activation patching (corrupt run, clean activations patched in) of every attention head "
          "(layer x head) and MLP, screened by attribution patching and verified exactly on the top components; "
          "effects are normalised patching effects. Conditions: base (0-shot), ICL at k shots, its controls "
          "(shuffled labels; another task's demos of the same token length), fine-tuned 0-shot (ft, checkpoint "
          f"step {ft_step}, as in the table) and fine-tuned on one prompt's k demos (ft-fewshot). A condition "
          "whose clean-corrupt gap interval includes 0 has no circuit, and nothing is compared with it. Metrics: "
          "TV = total-variation distance of normalised importance, rank = 1 - Spearman, topk = 1 - top-k overlap "
          "(`_sel`: on the components distinguishable from 0 in either condition, uncorrected per-component "
          "intervals; descriptive, since the selection uses the same pairs), centroid = layer-profile centroid "
          "shift (signed); point [95% basic bootstrap interval over pairs]. Noise inflates every such shift, the "
          "more the noisier a condition is. The tested number is therefore the cross-fitted TV: over random "
          "splits of the pairs into halves, the TV between the two conditions' halves minus the TV each shows "
          "against itself between its halves, with a 95% bootstrap interval; only it enters the reading (one "
          "test per family and comparison, uncorrected for their number). It tests whether there is a shift; "
          "sizes are read from the raw metrics (noise attenuates both).", ""]


def task_section(task: str, res: dict, figures: dict[str, str]) -> list[str]:
  """Long: one task's tables in reading order, then its figures."""
  lines = [f"### {task}", "", f"Prompt pairs (format `{res['config']['fmt']}`) per condition (kept of tried, prompt "
           "tokens, dropped by reason): " + "; ".join(
               f"{n}: {p['n_pairs']} of {p['n_tried']}, {p['length']} tokens, dropped "
               + (", ".join(f"{r} {c}" for r, c in p["dropped"].items()) or "none")
               for n, p in res["pairs"].items()), ""]
  lines += _reading(res) + [""]
  conds = res["heads"]["conditions"]
  faith = res.get("faithfulness", {}).get("conditions", {})
  lines += ["| condition | clean-corrupt gap [95% CI] | circuit | distinguishable heads / MLPs (uncorrected) | split-half TV "
            "floor (heads) | circuit size (≥ {:.0%} recovered) | AtP vs exact (heads): Spearman, share exact |"
            .format(res.get("faithfulness", {}).get("threshold", 0.8)), "|---|---|---|---|---|---|---|"]
  for n, c in conds.items():
    agree = res.get("screen", {}).get(n, {}).get("heads", {})
    size = faith.get(n, {}).get("circuit_size")
    lines.append(f"| {n} | {_g(c['separation'])} [{_g(c['gap_lo'])}, {_g(c['gap_hi'])}] | "
                 f"{'yes' if c['has_circuit'] else 'none'} | {c['n_distinguishable']} / "
                 f"{res['mlps']['conditions'][n]['n_distinguishable']} | "
                 f"{_num(c['split_half']['tv']['median'])} | {size if size is not None else '–'} | "
                 f"{_num(agree.get('spearman'), 2)}, {_num(agree.get('exact_share'), 2)} |")
  lines += _shifts(res) + _contrasts(res)
  lines += _faithfulness(res.get("faithfulness")) + _vectors(res.get("vectors")) + _transfer(res.get("transfer"))
  lines.append("")
  for name, path in figures.items():
    lines += [f"![{task}: {name}]({path})", ""]
  return lines


def _corrected(item: dict) -> dict:
  """The cross-fitted TV (the tested number) of a shift or contrast entry."""
  return (item.get("tv") or {}).get("corrected") or {}


def _beyond(c: dict) -> bool:
  """A cross-fitted TV whose interval lies above 0 (for a shift) or excludes 0 (for a contrast)."""
  return bool(c.get("excludes_zero"))


def _shifts(res: dict) -> list[str]:
  rows = [f"| {key.split('|')[1]} | {f} | {_ci(_corrected(s))}{' *' if _beyond(_corrected(s)) else ''} | "
          + " | ".join(_ci(s.get(m)) for m in SHIFT_METRICS) + f" | {_num(s['tv'].get('floor'))} |"
          for f in FAMILIES for key, s in res[f]["shifts"].items()
          if key.startswith(res[f]["baseline"] + "|") and s["tv"].get("point") is not None]
  if not rows:
    return ["", "Shifts from base: none to compute (base, or every other condition, has no circuit)."]
  return ["", "Shifts from base. TV beyond noise: the cross-fitted TV (between-condition minus within-condition "
          "split-half shifts), `*` where its interval lies above 0 (the tested number); then the raw metrics, "
          "raw TV with `*` where its interval lies above the larger split-half floor (median), and that floor:", "",
          "| condition | components | TV beyond noise | " + " | ".join(SHIFT_METRICS) + " | floor (TV) |",
          "|---|---|---|" + "---|" * (len(SHIFT_METRICS) + 1)] + rows


def _contrasts(res: dict) -> list[str]:
  rows = [f"| {key} | {f} | {_ci(_corrected(c))} | {_verdict(_corrected(c))} | "
          + " | ".join(_ci(c.get(m)) for m in CONTRAST_METRICS) + f" | {_num(c['tv'].get('p_value'), 3)} |"
          for f in FAMILIES for key, c in res[f]["contrasts"].items() if not c["tv"].get("reason")]
  if not rows:
    return ["", "Contrasts: none to test (a condition of every contrast has no circuit)."] if res["heads"][
        "contrasts"] else []
  return ["", "Contrasts: shift from base of the first condition minus the second's. Tested: the cross-fitted TV "
          "contrast (a condition that is only noisier does not look shifted); the raw contrasts and the "
          "permutation p (its null is exchangeability of the two conditions, so it also rejects when they differ "
          "only in noise) for reference:", "",
          "| contrast | components | TV beyond noise | reading | " + " | ".join(CONTRAST_METRICS) + " | p (raw TV) |",
          "|---|---|---|---|" + "---|" * (len(CONTRAST_METRICS) + 1)] + rows


def _verdict(item: dict) -> str:
  if item.get("excludes_zero") is None:
    return "not estimable"
  if not item["excludes_zero"]:
    return "no difference detected"
  return "first shifts more" if item["point"] > 0 else "second shifts more"


def _reading(res: dict) -> list[str]:
  """Sentences the intervals of the tested numbers (cross-fitted TV) support, and nothing else."""
  conds = res["heads"]["conditions"]
  none = [n for n, c in conds.items() if not c["has_circuit"]]
  out, found = [], []
  if none:
    out.append(f"No circuit to compare in {', '.join(none)}: the clean-corrupt gap's interval includes 0 (the "
               "model does not separate the pair's answers there).")
  for f in FAMILIES:
    moved = [k.split("|")[1] for k, s in res[f]["shifts"].items() if k.startswith(res[f]["baseline"] + "|")
             and _beyond(_corrected(s)) and _corrected(s)["point"] > 0]
    if moved:
      found.append(f)
      out.append(f"{f}: beyond noise, the circuit moves from base under {', '.join(moved)}.")
    for key, c in res[f]["contrasts"].items():
      tv = _corrected(c)
      if _beyond(tv):
        a, b = split_contrast(key, conds)
        more, less = (a, b) if tv["point"] > 0 else (b, a)
        found.append(key)
        out.append(f"{f}: {more} moves the circuit more than {less} (test: cross-fitted TV contrast {_ci(tv)}; "
                   f"size: raw TV contrast {_ci(c['tv'])}, permutation p {_num(c['tv'].get('p_value'), 3)}).")
  if not found:
    out.append("No shift beyond noise and no contrast whose interval excludes 0: no difference detected between "
               "the conditions at this number of pairs.")
  return ["**Reading.** " + " ".join(out)]


def split_contrast(key: str, conds: dict) -> tuple[str, str]:
  """``a-b`` of two condition names that may contain hyphens."""
  for a in conds:
    if key.startswith(a + "-") and key[len(a) + 1:] in conds:
      return a, key[len(a) + 1:]
  raise ValueError(f"contrast {key!r} does not name two conditions of {list(conds)}")


def _faithfulness(f: dict | None) -> list[str]:
  if not f:
    return []
  if all("reason" in c for c in f["conditions"].values()):
    return ["", "Faithfulness: no condition has a circuit; nothing to recover."]
  ks = f["ks"]
  lines = ["", f"Faithfulness: share of the gap recovered by patching each condition's top-k components jointly "
           f"(k of {ks[-1]}), and each condition's circuit patched in every condition (rows: where patched):", "",
           "| condition | " + " | ".join(f"k={k}" for k in ks) + " | circuits patched in it |",
           "|---|" + "---|" * (len(ks) + 1)]
  for n, c in f["conditions"].items():
    if "reason" in c:
      lines.append(f"| {n} | {c['reason']} |" + " |" * len(ks))
      continue
    cross = ", ".join(f"{a}: {_ci(v)}" for a, v in c["cross"].items()) or "–"
    lines.append(f"| {n} | " + " | ".join(_ci(r) for r in c["recovered"]) + f" | {cross} |")
  if f.get("jaccard"):
    lines += ["", "Circuit overlap (Jaccard): " + ", ".join(f"{k.replace('|', ' vs ')} {v:.2f}"
                                                           for k, v in f["jaccard"].items()) + "."]
  return lines


def _vectors(v: dict | None) -> list[str]:
  if not v:
    return []
  ref = v["references"]
  best = max(range(len(v["layers"])), key=lambda l: v["layers"][l]["gain"]["point"] or float("-inf"))
  row, helps, k = v["layers"][best], v["layers_with_gain"], v["shots"]
  icl = ref[f"icl{k}"]
  return ["", f"Function vector (mean answer-position residual, {k}-shot minus 0-shot, fit on {v['n_fit']} pairs, "
          f"added to the 0-shot prompts of {v['n_held_out']} others). Pairwise preference (own answer's first token "
          f"over the other's; chance 0.5, exactly 0.5 when the model answers both prompts of every pair alike): "
          f"0-shot {_ci(ref['zero_shot']['preference'])}, {k}-shot "
          f"{_ci(icl['preference'])}; the layer of largest gain ({best}, chosen on these pairs: optimistic): "
          f"preference {_ci(row['preference'])}, score gain {_ci(row['gain'])}. Layers whose gain interval excludes "
          f"0 (uncorrected): {', '.join(map(str, helps)) if helps else 'none'}."]


def _transfer(t: dict | None) -> list[str]:
  if not t:
    return []
  lines = []
  for name, r in t.items():
    if not r["separated"]:
      lines.append(f"Transfer {name} -> base: the two models' logit differences on the clean prompts do not "
                   "differ; no effects.")
      continue
    heads = ", ".join(f"L{h['layer']}H{h['head']} {_ci(dict(point=h['effect'], lo=h['lo'], hi=h['hi']))}"
                      for h in r["heads"])
    lines.append(f"Transfer {name} -> base (its top heads patched into the base model on the clean prompt; share "
                 f"of the two models' difference moved): {heads}.")
  return [""] + lines
