"""icl_ft: in-context learning vs fine-tuning on implicit-pattern tasks, in JAX/Flax."""
