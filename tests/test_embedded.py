"""Real-checkpoint parity: the embedded SmolLM2-135M and Gemma 3 270M GGUFs vs transformers' own GGUF load (slow)."""

import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as reference
from icl_ft.evaluation import decoding as inference
from icl_ft.io import loading
from icl_ft.model.decoder import forward, positions_from_valid

pytestmark = pytest.mark.slow

PROMPTS = [  # prompts in the study's formats (expression, relation, boolean, algebra)
    "Now you need to calculate the answer of some mathematic equations. Here are some examples: \n"
    "(0)+(-14+14)*(6-6+4-6)=0 \n (5)+(-5+2)*(4-5+5-1)=",
    "Here are some cities expressed as A, B, C, etc. I will show some connection relations, and you need to "
    "tell me if city A and city Z are connected (Answer True or False). Here are some examples: \n"
    "A is connected with C\nJ is connected with B\nB is connected with F\n\n So 'the city A and Z is connected' is ",
    "Here are some boolean expressions, you need to directly tell me the result. If it is true, print True, "
    "else print False. Here are some examples: \n(True and False) or (False or True) and False\n The result is: ",
    "Here are some equations, you need to find all solutions of given variables. Here are some examples: \n"
    "1a + 4b = 22\n2a + 1b = 9\n7a + 7b = 49\n The solutions are: a = 2, b = ",
]


def _ours_and_reference(name):
  """Our load of an embedded GGUF and transformers' own load of the same file (float32, eager attention)."""
  import torch
  from transformers import AutoModelForCausalLM
  ours = loading.load(name, use_cache=False)
  path = loading.EMBEDDED[name]()
  ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                             attn_implementation="eager").eval()
  return ours, ref


def _assert_same_logits_and_continuation(ours, ref, prompt, new_tokens, last_only=False):
  """Logits within 1e-3 (every position, or the last: a 262k vocabulary's full logits are large) and the same
  greedy continuation of ``new_tokens``."""
  import torch
  ids = ours.tokenizer(prompt).input_ids
  x = jnp.asarray([ids])
  valid = jnp.ones(x.shape, bool)
  logits, _ = forward(ours.config, ours.params, x, positions_from_valid(valid), valid,
                      logits_at=jnp.asarray([[len(ids) - 1]]) if last_only else None)
  with torch.no_grad():
    expected = ref(torch.tensor([ids])).logits[:, -1:] if last_only else ref(torch.tensor([ids])).logits
  assert np.abs(np.asarray(logits) - expected.numpy()).max() <= 1e-3
  new, _ = inference.greedy_generate(ours.config, ours.params, x, valid, new_tokens)
  theirs = ref.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=loading.pad_id(ours.tokenizer))[0, len(ids):]  # 2 and 0
  assert list(np.asarray(new[0])) == theirs.tolist()


@pytest.fixture(scope="module")
def models():
  return _ours_and_reference("smollm2-135m")


def test_config_and_tokenizer_from_gguf(models):
  ours, _ = models
  c = ours.config
  assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
  assert c.tie_embeddings and c.rope_theta == 100000.0
  ids = ours.tokenizer(PROMPTS[0]).input_ids
  assert ours.tokenizer.decode(ids) == PROMPTS[0]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_and_greedy_continuation_match(models, prompt):
  _assert_same_logits_and_continuation(*models, prompt, 6)


def test_patching_on_real_pairs_matches_torch_hooks(models):
  """Head sweep on expression pairs (clean -> corrupted) vs a PyTorch o_proj pre-hook, for sampled heads."""
  from icl_ft.interp import pairs
  from icl_ft.interp import patching
  ours, ref = models
  p = pairs.build_pairs("expression", ours.tokenizer, 2, seed=0, fmt="fixed")
  mk = lambda ids: patching.Batch(jnp.asarray(ids), jnp.asarray(p.valid), jnp.asarray(p.answer_pos),
                                  jnp.asarray(p.clean_answer), jnp.asarray(p.corrupt_answer))
  clean, corrupt = mk(p.clean_ids), mk(p.corrupt_ids)
  _, cache = patching.capture(ours.config, ours.params, clean, taps=("attn_z",))
  swept = np.asarray(patching.patch_sweep(ours.config, ours.params, corrupt, cache, "attn_z", ("layer", "head")))
  dh = ours.config.head_dim
  for layer, head in ((0, 0), (14, 4), (29, 8)):
    o_proj = ref.model.layers[layer].self_attn.o_proj
    z = reference.capture(ref, p.clean_ids, o_proj, pre=True, attention_mask=p.valid)
    patch = reference.splice(z, (..., slice(head * dh, (head + 1) * dh)))
    expected = reference.logit_diff(ref, p.corrupt_ids, p.clean_answer, p.corrupt_answer, [(o_proj, patch, True)],
                                    attention_mask=p.valid)
    np.testing.assert_allclose(swept[layer, head], expected, atol=1e-4)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
  """Ours and transformers' loads of the base Gemma 3 270M GGUF (assembled from its PyPI parts into a fresh cache)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("ICL_FT_CACHE", str(tmp_path_factory.mktemp("cache")))
    return _ours_and_reference("gemma3-270m")


def test_gemma3_config_from_its_gguf(gemma3):
  c = gemma3[0].config
  assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
      "gemma3_text", 18, 640, 4, 1, 256, 262144)
  assert (c.sliding_window, c.rope_theta, c.local_rope_theta, c.attn_scale) == (512, 1e6, 1e4, 1 / 16)
  assert c.window_layers == tuple(i for i in range(18) if (i + 1) % 6) and c.qk_norm and c.sandwich_norm
  assert c.num_params() == sum(p.numel() for p in gemma3[1].parameters())
  assert loading.sizing_config("gemma3-270m") == c  # the recorded shapes are the file's


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gemma3_last_logits_and_16_greedy_tokens_match(gemma3, prompt):
  _assert_same_logits_and_continuation(*gemma3, prompt, 16, last_only=True)
