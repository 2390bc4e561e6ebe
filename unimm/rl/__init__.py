"""Unified-GRPO policies as plug-ins: each module registers one policy (what it samples, how
the samples are scored, which GRPO step trains it); ``unimm.train.grpo_loop`` runs any of
them by ``grpo.policy`` name."""
from unimm.rl import captioner, decoder  # noqa: F401  (registers the built-in policies)
from unimm.rl.base import Policy, RLContext, get, names, register  # noqa: F401
