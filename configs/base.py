"""Shared defaults of every study config: the embedded SmolLM2-135M on a laptop CPU, small but real samples.

Lists are comma-separated strings so they can be overridden from the command line, e.g.
``--config.icl.shots=0,4,16``; ``icl_ft.study.StudyConfig`` validates every value.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "study"
  c.model = "smollm2-135m"  # registry name, local HF directory, .gguf file, or hub id
  c.dtype = "float32"
  c.workdir = "work/study"
  c.tasks = "parity"  # comma-separated: expression, parity, boolean, code, algebra
  c.variants = "correct,misleading"  # any variant of the tasks, e.g. misleading-z for parity
  c.format = "paper"  # prompt format: paper (the release's templates) or fixed (its bugs corrected)
  c.seed = 114514  # seed of the query sets and demo streams
  c.stages = "all"  # or a comma-separated subset of: data, icl, finetune, ft_eval, circuits, report
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.progress = True
  c.overwrite = False  # a finished stage of another config is refused; true moves it aside to <stage>.replaced-<time>/
  # The report prints the sizes from the config itself; the note says what they are for (no numbers to go stale
  # in configs that change the sizes).
  c.note = ("Laptop-CPU scale: far fewer queries, fine-tuning steps and prompt pairs than the paper (199 queries "
            "per cell, checkpoint-100 of batch 16-32); intervals are wide at this size. configs/paper.py is the "
            "full grid.")

  c.icl = ml_collections.ConfigDict()
  c.icl.shots = "0,1,2,4,8"  # 0 is the base model's 0-shot baseline
  c.icl.n = 50  # queries per (task, variant, shots) cell; the paper uses 199
  c.icl.n_by_shots = ""  # cells of another size, e.g. "16:20": the first 20 of the same query set
  c.icl.n_dev = 20  # dev queries per cell with shots > 0, disjoint from the test set, to choose k (0: none)
  c.icl.batch_size = 8
  c.icl.on_too_long = "skip"  # prompts beyond the context window: skip (counted) or error
  c.icl.controls = "shuffled,irrelevant"  # control columns: demos' labels shuffled / another task's demos ("": none)
  c.icl.control_shots = 4  # the controls' k, next to real demos at the same k
  # False: each k draws its own demos (the release's); True: a query's k-shot demos are the first k of one list,
  # so the comparison across k is paired on the demos too.
  c.icl.nested_demos = False
  # The header every prompt of a (task, format) starts with runs once per evaluation (fewer prefill FLOPs, ~30%
  # more compiled shapes; the same answers up to float rounding); with nested demos, each item's prompts at every
  # k also run as one packed row. False: every prompt whole, unpacked.
  c.icl.share_prefix = True

  c.ft = ml_collections.ConfigDict()
  c.ft.method = "full"  # full (the paper's) or lora
  c.ft.tasks = ""  # fine-tuning mixture; empty: the config's tasks
  c.ft.n_per_task = 400  # the paper's mixture uses 1000 of each of four tasks
  c.ft.n_heldout = 0  # per task: held-out examples for the held-out loss at each saved step (0: none)
  c.ft.with_header = False  # the release trains on bare question + answer
  c.ft.loss_on = "all"  # all (the release: every token) or answer
  c.ft.steps = 40
  c.ft.batch_size = 8
  c.ft.grad_accum = 1
  c.ft.lr = 1e-5
  c.ft.warmup_steps = 4
  c.ft.schedule = "constant_with_warmup"  # or cosine
  c.ft.weight_decay = 0.0
  c.ft.clip_norm = 1.0
  c.ft.compute_dtype = "float32"
  c.ft.remat = False
  c.ft.unroll_layers = True  # faster on one CPU; sharded 7B runs want False with remat (see BUILD_NOTES)
  c.ft.save_every = 20
  c.ft.keep = 5
  c.ft.lora_rank = 8
  c.ft.lora_alpha = 16.0
  c.ft.lora_targets = "q,k,v,o,gate,up,down"
  c.ft.seed = 42
  c.ft.fewshot_k = 4  # few-shot FT control: the first query's k ICL demos per task, fine-tuned on (0: off)
  c.ft.fewshot_steps = 20  # ... for this many full-batch steps (warmup at most a fifth), otherwise the recipe above

  c.ft_eval = ml_collections.ConfigDict()
  c.ft_eval.shots = "0"  # the paper's FT condition is 0-shot
  c.ft_eval.steps = ""  # checkpoints to evaluate; empty: every kept checkpoint
  c.ft_eval.report_step = 0  # checkpoint of the table's fine-tuned column; 0: the last step

  c.circuits = ml_collections.ConfigDict()
  c.circuits.enabled = True
  c.circuits.tasks = ""  # tasks to analyse; empty: the config's tasks that support prompt pairs
  c.circuits.format = ""  # empty: the study's format; another one is a deliberate mismatch, flagged in the report
  c.circuits.n_pairs = 32
  c.circuits.icl_shots = "4"
  c.circuits.controls = "shuffled,irrelevant"  # ICL control conditions at the largest icl_shots ("": none)
  c.circuits.verify = 24  # per family and condition, the top components by attribution patched exactly (0: all)
  c.circuits.chunk = 16
  c.circuits.resid_last = 2  # residual-stream sweep over the query's last 2 positions (0: the whole query)
  c.circuits.n_boot = 200
  c.circuits.n_splits = 50  # random half splits per condition for its split-half noise floor
  c.circuits.n_perm = 200  # label permutations per contrast test
  c.circuits.top_k = 10
  c.circuits.tol = 1e-3  # a condition whose clean-corrupt logit-diff gap is below this has no effects
  c.circuits.threshold = 0.8  # a condition's circuit: the smallest top-k set recovering this share of its gap
  c.circuits.single_token_answers = True  # pairs whose answers are one token each: the metric measures the answer
  return c


def for_task(task: str) -> ml_collections.ConfigDict:
  """The defaults for one task: named after it, writing to ``work/<task>``."""
  c = get_config()
  c.name, c.tasks, c.workdir = task, task, f"work/{task}"
  return c
