"""Shared defaults for every study config."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m"  # registry name, local HF directory, .gguf file, or hub id
  c.dtype = "float32"
  c.workdir = "work"
  c.seed = 114514
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.max_new_tokens = 4
  return c
