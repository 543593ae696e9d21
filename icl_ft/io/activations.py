"""Captured activations on disk: chunked zarr arrays written with tensorstore, shard by shard per host,
and opened lazily (index, then ``.read().result()``) for offline analysis or sweeps over many prompts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
import tensorstore as ts


def _spec(path: Path) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}


def write(directory: str | os.PathLike, arrays: Mapping[str, jax.Array], chunks: Mapping[str, tuple] | None = None) -> Path:
  """Writes each (possibly sharded) array to ``directory/<name>`` as zarr.

  Process 0 creates the arrays; every host then writes only the shards it holds (one replica each),
  so no host ever gathers the full array. Default chunks: one layer (leading axis) by one example.
  """
  from jax.experimental import multihost_utils
  root = Path(directory)
  for name, array in arrays.items():
    shape = tuple(int(s) for s in array.shape)
    chunk = tuple(chunks[name]) if chunks and name in chunks else (1, 1) + shape[2:] if len(shape) > 2 else shape
    metadata = {"shape": shape, "chunks": [min(c, s) for c, s in zip(chunk, shape)],
                "dtype": np.dtype(array.dtype).str}
    if jax.process_index() == 0:
      ts.open({**_spec(root / name), "metadata": metadata}, create=True, delete_existing=True).result()
    multihost_utils.sync_global_devices(f"icl_ft.activations.create.{name}")
    store = ts.open(_spec(root / name)).result()
    shards = array.addressable_shards if isinstance(array, jax.Array) else None
    if shards is None:
      store.write(np.asarray(array)).result()
      continue
    for shard in shards:
      if shard.replica_id == 0:
        store[shard.index].write(np.asarray(shard.data)).result()
  multihost_utils.sync_global_devices("icl_ft.activations.written")
  return root


def open_lazy(directory: str | os.PathLike, name: str) -> ts.TensorStore:
  """A lazily-read view of ``directory/<name>``: slicing reads only the chunks it touches."""
  path = Path(directory) / name
  if not path.exists():
    raise FileNotFoundError(f"no stored activations {name!r} in {directory}")
  return ts.open(_spec(path), open=True).result()
