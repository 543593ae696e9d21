"""Device mesh, logical-axis rules, and parameter shardings.

One table (``RULES``) maps the logical axes that ``decoder.param_axes`` declares to mesh axes. The
default mesh is data x FSDP x tensor parallelism; few KV heads limit ``tensor``, so FSDP + data
parallelism is the default for training.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import param_axes

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes it is split over (None: replicated).
RULES: Mapping[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "layers": None,
    "norm": None,
    "length": None,
}


class MeshError(ValueError):
  """The requested mesh does not fit the devices or does not divide the model."""


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ``devices`` with axes ``MESH_AXES``; one axis may be -1 (all remaining devices).

  The default puts every device on ``fsdp``. Axes are ``Auto``, so GSPMD propagates shardings.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"fsdp": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"unknown mesh axes {sorted(unknown)}; valid axes: {MESH_AXES}")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise MeshError(f"at most one mesh axis may be -1, got {shape}")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if len(devices) % rest:
      raise MeshError(f"mesh {shape} does not fit {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // rest
  if math.prod(sizes) != len(devices):
    raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                    f"but {len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_spec(axes: Sequence[str]) -> P:
  """PartitionSpec for a leaf with the given logical axes."""
  out, used = [], set()
  for a in axes:
    mesh_axes = RULES[a]
    if mesh_axes and used.isdisjoint(mesh_axes):
      used.update(mesh_axes)
      out.append(mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    else:
      out.append(None)
  return P(*out)


def check_divisible(cfg: ModelConfig, mesh: Mesh) -> None:
  """Raises ``MeshError`` naming every parameter dimension the mesh does not divide."""
  problems = []
  for path, (shape, axes) in param_axes(cfg).items():
    for dim, (size, part) in enumerate(zip(shape, logical_spec(axes))):
      if part is None:
        continue
      n = math.prod(mesh.shape[a] for a in ((part,) if isinstance(part, str) else part))
      if size % n:
        problems.append(f"{path} dim {dim} ({axes[dim]}={size}) over {part}={n}")
  if problems:
    raise MeshError(
        f"mesh {dict(mesh.shape)} does not divide the {cfg.arch} model: " + "; ".join(problems[:6]) +
        ". Choose axis sizes that divide these dimensions (e.g. move devices from 'tensor' to 'fsdp').")


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, NamedSharding]:
  """NamedSharding per '/'-joined parameter path, after checking divisibility."""
  check_divisible(cfg, mesh)
  return {path: NamedSharding(mesh, logical_spec(axes)) for path, (_, axes) in param_axes(cfg).items()}


def tree_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
  """The same shardings arranged as the nested parameter tree (for ``jit`` in/out shardings)."""
  tree: dict = {}
  for path, s in param_shardings(cfg, mesh).items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = s
  return tree


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch-major arrays are split over data and FSDP devices."""
  return NamedSharding(mesh, logical_spec(("batch",) + ("length",) * (ndim - 1)))


def maybe_initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize`` on multi-host runs (TPU pods, SLURM, or explicit env).

  Single-process runs are left alone. Returns whether initialisation happened.
  """
  explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
  if not (explicit or slurm or tpu_pod):
    return False
  # CPU processes (tests, simulated multi-host) need a cross-process collectives backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(
        coordinator_address=explicit,
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()  # cluster auto-detection (SLURM, Cloud TPU)
  return True


def barrier(name: str) -> None:
  """Waits for every process of a multi-host run (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def all_agree(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (a multi-host minimum; ``ok`` itself on one process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def to_host(tree):
  """Device arrays -> numpy on every process (a multi-host all-gather where arrays span processes)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
