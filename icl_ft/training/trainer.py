"""Sharded fine-tuning (full or LoRA) with optax, Orbax checkpoints, resumption and metrics.

The train step is one ``jax.jit`` with explicit in/out shardings: parameters and optimizer state follow
``sharding.RULES`` (FSDP over ``fsdp``, tensor parallelism over ``tensor``), the batch is split over
``data`` x ``fsdp``. Gradients are accumulated over micro-batches inside the step (``lax.scan``). The
loss is the mean token cross-entropy over the loss-masked tokens of the global batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from icl_ft import faults
from icl_ft.io import checkpoints, files
from icl_ft.model import flops
from icl_ft.training import dataset
from icl_ft.model import lora
from icl_ft.model import sharding
from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import Params, run

F32 = jnp.float32


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite."""


HELDOUT = "heldout.jsonl"  # held-out loss per saved step, next to metrics.jsonl
SCHEDULES = ("constant_with_warmup", "cosine")  # the release's; or cosine decay after warmup


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  batch_size: int = 16  # global batch (examples per optimizer step)
  grad_accum: int = 1  # micro-batches per step
  lr: float = 1e-5
  warmup_steps: int = 20
  schedule: str = "constant_with_warmup"  # the release's; or "cosine"
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0
  compute_dtype: str = "float32"  # forward/backward dtype; parameters and optimizer state stay float32
  remat: bool = False
  # Unrolled layers: ~3% faster single-device XLA CPU steps. Turn off (lax.scan) with remat for FSDP-sharded
  # large models: unrolled, XLA keeps every layer's gathered weights alive (7B: 51 GiB/device of temps).
  unroll_layers: bool = True
  lora: lora.LoRAConfig | None = None
  save_every: int = 10
  keep: int = 3
  seed: int = 42
  peak_flops: float | None = None  # FLOP/s for MFU; None: measure the matmul ceiling once


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 (as transformers' ``constant_with_warmup``: lr 0 at step 0), then constant or cosine."""
  warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  if cfg.schedule == "constant_with_warmup":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps - cfg.warmup_steps, 1))
  else:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
  if cfg.warmup_steps == 0:
    return after
  return optax.join_schedules([warm, after], [cfg.warmup_steps])


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (decoupled weight decay, torch's eps placement)."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
      optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))


def token_loss(cfg: ModelConfig, params: Params, batch: dict, remat: bool = False,
               unroll: bool = True) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token cross-entropies at ``loss_at`` where ``loss_mask``, number of such tokens) for one
  batch (``dataset._padded``'s arrays); the LM head runs only at ``loss_at``."""
  ids, valid, at = batch["ids"], batch["valid"], batch["loss_at"]
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  # ``unroll``: see ``TrainConfig.unroll_layers`` (compiles ~2.5x longer).
  logits, _, _ = run(cfg, params, ids, positions, valid, logits_at=at, remat=remat, unroll=unroll)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.take_along_axis(ids, at + 1, axis=1))
  mask = batch["loss_mask"].astype(F32)
  return jnp.sum(ce * mask), jnp.sum(mask)


def _loss_fn(model_cfg: ModelConfig, cfg: TrainConfig) -> Callable:
  """loss(trainable, frozen, batch) -> ``token_loss`` of the model training sees (LoRA attached, compute dtype)."""
  compute = jnp.dtype(cfg.compute_dtype)

  def loss(trainable, frozen, mb):
    params = lora.attach(frozen, trainable, cfg.lora) if cfg.lora else trainable
    params = jax.tree.map(lambda p: p.astype(compute), params)
    return token_loss(model_cfg, params, mb, cfg.remat, cfg.unroll_layers)

  return loss


def make_train_step(model_cfg: ModelConfig, cfg: TrainConfig, opt: optax.GradientTransformation) -> Callable:
  """step(state, batch, frozen) -> (state, metrics); ``batch`` arrays are [grad_accum, micro_batch, T] (``loss_at``
  and ``loss_mask``: [..., N], see ``dataset._padded``).

  ``state`` = {"params": float32 trainable tree (full params, or LoRA factors), "opt": optax state,
  "step": int32}. The forward runs in ``cfg.compute_dtype``. ``frozen`` is the base model when
  training LoRA (an argument, never updated), else None.
  """
  grad_fn = jax.value_and_grad(_loss_fn(model_cfg, cfg), has_aux=True)

  def step(state, batch, frozen=None):
    def micro(carry, mb):
      g_acc, loss_acc, n_acc = carry
      (loss_sum, n), g = grad_fn(state["params"], frozen, mb)
      return (jax.tree.map(lambda a, b: a + b.astype(F32), g_acc, g), loss_acc + loss_sum, n_acc + n), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, F32), state["params"])
    (grads, loss_sum, n), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), F32), jnp.zeros((), F32)), batch)
    grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), grads)
    updates, opt_state = opt.update(grads, state["opt"], state["params"])
    lengths = batch["valid"].sum(-1).astype(F32)
    metrics = {"loss": loss_sum / jnp.maximum(n, 1.0), "grad_norm": optax.tree.norm(grads), "loss_tokens": n,
               "tokens": lengths.sum(), "tokens_sq": (lengths ** 2).sum(), "lr": schedule(cfg)(state["step"])}
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state,
            "step": state["step"] + 1}, metrics

  return step


def initial_state(model_cfg: ModelConfig, base_params: Params, cfg: TrainConfig,
                  mesh: jax.sharding.Mesh) -> tuple[dict, Params | None]:
  """(train state at step 0 in its shardings, frozen base params for LoRA or None)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if cfg.lora:
    trainable = jax.device_put(lora.init(model_cfg, cfg.lora, jax.random.key(cfg.seed)), replicated)
    frozen = base_params
  else:
    param_sh = sharding.tree_shardings(model_cfg, mesh)
    # A float32 copy in the training shardings (never the caller's buffers: the step donates its state).
    trainable = jax.jit(lambda t: jax.tree.map(lambda p: jnp.copy(p.astype(F32)), t), out_shardings=param_sh)(base_params)
    frozen = None
  opt = optimizer(cfg)
  opt_state = jax.jit(opt.init, out_shardings=_like_params(jax.eval_shape(opt.init, trainable), trainable, replicated))(
      trainable)
  return {"params": trainable, "opt": opt_state, "step": jax.device_put(jnp.zeros((), jnp.int32), replicated)}, frozen


def _like_params(tree, params: Params, default: jax.sharding.Sharding):
  """Shardings for ``tree`` (e.g. optimizer state): a leaf whose key path ends in a parameter's path gets
  that parameter's sharding (Adam moments); anything else (step counts) gets ``default``."""
  by_path = {tuple(k): x.sharding for k, x in jax.tree_util.tree_leaves_with_path(params)}

  def pick(path, _):
    return next((by_path[tuple(path[i:])] for i in range(len(path)) if tuple(path[i:]) in by_path), default)

  return jax.tree_util.tree_map_with_path(pick, tree)


TRAJECTORY = ("batch_size", "grad_accum", "lr", "warmup_steps", "schedule", "weight_decay", "b1", "b2", "eps",
              "clip_norm", "compute_dtype", "seed")  # what a resumed run must share with the checkpoint's


def _fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, data: dataset.FTDataset) -> dict:
  """What a checkpoint must match to be resumed: the model's shapes, the trained parameter set, the recipe
  (``TRAJECTORY``, and ``steps`` under a cosine schedule, whose rate depends on it) and a digest of the data.
  More steps of a constant schedule resume: the same run, longer."""
  shapes = dataclasses.asdict(model_cfg)
  shapes.pop("hf_config")
  recipe = {k: getattr(cfg, k) for k in TRAJECTORY} | ({"steps": cfg.steps} if cfg.schedule == "cosine" else {})
  return {"model": shapes, "lora": dataclasses.asdict(cfg.lora) if cfg.lora else None, **recipe,
          "data": _digest([data.ids, data.loss_mask])}


@dataclasses.dataclass
class TrainResult:
  params: Params  # full parameters (LoRA merged in) after the last step
  trainable: Params
  metrics: list[dict]
  checkpoint_dir: str
  heldout: list[dict]  # {step, samples, loss} before training and at each save (empty without held-out data)


def check_batch(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> None:
  """ValueError unless the micro-batch (batch_size / grad_accum) is a whole multiple of the data-parallel
  devices (data x fsdp)."""
  n_data = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  if cfg.batch_size % cfg.grad_accum or (cfg.batch_size // cfg.grad_accum) % n_data:
    raise ValueError(
        f"batch_size {cfg.batch_size} / grad_accum {cfg.grad_accum} = micro-batch {cfg.batch_size / cfg.grad_accum:g} "
        f"must be a whole multiple of the data-parallel devices (data x fsdp = {n_data})")


def train(model_cfg: ModelConfig, base_params: Params, data: dataset.FTDataset, cfg: TrainConfig,
          workdir: files.PathLike, mesh: jax.sharding.Mesh | None = None, length_multiple: int = 32,
          progress: bool = True, heldout: Mapping[str, dataset.FTDataset] | None = None) -> TrainResult:
  """Fine-tunes for ``cfg.steps`` steps, resuming from the latest checkpoint in ``workdir/checkpoints``.

  Checkpoints (parameters, optimizer state, step; the data position is the step, since batch order is
  a function of (seed, step)) are saved every ``save_every`` steps and at the end, keeping ``keep``.
  A NaN/inf loss raises ``TrainingDivergedError`` without saving; the last good checkpoint remains. Metrics go
  to ``workdir/metrics.jsonl``; ``heldout`` sets' losses at step 0 and every save to ``heldout.jsonl``.
  """
  mesh = mesh or sharding.make_mesh()
  workdir = files.as_path(workdir)
  check_batch(cfg, mesh)
  state, frozen = initial_state(model_cfg, base_params, cfg, mesh)
  step_fn, batch_sh = _compiled_step(model_cfg, cfg, mesh, state, frozen is not None)
  fingerprint = _fingerprint(model_cfg, cfg, data)
  metrics_path = workdir / "metrics.jsonl"
  history = files.read_jsonl(metrics_path) if metrics_path.exists() else []
  held = _HeldoutLog(model_cfg, cfg, heldout or {}, mesh, length_multiple, workdir / HELDOUT)
  with checkpoints.manager(workdir / "checkpoints", keep=cfg.keep) as mngr:
    restored, start = checkpoints.restore_latest(mngr, checkpoints.abstract(state), fingerprint)
    state = state if restored is None else restored
    history = [m for m in history if m["step"] <= (start or 0)]
    held.resume(start or 0, state["params"], frozen)
    meter = _Meter(model_cfg, cfg)
    rows = dataset.split_rows(cfg.batch_size, jax.process_index(), jax.process_count())
    bar = tqdm(range(start or 0, cfg.steps), initial=start or 0, total=cfg.steps, desc="train", disable=not progress)
    for step in bar:
      local = dataset.batch_at(data, step, cfg.batch_size, cfg.seed, length_multiple, rows)
      local = {k: v.reshape(cfg.grad_accum, -1, v.shape[-1]) for k, v in local.items()}
      batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
      t0 = time.perf_counter()
      state, m = step_fn(state, batch, frozen)
      m = meter(step, {k: float(v) for k, v in jax.device_get(m).items()}, time.perf_counter() - t0)
      if not math.isfinite(m["loss"]):
        raise TrainingDivergedError(
            f"loss is {m['loss']} at step {step + 1}; stopped without saving. The last good checkpoint is "
            f"step {mngr.latest_step()} in {workdir / 'checkpoints'}. Lower the learning rate or use float32 compute.")
      history.append(m)
      bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
      faults.point("finetune.step")  # a kill here loses the steps since the last checkpoint
      if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
        held.measure(step + 1, m["samples"], state["params"], frozen)
        checkpoints.save(mngr, step + 1, state, fingerprint)
        faults.point("finetune.save")  # a kill here leaves a half-written checkpoint, which Orbax ignores
        mngr.wait_until_finished()
        files.write_jsonl(metrics_path, history)
  files.write_jsonl(metrics_path, history)
  final = lora.merge(model_cfg, base_params, state["params"], cfg.lora) if cfg.lora else state["params"]
  return TrainResult(final, state["params"], history, str(workdir / "checkpoints"), held.rows)


def _compiled_step(model_cfg: ModelConfig, cfg: TrainConfig, mesh: jax.sharding.Mesh, state: dict, lora_on: bool):
  """The jitted train step with its in/out shardings (state donated), and the batch sharding."""
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), None))
  frozen_sh = sharding.tree_shardings(model_cfg, mesh) if lora_on else None
  step_fn = jax.jit(make_train_step(model_cfg, cfg, optimizer(cfg)), in_shardings=(state_sh, batch_sh, frozen_sh),
                    out_shardings=(state_sh, None), donate_argnums=0)
  return step_fn, batch_sh


def _digest(payload) -> str:
  return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


class _HeldoutLog:
  """The held-out losses of a run (``workdir/heldout.jsonl``): per set (name -> examples) the mean next-token
  loss per scored token, in micro-batches, with a digest of the sets; rows of other sets are dropped."""

  def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, sets: Mapping[str, dataset.FTDataset],
               mesh: jax.sharding.Mesh, length_multiple: int, path):
    self.path, self.rows, self.batches = path, [], {}
    if not sets:
      return
    self.digest = _digest({k: [d.ids, d.loss_mask] for k, d in sorted(sets.items())})
    self.loss = jax.jit(_loss_fn(model_cfg, cfg))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None))
    micro = cfg.batch_size // cfg.grad_accum
    rows = dataset.split_rows(micro, jax.process_index(), jax.process_count())
    self.batches = {name: [{k: jax.make_array_from_process_local_data(sh, v) for k, v in b.items()}
                           for b in dataset.eval_batches(data, micro, length_multiple, rows)]
                    for name, data in sets.items()}

  def resume(self, start: int, trainable: Params, frozen: Params | None) -> None:
    """Keeps the saved rows up to ``start``; before training (``start`` 0) measures step 0."""
    if not self.batches:
      return
    saved = files.read_jsonl(self.path) if self.path.exists() else []
    self.rows = [h for h in saved if h.get("data") == self.digest and h["step"] <= start]
    if start == 0 and not self.rows:
      self.measure(0, 0, trainable, frozen)

  def measure(self, step: int, samples: int, trainable: Params, frozen: Params | None) -> None:
    if not self.batches:
      return
    row = dict(step=step, samples=samples, data=self.digest)
    for name, batches in self.batches.items():
      sums = [self.loss(trainable, frozen, b) for b in batches]
      row[name] = sum(float(s) for s, _ in sums) / max(sum(float(n) for _, n in sums), 1.0)
    self.rows.append(row)
    files.write_jsonl(self.path, self.rows)


class _Meter:
  """Per-step metrics: the step's own (loss, grad norm, tokens, lr) plus step, samples, time, real tokens/s and
  MFU on useful work only (real tokens, no bucket padding, the LM head at the scored tokens; LoRA charged for the
  gradients it needs) against
  the matmul ceiling measured in the compute dtype."""

  def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig):
    self.model_cfg, self.cfg = model_cfg, cfg
    ceiling = cfg.peak_flops or flops.matmul_ceiling(dtype=jnp.dtype(cfg.compute_dtype)).median * 1e9
    self.peak = ceiling * (1 if cfg.peak_flops else jax.device_count())
    self.adapters = lora.num_params(model_cfg, cfg.lora) if cfg.lora else None

  def __call__(self, step: int, m: dict, dt: float) -> dict:
    work = flops.train_flops(self.model_cfg, m["tokens"], m.pop("tokens_sq"), self.adapters, m["loss_tokens"])
    return dict(m, step=step + 1, samples=(step + 1) * self.cfg.batch_size, step_time_s=dt,
                tokens_per_s=m["tokens"] / dt, mfu=work / dt / self.peak)


def trained_params(model_cfg: ModelConfig, cfg: TrainConfig, mesh: jax.sharding.Mesh) -> Params:
  """The abstract tree of what training updates (float32 parameters in their shardings, or the LoRA adapters)."""
  if cfg.lora:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = jax.eval_shape(lambda: lora.init(model_cfg, cfg.lora, jax.random.key(0)))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)
  from icl_ft.model.decoder import abstract_params
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, F32, sharding=s), abstract_params(model_cfg),
                      sharding.tree_shardings(model_cfg, mesh))


def checkpoint_params(model_cfg: ModelConfig, base_params: Params, cfg: TrainConfig, workdir: files.PathLike,
                      steps: Sequence[int] | None = None, mesh: jax.sharding.Mesh | None = None
                      ) -> Iterator[tuple[int, Params]]:
  """Yields (step, full parameters with LoRA merged) for the saved ``steps`` (default: all kept), restoring
  the trained parameters alone (no optimizer state)."""
  abstract = trained_params(model_cfg, cfg, mesh or sharding.make_mesh())
  for step, trained in checkpoints.saved_params(files.as_path(workdir) / "checkpoints", abstract, steps):
    yield step, lora.merge(model_cfg, base_params, trained, cfg.lora) if cfg.lora else trained


def compiled_memory(model_cfg: ModelConfig, cfg: TrainConfig, mesh: jax.sharding.Mesh, seq: int) -> dict[str, int]:
  """Ahead-of-time compiles the full-FT train step for abstract (never allocated) arrays on ``mesh`` and
  returns XLA's per-device memory analysis in bytes (works with simulated CPU devices)."""
  from icl_ft.model.decoder import abstract_params
  param_sh = sharding.tree_shardings(model_cfg, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, F32, sharding=s), abstract_params(model_cfg), param_sh)
  opt = optimizer(cfg)
  opt_shape = jax.eval_shape(opt.init, params)
  opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_shape,
                           _like_params(opt_shape, params, replicated))
  state = {"params": params, "opt": opt_state, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), None))
  shape = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum, seq)
  scored = shape[:2] + (seq - 1,)  # every position scored: the most the LM head can cost
  batch = {"ids": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh),
           "valid": jax.ShapeDtypeStruct(shape, bool, sharding=batch_sh),
           "loss_at": jax.ShapeDtypeStruct(scored, jnp.int32, sharding=batch_sh),
           "loss_mask": jax.ShapeDtypeStruct(scored, bool, sharding=batch_sh)}
  state_sh = jax.tree.map(lambda a: a.sharding, state)
  step = jax.jit(make_train_step(model_cfg, cfg, opt), in_shardings=(state_sh, batch_sh, None),
                 out_shardings=(state_sh, None), donate_argnums=0)
  analysis = step.lower(state, batch, None).compile().memory_analysis()
  return {k: int(getattr(analysis, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias", "generated_code")}
