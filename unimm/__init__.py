"""unimm: unified multimodal models (Harmon, UAE + Unified-GRPO) in JAX/Flax."""
__version__ = "0.1.0"
