"""MAR encoder/decoder and diffusion-head params <-> the reference's PyTorch names.

Names are relative to the reference prefixes: ``mar.`` for the MAR (``encoder_blocks.0.
attn.qkv.weight``, ``fake_latent``...) and ``mar.diffloss.net.`` for the head
(``time_embed.mlp.0.weight``...). The Harmon converter adds the prefixes.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import numpy as np

from unimm.convert.common import check_state_dict, expected_torch_shapes, tree_from_torch, tree_to_torch
from unimm.models.diffusion_head import DiffusionHead
from unimm.models.layers import abstract_params
from unimm.models.mar import MAR


def mar_to_torch(params: Any, cfg: Any) -> dict[str, np.ndarray]:
    """MAR params -> state dict named as under the reference's ``mar.`` prefix."""
    del cfg
    return tree_to_torch(params)


def mar_from_torch(state: Mapping[str, np.ndarray], cfg: Any) -> dict:
    """State dict relative to ``mar.`` -> MAR params (numpy). ``diffloss.*`` and
    ``class_emb.*`` may be present and are left to the Harmon converter."""
    abstract = abstract_params(MAR, cfg)
    ignored = [k for k in state if k.startswith(("diffloss.", "class_emb."))]
    check_state_dict(state, expected_torch_shapes(abstract), ignored=ignored, source="MAR state dict")
    return tree_from_torch(state, abstract)


def head_to_torch(params: Any, cfg: Any) -> dict[str, np.ndarray]:
    """Head params -> state dict named as inside ``diffloss.net.`` (``time_embed.mlp.0.weight``...)."""
    del cfg
    return tree_to_torch(params)


def head_from_torch(state: Mapping[str, np.ndarray], cfg: Any) -> dict:
    """State dict relative to ``diffloss.net.`` -> head params (numpy), checked first."""
    abstract = abstract_params(DiffusionHead, cfg)
    check_state_dict(state, expected_torch_shapes(abstract), source="diffusion head state dict")
    return tree_from_torch(state, abstract)
