"""The paper's full grid for one model, on TPU/GPU: all tasks, 199 queries, shots 0-16, the release's FT recipe.

The model is the config argument: ``--config=configs/paper.py:qwen1.5-7b`` (default qwen1.5-0.5b). The
paper's final table uses qwen1.5-0.5b, qwen1.5-1.8b, qwen1.5-7b, pythia-1.4b and gpt-neo-1.3b;
``launch/tpu_pod.sh`` and ``launch/slurm.sbatch`` loop over them.

FT recipe: the release's ``finetune.sh`` (4 GPUs x micro-batch 1 x accumulation 4 = batch 16; its other script,
``script.sh``, runs 8 GPUs = batch 32 for 300 steps): full-parameter AdamW, lr 1e-5 constant with 20 warmup
steps, weight decay 0, clip 1.0, loss on every token, the 4-task mixture of 1,000 items each (no header),
checkpoints every 10 steps. ``finetune.sh`` trains 3 epochs (750 steps) but the release evaluates
checkpoint-100 (1,600 samples), so we stop at 300 steps; the table's FT column is step 100
(``ft_eval.report_step``) and steps 50-300 give the accuracy-vs-samples curve.
"""

from configs import base

PAPER_MODELS = ("qwen1.5-0.5b", "qwen1.5-1.8b", "qwen1.5-7b", "pythia-1.4b", "gpt-neo-1.3b")


def get_config(model: str = "qwen1.5-0.5b"):
  c = base.get_config()
  c.name = f"paper-{model}"
  c.model = model
  c.dtype = "float32"
  c.tasks = "expression,parity,boolean,code,algebra"
  c.workdir = f"work/paper/{model}"
  c.note = "The paper's grid: 199 queries per cell, best of 1/2/4/8/16 shots, the release's FT recipe."
  c.icl.shots = "0,1,2,4,8,16"
  c.icl.n = 199
  c.icl.n_dev = 100
  c.icl.batch_size = 32
  c.ft.tasks = "expression,parity,boolean,algebra"
  c.ft.n_per_task = 1000
  c.ft.steps = 300
  c.ft.batch_size = 16
  c.ft.warmup_steps = 20
  c.ft.save_every = 10
  c.ft.keep = 30
  c.ft.compute_dtype = "bfloat16"
  c.ft.remat = True
  c.ft.unroll_layers = False  # scan + remat: XLA gathers one layer's weights at a time
  c.ft_eval.steps = "50,100,200,300"
  c.ft_eval.report_step = 100  # the release compares checkpoint-100 (1,600 samples at batch 16)
  c.circuits.tasks = "expression,parity,boolean"
  c.circuits.format = "fixed"  # deliberate: boolean's paper-format items have no clause to corrupt (flagged)
  c.circuits.n_pairs = 64
  c.circuits.icl_shots = "2,8"
  c.circuits.n_boot = 1000
  c.circuits.n_perm = 1000
  c.circuits.verify = 64
  c.icl.control_shots = 8
  c.ft.fewshot_k = 8
  c.circuits.resid_last = 0
  return c
