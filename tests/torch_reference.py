"""The PyTorch side of the patching tests: forward hooks on a transformers model that capture or splice an
activation, and the answer-position logit difference they produce."""

import numpy as np


def logit_diff(ref, ids, gold, foil, hooks=(), attention_mask=None):
  """logit[gold] - logit[foil] at the last position, with ``hooks`` = (module, fn, is_pre_hook) installed."""
  import torch
  handles = [mod.register_forward_pre_hook(fn, with_kwargs=True) if pre else mod.register_forward_hook(fn)
             for mod, fn, pre in hooks]
  kw = {} if attention_mask is None else {"attention_mask": torch.tensor(np.asarray(attention_mask, np.int64))}
  try:
    with torch.no_grad():
      logits = ref(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits[:, -1].numpy()
  finally:
    for h in handles:
      h.remove()
  rows = np.arange(len(ids))
  return logits[rows, gold] - logits[rows, foil]


def capture(ref, ids, module, pre, attention_mask=None):
  """The input (``pre``) or output of ``module`` on ``ids``."""
  store = {}

  def fn(mod, args, *rest):
    store["x"] = ((args[0] if args else rest[0]["hidden_states"]) if pre else rest[0]).clone()
  zeros = np.zeros(len(ids), int)
  logit_diff(ref, ids, zeros, zeros, [(module, fn, pre)], attention_mask)
  return store["x"]


def replace_pre(value_fn):
  """A pre-hook (with kwargs) replacing the module's first input x by ``value_fn(x)``."""
  def fn(mod, args, kwargs):
    if args:
      return (value_fn(args[0]),) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=value_fn(kwargs["hidden_states"]))
  return fn


def splice(src, index):
  """A pre-hook that replaces ``input[index]`` by ``src[index]``."""
  def value(x):
    x = x.clone()
    x[index] = src[index]
    return x
  return replace_pre(value)
