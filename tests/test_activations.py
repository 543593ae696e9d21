"""Activations stored with tensorstore (zarr): exact round trip, lazy slicing, sharded writes."""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from icl_ft.io import activations


def test_round_trip_and_lazy_slice(tmp_path):
  a = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32))
  activations.write(tmp_path, {"resid_pre": a})
  store = activations.open_lazy(tmp_path, "resid_pre")
  assert store.shape == (3, 4, 5, 6)
  np.testing.assert_array_equal(store[1, 2].read().result(), np.asarray(a[1, 2]))
  np.testing.assert_array_equal(store.read().result(), np.asarray(a))
  with pytest.raises(FileNotFoundError, match="no stored activations"):
    activations.open_lazy(tmp_path, "attn_z")


def test_sharded_array_is_written_shard_by_shard(tmp_path):
  code = textwrap.dedent("""
      import sys, jax, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from icl_ft.io import activations
      from icl_ft.model import sharding
      mesh = sharding.make_mesh({"fsdp": 8})
      x = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)
      arr = jax.device_put(x, NamedSharding(mesh, P(None, "fsdp")))
      activations.write(sys.argv[1], {"x": arr}, chunks={"x": (1, 1, 3)})
      np.testing.assert_array_equal(activations.open_lazy(sys.argv[1], "x").read().result(), x)
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                     cwd=os.path.dirname(os.path.dirname(__file__)))
  assert r.returncode == 0, r.stderr[-2000:]
  assert len(list((tmp_path / "x").glob("*.*.*"))) == 16  # one chunk file per (layer, example)
