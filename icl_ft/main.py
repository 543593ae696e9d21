"""Entry point: ``python -m icl_ft.main --config=configs/parity.py``.

The study pipeline (tasks, ICL, fine-tuning, circuits) is added stage by stage; today this loads the
configured model and prints its greedy continuation of a few-shot prompt from the study.
"""

import time

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/parity.py", "Study config file.")

DEMO_PROMPT = (
    "Here are some cities expressed as A, B, C, etc. I will show some connection relations, and you need to tell "
    "me if city A and city Z are connected (Answer True or False). Here are some examples: \n"
    "A is connected with C\nJ is connected with B\nB is connected with F\nF is connected with D\nD is connected "
    "with H\nH is connected with I\nI is connected with G\nG is connected with C\nC is connected with E\n"
    "C is connected with Z\n\n So 'the city A and Z is connected' is True\n"
    "A is connected with D\nD is connected with B\nB is connected with C\nC is connected with E\nE is connected "
    "with F\nF is connected with G\nG is connected with H\nH is connected with I\nI is connected with J\n\n"
    " So 'the city A and Z is connected' is ")


def main(argv):
  del argv
  import jax.numpy as jnp
  from icl_ft import inference, loading, sharding
  cfg = _CONFIG.value
  sharding.maybe_initialize_distributed()
  t0 = time.time()
  m = loading.load(cfg.model, dtype=cfg.dtype, mesh=sharding.make_mesh(dict(cfg.mesh)))
  print(f"loaded {cfg.model} ({m.config.arch}, {m.config.num_params() / 1e6:.1f}M params) in {time.time() - t0:.1f}s")
  ids = m.tokenizer(DEMO_PROMPT).input_ids
  new, _ = inference.greedy_generate(m.config, m.params, jnp.asarray([ids]), jnp.ones((1, len(ids)), bool),
                                     cfg.max_new_tokens)
  print(f"model: {cfg.model}  prompt tokens: {len(ids)}")
  print(f"greedy continuation: {m.tokenizer.decode(list(new[0]))!r}")


if __name__ == "__main__":
  app.run(main)
