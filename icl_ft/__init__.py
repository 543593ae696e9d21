"""icl_ft: in-context learning vs fine-tuning on implicit-pattern tasks, in JAX/Flax."""

import os as _os

# XLA CPU: keep softmax/elementwise ops out of the YNN matmul fusions (measured ~7% faster forward on
# the 2-core dev CPU, identical numerics). Set before jax initialises; a user's XLA_FLAGS come later and win.
_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-eltwise,-reduce"
if _CPU_FLAGS not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = f"{_CPU_FLAGS} {_os.environ.get('XLA_FLAGS', '')}".strip()
