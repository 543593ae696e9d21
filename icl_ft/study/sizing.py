"""Sizing a grid before paying for it (``python -m icl_ft.grid --dry_run``): per cell, the model FLOPs of each
stage (``model.flops`` conventions) and the memory per device, on a named accelerator slice, with a time estimate
at an assumed MFU.

Token counts come from sample prompts of the cell's own query sets (8 per task, variant and k), tokenized with the
model's own tokenizer where its checkpoint is on this machine, else with the embedded SmolLM2's: it splits digits
one per token as Qwen's and Gemma's do; GPT-NeoX's and GPT-Neo's BPE merge digits, so their counts (and FLOPs)
are then overestimated. Circuit FLOPs are a rough count of the tokens each prompt pair
runs (``_circuit_flops``); everything here is an estimate, labelled as such.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Sequence

from icl_ft import tasks
from icl_ft.evaluation import engine
from icl_ft.io import loading
from icl_ft.model import flops, lora
from icl_ft.model.config import ModelConfig
from icl_ft.study.config import StudyConfig, saved_steps
from icl_ft.study.grid import Cell, state

SAMPLE = 8  # prompts per (task, variant, k) whose lengths stand for the cell's
FAITHFULNESS_KS = 10  # joint-patch sizes the faithfulness curve evaluates
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  devices: int  # JAX devices (TPU v4/v5p: chips, i.e. half the cores the type names)
  hbm: float | None  # bytes per device
  peak: float | None  # dense bf16 FLOP/s per device


# type -> (devices per unit of the type's number, HBM bytes per device, peak bf16 TFLOP/s per device)
_TPU = {"v4": (0.5, 32 * GiB, 275), "v5p": (0.5, 95e9, 459), "v5e": (1, 16 * GiB, 197),
        "v5litepod": (1, 16 * GiB, 197), "v6e": (1, 32 * GiB, 918)}
_GPU = {"a100": (80e9, 312), "h100": (80e9, 989), "h200": (141e9, 989)}


def parse_slice(spec: str) -> Slice:
  """``v4-32`` (16 chips), ``v5e-16``, ``v5p-8``, ``8xh100``...; empty: this machine's JAX devices."""
  if not spec:
    import jax
    devices = jax.devices()
    limit = (devices[0].memory_stats() or {}).get("bytes_limit") if hasattr(devices[0], "memory_stats") else None
    return Slice(f"this machine ({len(devices)} {devices[0].platform} device(s))", len(devices), limit, None)
  if m := re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", spec):
    per, hbm, peak = _TPU[m[1]]
    return Slice(spec, max(1, int(int(m[2]) * per)), hbm, peak * 1e12)
  if m := re.fullmatch(r"(\d+)x(a100|h100|h200)", spec):
    hbm, peak = _GPU[m[2]]
    return Slice(spec, int(m[1]), hbm, peak * 1e12)
  raise ValueError(f"unknown slice {spec!r}: use e.g. v4-32, v5e-16, v5p-8, v6e-8, 8xh100, 4xa100")


@functools.lru_cache(maxsize=None)
def _tokenizer(model: str):
  """The model's own tokenizer if it is on this machine, else the embedded model's (see the module docstring)."""
  return loading.local_tokenizer(model) or loading.local_tokenizer(loading.DEFAULT_MODEL)


@functools.lru_cache(maxsize=None)
def _prompt_lengths(model: str, task: str, variant: str, fmt: str, shots: int, seed: int) -> tuple[int, ...]:
  """Prompt lengths in ``model``'s tokens (``_tokenizer``) of the first ``SAMPLE`` queries of the set."""
  return tuple(len(_tokenizer(model)(q.prompt).input_ids)
               for q in engine.icl_queries(task, variant, fmt, shots, SAMPLE, seed))


def _prompt_tokens(model: str, task: str, variant: str, fmt: str, shots: int, seed: int) -> float:
  """Mean prompt length in tokens (``_prompt_lengths``)."""
  lengths = _prompt_lengths(model, task, variant, fmt, shots, seed)
  return sum(lengths) / len(lengths)


@functools.lru_cache(maxsize=None)
def _ft_lengths(model: str, ft_tasks: tuple[str, ...], seed: int, fmt: str, with_header: bool) -> tuple[float, int]:
  """Mean and longest tokens of a sample of fine-tuning texts (``tasks.ft_text``)."""
  texts = [tasks.ft_text(ex, fmt, with_header) for t in ft_tasks for ex in tasks.make_ft_examples(t, SAMPLE, seed, fmt)]
  lengths = [len(_tokenizer(model)(s).input_ids) for s in texts]
  return sum(lengths) / len(lengths), max(lengths)


def _ft_tokens(cfg: StudyConfig) -> tuple[float, int]:
  """``_ft_lengths`` of the study's fine-tuning data (computed once per data setting: FLOPs and memory use it)."""
  d = cfg.ft_data
  return _ft_lengths(cfg.model, tuple(d.tasks), d.seed, cfg.format, d.with_header)


def _queries(cfg: StudyConfig, task: str, variant: str, k: int, n: int, generate: int, m: ModelConfig) -> float:
  """FLOPs of ``n`` queries at k demos: the prompt's forward and the generated tokens."""
  T = _prompt_tokens(cfg.model, task, variant, cfg.format, k, cfg.seed)
  return n * (T * flops.forward_flops_per_token(m, T, causal=True) + generate * flops.forward_flops_per_token(m, T))


def stage_flops(cfg: StudyConfig, m: ModelConfig) -> dict[str, float]:
  """Estimated model FLOPs of each stage of a study. Long: one term per stage."""
  out = dict(icl=0.0, finetune=0.0, ft_eval=0.0, circuits=0.0)
  evals = len(cfg.ft_eval_steps or saved_steps(cfg.train)) + (1 if cfg.fewshot else 0)
  for task in cfg.tasks:
    gen = tasks.generation_len(task, cfg.format)
    for variant in (v for v in cfg.variants if v in tasks.get_task(task).variants):
      for k in cfg.shots:
        n = cfg.n_by_shots.get(k, cfg.n_queries) + (cfg.n_dev if k else 0)
        out["icl"] += _queries(cfg, task, variant, k, n, gen, m)
      if cfg.icl_controls:
        n = cfg.n_by_shots.get(cfg.control_shots, cfg.n_queries)
        out["icl"] += len(cfg.icl_controls) * _queries(cfg, task, variant, cfg.control_shots, n, gen, m)
      out["ft_eval"] += evals * sum(_queries(cfg, task, variant, k, cfg.n_queries, gen, m) for k in cfg.ft_eval_shots)
  T = _ft_tokens(cfg)[0]
  adapters = lora.num_params(m, cfg.train.lora) if cfg.train.lora else None
  per_example = flops.train_flops(m, T, T * T, adapters)  # the LM head at every token: an upper bound for loss_on=answer
  out["finetune"] = cfg.train.steps * cfg.train.batch_size * per_example  # grad_accum splits the batch
  if cfg.fewshot:
    out["finetune"] += cfg.fewshot.steps * cfg.fewshot.batch_size * per_example
  for cc in cfg.circuits:
    out["circuits"] += _circuit_flops(cc, cfg, m)
  return out


def _circuit_flops(cc, cfg: StudyConfig, m: ModelConfig) -> float:
  """Per condition and pair: clean, corrupt and the attribution backward over the whole prompt; the exact patches
  (verified components of both families, faithfulness, vectors) rerun the query's tokens from the first corrupted
  one (at most the 0-shot query's length), the residual sweep half the layers on average per (layer, position)."""
  conditions = len(cc.prompt_conditions()) + 1 + (1 if cfg.fewshot else 0)
  T = _prompt_tokens(cfg.model, cc.task, "correct", cc.fmt, max(cc.icl_shots), cfg.seed)
  Tq = _prompt_tokens(cfg.model, cc.task, "correct", cc.fmt, 0, cfg.seed)
  per_token = flops.forward_flops_per_token(m, T, causal=True)
  positions = cc.resid_last or Tq
  passes = 3 * T + (2 * cc.verify + FAITHFULNESS_KS + 2) * Tq + m.num_layers * positions * Tq / 2
  return conditions * cc.n_pairs * passes * per_token


def memory_per_device(cfg: StudyConfig, m: ModelConfig, devices: int) -> dict[str, float]:
  """Bytes per device: fine-tuning's peak (``flops.train_memory_per_device``: full fine-tuning, an upper bound for
  LoRA; FSDP over the fsdp and tensor axes, the micro-batch over the data-parallel devices) and inference's
  parameters plus the KV cache of one batch of the longest sampled prompts."""
  mesh = {a: cfg.mesh.get(a, 1) for a in ("data", "fsdp", "tensor")}
  fixed = math.prod(v for v in mesh.values() if v != -1)
  if devices % fixed or (-1 not in mesh.values() and fixed != devices):
    raise ValueError(f"mesh {cfg.mesh} does not fit {devices} devices; set --config.study.mesh.* for this slice")
  mesh = {a: devices // fixed if v == -1 else v for a, v in mesh.items()}
  shards = mesh["fsdp"] * mesh["tensor"]
  micro = max(1, math.ceil(cfg.train.batch_size / cfg.train.grad_accum / (mesh["data"] * mesh["fsdp"])))
  T = _ft_tokens(cfg)[1]  # a batch is as long as its longest text
  train = flops.train_memory_per_device(m, shards, micro, T, cfg.train.remat,
                                        2 if cfg.train.compute_dtype == "bfloat16" else 4)["total"]
  width = 2 if cfg.dtype == "bfloat16" else 4
  longest = max(max(_prompt_lengths(cfg.model, t, "correct", cfg.format, max(cfg.shots), cfg.seed)) for t in cfg.tasks) + 64
  kv = 2 * m.num_layers * cfg.icl_engine.batch_size * longest * m.num_kv_heads * m.head_dim * width
  return dict(finetune=train, inference=(m.num_params() * width + kv) / shards)


def _si(x: float) -> str:
  for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
    if x >= scale:
      return f"{x / scale:.1f} {unit}"
  return f"{x:.0f} "


def dry_run(cells: Sequence[Cell], slice_spec: str, mfu: float) -> str:
  """The cells with their work directories and states, then per cell its estimated FLOPs per stage, memory per
  device (flagged where it exceeds the device's memory) and time at ``mfu`` on the slice."""
  sl = parse_slice(slice_spec)
  lines = [f"{'cell':>4}  {'model':<16} {'dtype':<9} {'tasks':<40} {'seed':>7} {'ft seed':>7}  {'state':<8}  work directory"]
  lines += [f"{c.index:>4}  {c.model:<16} {c.dtype:<9} {'+'.join(c.tasks):<40} {c.seed:>7} {c.ft_seed:>7}  "
            f"{state(c):<8}  {c.cfg.workdir}" for c in cells]
  where = f"{sl.name}: {sl.devices} device(s)" + (f" of {sl.hbm / GiB:.0f} GiB" if sl.hbm else "") + (
      f", {sl.peak / 1e12:.0f} TFLOP/s bf16 peak each" if sl.peak else "")
  lines += ["", f"Estimates on {where}; FLOPs of the model's matmuls and attention (model.flops), time at MFU {mfu}:",
            f"{'cell':>4}  {'icl':>9} {'finetune':>9} {'ft_eval':>9} {'circuits':>9} {'total':>9}FLOP  "
            f"{'FT GiB/dev':>10} {'infer GiB/dev':>13}  {'hours':>6}"]
  total = 0.0
  for c in cells:
    try:
      m = loading.sizing_config(c.model)
      f = stage_flops(c.cfg, m)
      mem = memory_per_device(c.cfg, m, sl.devices)
    except (loading.ModelNotFoundError, ValueError) as e:
      lines.append(f"{c.index:>4}  cannot size: {e}")
      continue
    over = " (exceeds)" if sl.hbm and max(mem.values()) > sl.hbm else ""
    hours = sum(f.values()) / (sl.devices * sl.peak * mfu) / 3600 if sl.peak else float("nan")
    total += hours if sl.peak else 0.0
    lines.append(f"{c.index:>4}  " + " ".join(f"{_si(v):>9}" for v in (*f.values(), sum(f.values()))) +
                 f"      {mem['finetune'] / GiB:>10.1f} {mem['inference'] / GiB:>13.1f}{over}  {hours:>6.2f}")
  if sl.peak:
    lines.append(f"total: {total:.1f} hours on {sl.name} at MFU {mfu} (compile time and I/O not included)")
  return "\n".join(lines)
