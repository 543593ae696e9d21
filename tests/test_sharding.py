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
    from icl_ft.io import loading
    from icl_ft.model import sharding
    from icl_ft.model.decoder import forward, positions_from_valid
    assert jax.device_count() == 8, jax.devices()
    directories, mesh_spec = sys.argv[1].split(","), eval(sys.argv[2])
    mesh = sharding.make_mesh(mesh_spec)
    out = {}
    for n, directory in enumerate(directories):
      m = loading.load(directory, mesh=mesh, use_cache=False)
      q = m.params["layers"]["q"]
      assert q.sharding.mesh.shape == mesh.shape, q.sharding
      print("SPEC", q.sharding.spec, m.params["embed"].sharding.spec)
      ids = (np.arange(8 * 24).reshape(8, 24) * 7) % 96
      valid = np.ones(ids.shape, bool)
      ids_s = jax.device_put(ids, sharding.batch_sharding(mesh))
      f = jax.jit(forward, static_argnums=0)
      logits, _ = f(m.config, m.params, ids_s, positions_from_valid(valid), valid)
      out[str(n)] = np.asarray(logits)
    np.savez(sys.argv[3], **out)
""")


def _run(args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", CHECK, *args], env=env, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("mesh", ["{'fsdp': 8}", "{'data': 2, 'fsdp': 2, 'tensor': 2}", "{'data': 4, 'tensor': 2}"])
def test_sharded_forward_equals_unsharded(hf_dir_factory, tmp_path, mesh):
  d, ref = hf_dir_factory("qwen2", 2, False)
  out = tmp_path / "logits.npz"
  r = _run([str(d), mesh, str(out)], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  ids = (np.arange(8 * 24).reshape(8, 24) * 7) % 96
  assert np.abs(np.load(out)["0"] - torch_logits(ref, ids)).max() <= 1e-5


def test_sharded_forward_equals_unsharded_for_every_family(hf_dir_factory, tmp_path):
  """GPT-NeoX, GPT-Neo (24 tokens: three local windows), Gemma, sliding-window Mistral on data x fsdp x tensor."""
  made = [hf_dir_factory("gpt_neox", 4), hf_dir_factory("gpt_neo", 4, True), hf_dir_factory("gemma", 4, True),
          hf_dir_factory("mistral", 2)]
  out = tmp_path / "logits.npz"
  r = _run([",".join(str(d) for d, _ in made), "{'data': 2, 'fsdp': 2, 'tensor': 2}", str(out)], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  ids = (np.arange(8 * 24).reshape(8, 24) * 7) % 96
  for n, (_, ref) in enumerate(made):
    assert np.abs(np.load(out)[str(n)] - torch_logits(ref, ids)).max() <= 1e-5, made[n][0]


def test_mesh_that_does_not_divide_the_model_is_rejected(hf_dir_factory, tmp_path):
  d, _ = hf_dir_factory("qwen2", 2, False)  # 2 KV heads cannot be split over tensor=4
  r = _run([str(d), "{'fsdp': 2, 'tensor': 4}", str(tmp_path / "x.npz")], tmp_path)
  assert r.returncode != 0
  assert "MeshError" in r.stderr and "layers/k dim 2 (kv_heads=2) over tensor=4" in r.stderr, r.stderr[-2000:]


def test_mesh_shape_must_fit_devices():
  from icl_ft.model import sharding
  import jax
  with pytest.raises(sharding.MeshError, match="needs 3 devices"):
    sharding.make_mesh({"data": 3}, jax.devices()[:1])
  with pytest.raises(sharding.MeshError, match="unknown mesh axes"):
    sharding.make_mesh({"model": 1})


TRAIN = textwrap.dedent("""
    import sys, dataclasses, jax, numpy as np
    from icl_ft.training import dataset as ft_data
    from icl_ft.io import loading
    from icl_ft.model import sharding
    from icl_ft.training import trainer as training
    directory, mesh_spec, out, workdir = sys.argv[1], eval(sys.argv[2]), sys.argv[3], sys.argv[4]
    mesh = sharding.make_mesh(mesh_spec)
    m = loading.load(directory, mesh=mesh, use_cache=False)
    ds = ft_data.build(ft_data.FTDataConfig(tasks=("parity",), n_per_task=16, length_multiple=64), m.tokenizer)
    cfg = training.TrainConfig(steps=2, batch_size=8, grad_accum=1, lr=1e-3, eps=1e-6, warmup_steps=0,
                               save_every=10, peak_flops=1e9)
    res = training.train(m.config, m.params, ds, cfg, workdir, mesh=mesh, progress=False)
    if mesh.size > 1:
      assert "fsdp" in str(res.trainable["layers"]["q"].sharding.spec), res.trainable["layers"]["q"].sharding
    leaves = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(res.params)}
    np.savez(out, losses=np.array([r["loss"] for r in res.metrics]), **leaves)
""")


def test_fsdp_training_equals_unsharded(tiny_lm, tmp_path):
  d = tiny_lm[0]
  runs = {}
  for name, mesh, devices in (("fsdp", "{'fsdp': 8}", 8), ("dp_fsdp", "{'data': 2, 'fsdp': 4}", 8),
                              ("single", "{'fsdp': 1}", 1)):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = tmp_path / f"{name}.npz"
    r = subprocess.run([sys.executable, "-c", TRAIN, str(d), mesh, str(out), str(tmp_path / name)], env=env,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-3000:]
    runs[name] = np.load(out)
  for name in ("fsdp", "dp_fsdp"):
    np.testing.assert_allclose(runs[name]["losses"], runs["single"]["losses"], atol=1e-6)
    for key in runs["single"].files:
      np.testing.assert_allclose(runs[name][key], runs["single"][key], atol=1e-5, err_msg=key)
