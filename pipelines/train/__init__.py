"""Training: recipes (typed YAML), the per-worker DeepSpeed loop, and the Ray Train launcher."""
