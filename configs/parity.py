"""Relation reasoning whose answer is fixed by the parity of the number of lines (the default study).

``python -m icl_ft.main --config=configs/parity.py`` runs it end to end on the embedded SmolLM2-135M in
about 25 minutes on a 2-core AVX-512 CPU. The task has two cues that agree on every correct item, the line count's
parity and a line mentioning Z; ``misleading`` breaks the parity cue (Z decides), ``misleading-z`` both (Z
present but not connected, 10 lines), so the headline can tell parity from Z and either from the gold. Fine-tuning uses the recipe the sweep in
BUILD_NOTES chose: lr 3e-4 on the texts with the test header (at the release's lr 1e-5, or on bare texts with
another seed, no answer moves on this model).
"""

from configs import base


def get_config():
  c = base.for_task("parity")
  c.variants = "correct,misleading,misleading-z"
  c.note = ("Laptop-CPU scale: 100 queries per 0-shot and fine-tuned cell (the paper: 199), 32 per ICL cell "
            "(16 at 16 shots) for time; 40 fine-tuning steps of 8 at lr 3e-4 on texts with the test header (the "
            "release: bare texts at 1e-5), 64 held-out examples, and few-shot FT on 4 demos; 32 prompt pairs per "
            "circuit condition at 4-shot ICL, the top 12 components per family verified exactly. configs/paper.py "
            "is the full grid.")
  c.icl.shots = "0,1,2,4,8,16"
  c.icl.n = 100
  c.icl.n_by_shots = "1:32,2:32,4:32,8:32,16:16"
  c.icl.n_dev = 0  # no dev split at this size: the table's "k from dev" column stays empty
  c.ft.lr = 3e-4
  c.ft.with_header = True
  c.ft.save_every = 10
  c.ft.n_heldout = 64
  c.ft_eval.steps = "20,40"
  c.circuits.verify = 12
  return c
