"""Fine-tuning: learning, exact one-step equivalence (optax by hand, PyTorch AdamW), LoRA, resume, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from icl_ft import tasks
from icl_ft.io import convert
from icl_ft.training import dataset as ft_data
from icl_ft.model import lora
from icl_ft.io import checkpoints, loading
from icl_ft.training import trainer as training
from icl_ft.model.decoder import forward, positions_from_valid

DATA = ft_data.FTDataConfig(tasks=("parity", "boolean"), n_per_task=16, length_multiple=64)
FAST = training.TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=0, save_every=2, peak_flops=1e9)


@pytest.fixture(scope="module")
def setup(tiny_lm):
  d, ref, tok = tiny_lm
  m = loading.load(str(d), use_cache=False)
  return m, ft_data.build(DATA, tok), ref


def _logits(cfg, params, ids):
  valid = jnp.ones(ids.shape, bool)
  return np.asarray(forward(cfg, params, ids, positions_from_valid(valid), valid)[0])


def _scored_tokens(batch):
  """[B, T] True at each token the batch's loss scores (the token after each masked ``loss_at`` position)."""
  out = np.zeros(batch["ids"].shape, bool)
  for r, (at, keep) in enumerate(zip(batch["loss_at"], batch["loss_mask"])):
    out[r, at[keep] + 1] = True
  return out


def test_answer_loss_runs_the_lm_head_at_the_answer_only_and_equals_the_full_logits_loss(setup, tiny_lm):
  m, ds, _ = setup
  every = ft_data.batch_at(ds, 0, 4, seed=42, length_multiple=32)
  T = every["ids"].shape[1]
  assert every["loss_at"].shape == (4, T - 1) and (every["loss_at"] == np.arange(T - 1)).all()
  answer = ft_data.build(dataclasses.replace(DATA, loss_on="answer"), tiny_lm[2])
  for step in range(3):
    batch = ft_data.batch_at(answer, step, 4, seed=42, length_multiple=32)
    n_scored = [sum(mask[1:]) for mask in (answer.loss_mask[i] for i in ft_data.epoch_order(len(answer), 0, 42)[
        step * 4:(step + 1) * 4])]
    assert batch["loss_at"].shape == (4, 8 * -(-max(n_scored) // 8)) and batch["loss_at"].shape[1] < T // 2
    assert (batch["loss_mask"].sum(1) == n_scored).all()
    # The same loss as full logits scored at the answer tokens.
    full = _logits(m.config, m.params, jnp.asarray(batch["ids"]))
    logp = jax.nn.log_softmax(full[:, :-1], -1)
    target = _scored_tokens(batch)[:, 1:]
    nll = -np.take_along_axis(np.asarray(logp), batch["ids"][:, 1:, None], -1)[..., 0]
    s, n = training.token_loss(m.config, m.params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert int(n) == target.sum() and float(s) == pytest.approx(float((nll * target).sum()), rel=1e-5)


def test_each_hosts_rows_have_the_global_batchs_shapes_and_join_back_into_it(tiny_lm):
  answer = ft_data.build(dataclasses.replace(DATA, loss_on="answer"), tiny_lm[2])
  full = ft_data.batch_at(answer, 1, 8, seed=42, length_multiple=32)
  parts = [ft_data.batch_at(answer, 1, 8, seed=42, length_multiple=32, rows=ft_data.split_rows(8, i, 4))
           for i in range(4)]
  for k in full:
    assert {p[k].shape[1:] for p in parts} == {full[k].shape[1:]}
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])


def test_data_is_deterministic_and_masks_the_answer(setup, tiny_lm):
  m, ds, _ = setup
  a = ft_data.batch_at(ds, 3, 4, seed=42, length_multiple=64)
  b = ft_data.batch_at(ds, 3, 4, seed=42, length_multiple=64)
  assert all(np.array_equal(a[k], b[k]) for k in a) and a["ids"].shape[1] % 64 == 0
  assert not np.array_equal(a["ids"], ft_data.batch_at(ds, 3, 4, seed=7, length_multiple=64)["ids"])
  answer_only = ft_data.build(dataclasses.replace(DATA, loss_on="answer"), tiny_lm[2])
  text, mask = answer_only.texts[0], answer_only.loss_mask[0]
  ids = answer_only.ids[0]
  scored = tiny_lm[2].decode([t for t, keep in zip(ids, mask) if keep])
  assert text.endswith(scored) and scored.strip() in ("True", "False", "1", "0")


def test_loss_decreases(setup, tmp_path):
  m, ds, _ = setup
  cfg = dataclasses.replace(FAST, steps=30, lr=3e-3, save_every=100)
  res = training.train(m.config, m.params, ds, cfg, tmp_path, progress=False)
  losses = [r["loss"] for r in res.metrics]
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
  assert all(np.isfinite([r["grad_norm"], r["tokens_per_s"], r["mfu"]]).all() for r in res.metrics)


def test_one_step_equals_plain_optax_and_torch_adamw(setup, tmp_path):
  import torch
  m, ds, ref = setup
  cfg = dataclasses.replace(FAST, steps=1, weight_decay=0.01, clip_norm=0.0, lr=1e-3)
  res = training.train(m.config, m.params, ds, cfg, tmp_path, progress=False)
  batch = ft_data.batch_at(ds, 0, 4, seed=cfg.seed, length_multiple=64)

  # Plain jax.grad + optax.adamw on the same batch.
  def loss_fn(p):
    s, n = training.token_loss(m.config, p, {k: jnp.asarray(v) for k, v in batch.items()})
    return s / n
  loss, grads = jax.value_and_grad(loss_fn)(m.params)
  opt = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  updates, _ = opt.update(grads, opt.init(m.params), m.params)
  expected = optax.apply_updates(m.params, updates)
  assert abs(res.metrics[0]["loss"] - float(loss)) < 1e-6
  # Adam's first step is ~lr * sign(g): where |g| ~ eps it amplifies float rounding of g (sum-then-divide
  # vs mean), so a handful of elements differ by up to ~6e-6 of the 1e-3 step; the bound is 1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), res.params, expected)

  # PyTorch AdamW on the transformers model, one step, same batch and loss.
  model = type(ref)(ref.config).float()
  model.load_state_dict(ref.state_dict())
  opt_t = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  labels = torch.tensor(np.where(_scored_tokens(batch), batch["ids"], -100), dtype=torch.long)
  out = model(torch.tensor(batch["ids"], dtype=torch.long), attention_mask=torch.tensor(batch["valid"].astype(np.int64)),
              labels=labels)
  out.loss.backward()
  opt_t.step()
  assert abs(out.loss.item() - res.metrics[0]["loss"]) < 1e-5
  theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  for name, ours in convert.iter_hf_tensors(m.config, res.params):
    np.testing.assert_allclose(ours, theirs[name], atol=1e-5, err_msg=name)


def test_lora_keeps_base_and_merged_equals_adapter_form(setup, tmp_path):
  m, ds, _ = setup
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "down"))
  before = jax.tree.map(np.asarray, m.params)
  res = training.train(m.config, m.params, ds, dataclasses.replace(FAST, steps=3, lora=lcfg, lr=1e-2),
                       tmp_path, progress=False)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, m.params), before)
  assert set(res.trainable) == {"q", "v", "o", "down"}
  assert float(jnp.abs(res.trainable["q"]["b"]).max()) > 0  # the adapters did train
  ids = jnp.asarray(ds.ids[0][:40])[None]
  adapter = _logits(m.config, lora.attach(m.params, res.trainable, lcfg), ids)
  merged = _logits(m.config, res.params, ids)
  np.testing.assert_allclose(merged, adapter, atol=1e-5)
  assert np.abs(merged - _logits(m.config, m.params, ids)).max() > 1e-3


def test_resume_equals_uninterrupted(setup, tmp_path):
  m, ds, _ = setup
  full = training.train(m.config, m.params, ds, FAST, tmp_path / "a", progress=False)
  training.train(m.config, m.params, ds, dataclasses.replace(FAST, steps=2), tmp_path / "b", progress=False)
  resumed = training.train(m.config, m.params, ds, FAST, tmp_path / "b", progress=False)
  jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
  assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4]
  assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in full.metrics]


class _AnyQuestion:
  def __contains__(self, question):
    return True

  def __len__(self):
    return 1


def test_heldout_loss_is_the_mean_token_loss_on_unseen_examples_and_resumes(setup, tiny_lm, tmp_path):
  m, ds, _ = setup
  sets = ft_data.heldout(dataclasses.replace(DATA, n_heldout=5), tiny_lm[2])  # 10 rows: the last batch is short
  held = sets["loss"]
  assert len(held) == 10 and not set(held.texts) & set(ds.texts) and sets["answer_loss"].texts == held.texts
  res = training.train(m.config, m.params, ds, FAST, tmp_path / "a", progress=False, heldout=sets)
  assert [h["step"] for h in res.heldout] == [0, 2, 4]

  def direct(params):  # one example at a time, no padding
    total = count = 0.0
    for ids, mask in zip(held.ids, held.loss_mask):
      logits = _logits(m.config, params, jnp.asarray(ids)[None])[0, :-1]
      ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(ids[1:])))
      total, count = total + float((ce * np.asarray(mask[1:])).sum()), count + sum(mask[1:])
    return total / count

  np.testing.assert_allclose(res.heldout[0]["loss"], direct(m.params), rtol=1e-5)
  np.testing.assert_allclose(res.heldout[-1]["loss"], direct(res.params), rtol=1e-5)
  assert res.heldout[0]["answer_loss"] != res.heldout[0]["loss"]
  training.train(m.config, m.params, ds, dataclasses.replace(FAST, steps=2), tmp_path / "b", progress=False,
                 heldout=sets)
  resumed = training.train(m.config, m.params, ds, FAST, tmp_path / "b", progress=False, heldout=sets)
  assert resumed.heldout == res.heldout
  # Resumed without a held-out record (trained without one): no "step 0" measured on the restored parameters.
  training.train(m.config, m.params, ds, dataclasses.replace(FAST, steps=2), tmp_path / "c", progress=False)
  later = training.train(m.config, m.params, ds, FAST, tmp_path / "c", progress=False, heldout=sets)
  assert [h["step"] for h in later.heldout] == [4] and later.heldout[0] == res.heldout[-1]
  with pytest.raises(ValueError, match="question space is too small"):
    tasks.make_ft_examples("parity", 3, 0, "paper", heldout=True, exclude=_AnyQuestion())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
  m, ds, _ = setup
  cfg = dataclasses.replace(FAST, steps=6, lr=1e30, save_every=1)
  with pytest.raises(training.TrainingDivergedError, match="last good checkpoint is step 1"):
    training.train(m.config, m.params, ds, cfg, tmp_path, progress=False)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1]


def test_bad_configurations(setup, tmp_path, hf_dir_factory):
  m, ds, _ = setup
  with pytest.raises(ValueError, match="unknown LoRA target module.*valid targets: q, k, v, o, gate, up, down"):
    lora.LoRAConfig(targets=("q", "attn"))
  with pytest.raises(ValueError, match="micro-batch"):
    training.train(m.config, m.params, ds, dataclasses.replace(FAST, batch_size=6, grad_accum=4), tmp_path)
  with pytest.raises(ValueError, match="schedule must be"):
    training.schedule(dataclasses.replace(FAST, schedule="linear"))
  training.train(m.config, m.params, ds, dataclasses.replace(FAST, steps=2), tmp_path / "run", progress=False)
  other = loading.load(str(hf_dir_factory("qwen2", 2, False)[0]), use_cache=False)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="another model"):
    training.train(other.config, other.params, ds, FAST, tmp_path / "run", progress=False)


def _gpt2_regex_bpe():
  """A byte-level BPE with GPT-2's pre-tokenizer regex, trained here on the study's FT texts."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  texts = [tasks.ft_text(ex, fmt) for t in tasks.TASKS for fmt in tasks.FORMATS for ex in tasks.make_ft_examples(t, 40, 1, fmt)]
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     special_tokens=["<eos>"]))
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.parametrize("which", ["smollm2", "gpt2_regex_bpe"])
@pytest.mark.parametrize("fmt", ["paper", "fixed"])
def test_answer_loss_mask_is_exactly_the_answer_for_every_task(which, fmt, request):
  tok = request.getfixturevalue("smollm2_tokenizer") if which == "smollm2" else _gpt2_regex_bpe()
  cfg = ft_data.FTDataConfig(tasks=tuple(tasks.TASKS), n_per_task=25, format=fmt, loss_on="answer")
  ds = ft_data.build(cfg, tok)
  examples = [ex for t in cfg.tasks for ex in tasks.make_ft_examples(t, cfg.n_per_task, cfg.seed, fmt)]
  for ids, mask, ex in zip(ds.ids, ds.loss_mask, examples):
    scored = tok.decode([t for t, keep in zip(ids, mask) if keep])
    assert scored.strip() == ex.answer and scored.lstrip(" ") == ex.answer, (ex.task, scored)
    assert mask[-1] and not mask[0]


def test_an_example_without_answer_tokens_is_refused(tiny_lm):
  cfg = ft_data.FTDataConfig(tasks=("parity",), n_per_task=2, loss_on="answer", max_len=20)
  with pytest.raises(ValueError, match="no token to score"):
    ft_data.build(cfg, tiny_lm[2])


def test_mfu_counts_real_tokens_and_charges_lora_for_the_gradients_it_needs(setup, tmp_path):
  from icl_ft.model import flops
  m, ds, _ = setup
  cfg = m.config
  lengths = np.array([10, 30])
  fwd = sum(n * flops.forward_flops_per_token(cfg, n, causal=True) for n in lengths)
  assert flops.train_flops(cfg, lengths.sum(), (lengths ** 2).sum()) == pytest.approx(3 * fwd)
  head = 2 * cfg.hidden_size * cfg.vocab_size  # forward FLOPs of the LM head per position
  assert flops.train_flops(cfg, lengths.sum(), (lengths ** 2).sum(), head_tokens=4) == pytest.approx(
      3 * (fwd - head * (lengths.sum() - 4)))  # the head only at the 4 scored tokens
  adapters = lora.num_params(cfg, lora.LoRAConfig(rank=4))
  lora_flops = flops.train_flops(cfg, lengths.sum(), (lengths ** 2).sum(), adapters)
  attention = sum(2 * n * n * cfg.num_heads * cfg.head_dim * cfg.num_layers for n in lengths)
  assert lora_flops == pytest.approx(2 * (fwd - attention) + 3 * attention + 6 * adapters * lengths.sum())
  assert adapters == cfg.num_layers * 4 * sum(sum(lora._in_out(cfg, t)[:2]) for t in lora.TARGETS)
  # The training metrics count only real tokens of the padded batch.
  res = training.train(cfg, m.params, ds, dataclasses.replace(FAST, steps=1), tmp_path, progress=False)
  batch = ft_data.batch_at(ds, 0, FAST.batch_size, FAST.seed, 32)
  n = batch["valid"].sum(-1)
  assert batch["valid"].size > n.sum()  # the bucket pads
  met = res.metrics[0]
  assert met["tokens"] == n.sum() and met["loss_tokens"] == batch["loss_mask"].sum()
  expected = flops.train_flops(cfg, n.sum(), (n ** 2).sum(), head_tokens=met["loss_tokens"]) / met["step_time_s"] / FAST.peak_flops
  assert met["mfu"] == pytest.approx(expected, rel=1e-6)


def test_mfu_ceiling_is_measured_in_the_compute_dtype(setup, tmp_path, monkeypatch):
  from icl_ft.model import flops
  m, ds, _ = setup
  seen = []
  real = flops.matmul_ceiling
  monkeypatch.setattr(flops, "matmul_ceiling", lambda *a, **k: seen.append(k.get("dtype")) or real(256, 2, k["dtype"]))
  cfg = dataclasses.replace(FAST, steps=1, peak_flops=None, compute_dtype="bfloat16")
  training.train(m.config, m.params, ds, cfg, tmp_path, progress=False)
  assert seen == [jnp.bfloat16]


@pytest.mark.parametrize("use_lora", [False, True])
def test_evaluation_restores_the_trained_parameters_alone(setup, tmp_path, use_lora):
  m, ds, _ = setup
  cfg = dataclasses.replace(FAST, steps=2, lora=lora.LoRAConfig(rank=2, targets=("q", "v")) if use_lora else None)
  res = training.train(m.config, m.params, ds, cfg, tmp_path, progress=False)
  (step, restored), = training.checkpoint_params(m.config, m.params, cfg, tmp_path, [2])
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, res.params))


def test_fewshot_data_is_exactly_the_first_querys_icl_demos():
  from conftest import build_byte_tokenizer
  tok = build_byte_tokenizer()
  demos = ft_data.fewshot_examples(["parity", "expression"], 3, 7, "fixed")
  assert demos == tasks.make_demos("parity", 3, 7, 0, "fixed") + tasks.make_demos("expression", 3, 7, 0, "fixed")
  ds = ft_data.from_examples(demos, ft_data.FTDataConfig(format="fixed"), tok)
  assert ds.texts == [tasks.ft_text(d, "fixed") for d in demos]


def test_a_checkpoint_of_another_recipe_or_data_is_not_resumed(setup, tmp_path):
  """Resuming continues a trajectory: checkpoints written under another learning rate, batch, seed or data are
  refused by name; more steps (a longer run of the same constant-schedule recipe) resume."""
  m, ds, _ = setup
  cfg = dataclasses.replace(FAST, steps=2, save_every=1)
  training.train(m.config, m.params, ds, cfg, tmp_path, progress=False)
  other_data = dataclasses.replace(ds, ids=[s[:-1] + [s[-1] % 7] for s in ds.ids])
  for changed, data, name in ((dict(lr=2 * cfg.lr), ds, "lr"), (dict(batch_size=2 * cfg.batch_size), ds, "batch_size"),
                              (dict(seed=cfg.seed + 1), ds, "seed"), ({}, other_data, "data")):
    with pytest.raises(checkpoints.CheckpointMismatchError, match=rf"differing: .*{name}"):
      training.train(m.config, m.params, data, dataclasses.replace(cfg, **changed), tmp_path, progress=False)
  longer = training.train(m.config, m.params, ds, dataclasses.replace(cfg, steps=3), tmp_path, progress=False)
  assert [r["step"] for r in longer.metrics] == [1, 2, 3]
