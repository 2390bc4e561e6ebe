"""The official Harmon ``.pth`` (``harmon_0.5b.pth``, ``harmon_1.5b.pth``) <-> unimm params.

Key layout: ``llm.model.*`` (HF Qwen2 names), ``mar.*`` (MAR encoder/decoder),
``mar.diffloss.net.*`` (the diffusion head), ``proj_in.{0,2}``, ``proj_out.{0,2}``. The
unused ``mar.class_emb.weight`` is ignored; ``llm.lm_head.weight`` may appear when the
embeddings are tied (torch state dicts list tied tensors twice) and must then equal them.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import jax
import numpy as np

from unimm.convert import common
from unimm.convert import mar_torch, qwen2_hf
from unimm.models import harmon

IGNORED = ("mar.class_emb.weight",)
PROJECTORS = ("proj_in", "proj_out")


def harmon_to_torch(params: Mapping[str, Any], cfg: Any) -> dict[str, np.ndarray]:
    """Harmon params -> the official state-dict layout (float arrays, PyTorch shapes)."""
    sd = {}
    sd.update(common.add_prefix(qwen2_hf.params_to_hf_state(params["llm"], cfg.llm), "llm."))
    sd.update(common.add_prefix(mar_torch.mar_to_torch(params["mar"], cfg.mar), "mar."))
    sd.update(common.add_prefix(
        mar_torch.head_to_torch(params["head"], harmon.head_config(cfg)), "mar.diffloss.net."))
    for name in PROJECTORS:
        sd.update(common.linear_to_torch(params[name]["fc1"], f"{name}.0"))
        sd.update(common.linear_to_torch(params[name]["fc2"], f"{name}.2"))
    return sd


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official layout for ``cfg``, computed without allocating."""
    return common.shapes_of(harmon_to_torch(common.zero_views(harmon.abstract_params(cfg)), cfg))


def harmon_from_torch(state: Mapping[str, np.ndarray], cfg: Any, source: str = "checkpoint") -> dict:
    """Official state dict -> Harmon params; one clear error lists every key that does not fit."""
    ignored = set(IGNORED)
    if cfg.llm.tie_word_embeddings:
        ignored.add("llm.lm_head.weight")  # checked against the embedding by the LM converter
    common.check_state_dict(state, expected_shapes(cfg), ignored, source)
    head_state = common.strip_prefix(state, "mar.diffloss.net.")
    mar_state = {k: v for k, v in common.strip_prefix(state, "mar.").items()
                 if not k.startswith("diffloss.") and "mar." + k not in IGNORED}
    params = {
        "llm": qwen2_hf.params_from_hf_state(common.strip_prefix(state, "llm."), cfg.llm, source=source),
        "mar": mar_torch.mar_from_torch(mar_state, cfg.mar),
        "head": mar_torch.head_from_torch(head_state, harmon.head_config(cfg)),
    }
    for name in PROJECTORS:
        params[name] = {"fc1": common.linear_from_torch(state, f"{name}.0"),
                        "fc2": common.linear_from_torch(state, f"{name}.2")}
    return jax.tree.map(np.asarray, params)


def harmon_from_pth(path: str, cfg: Any) -> dict:
    """Reads an official Harmon ``.pth`` with ``torch.load(weights_only=True)``."""
    return harmon_from_torch(common.load_torch_file(path), cfg, source=path)
