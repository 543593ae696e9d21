"""Sharded (8 simulated CPU devices) equals unsharded. Runs in a subprocess: the device count is process-wide."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import torch_logits

CHECK = textwrap.dedent("""
    import sys, jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from icl_ft import loading, sharding
    from icl_ft.model import forward, positions_from_valid
    assert jax.device_count() == 8, jax.devices()
    directory, mesh_spec = sys.argv[1], eval(sys.argv[2])
    mesh = sharding.make_mesh(mesh_spec)
    m = loading.load(directory, mesh=mesh, use_cache=False)
    q = m.params["layers"]["q"]
    assert q.sharding.mesh.shape == mesh.shape, q.sharding
    print("SPEC", q.sharding.spec, m.params["embed"].sharding.spec)
    ids = (np.arange(8 * 24).reshape(8, 24) * 7) % 96
    valid = np.ones(ids.shape, bool)
    ids_s = jax.device_put(ids, sharding.batch_sharding(mesh))
    f = jax.jit(forward, static_argnums=0)
    logits, _ = f(m.config, m.params, ids_s, positions_from_valid(valid), valid)
    np.save(sys.argv[3], np.asarray(logits))
""")


def _run(args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", CHECK, *args], env=env, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("mesh", ["{'fsdp': 8}", "{'data': 2, 'fsdp': 2, 'tensor': 2}", "{'data': 4, 'tensor': 2}"])
def test_sharded_forward_equals_unsharded(hf_dir_factory, tmp_path, mesh):
  d, ref = hf_dir_factory("qwen2", 2, False)
  out = tmp_path / "logits.npy"
  r = _run([str(d), mesh, str(out)], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  ids = (np.arange(8 * 24).reshape(8, 24) * 7) % 96
  assert np.abs(np.load(out) - torch_logits(ref, ids)).max() <= 1e-5


def test_mesh_that_does_not_divide_the_model_is_rejected(hf_dir_factory, tmp_path):
  d, _ = hf_dir_factory("qwen2", 2, False)  # 2 KV heads cannot be split over tensor=4
  r = _run([str(d), "{'fsdp': 2, 'tensor': 4}", str(tmp_path / "x.npy")], tmp_path)
  assert r.returncode != 0
  assert "MeshError" in r.stderr and "layers/k dim 2 (kv_heads=2) over tensor=4" in r.stderr, r.stderr[-2000:]


def test_mesh_shape_must_fit_devices():
  from icl_ft import sharding
  import jax
  with pytest.raises(sharding.MeshError, match="needs 3 devices"):
    sharding.make_mesh({"data": 3}, jax.devices()[:1])
  with pytest.raises(sharding.MeshError, match="unknown mesh axes"):
    sharding.make_mesh({"model": 1})
