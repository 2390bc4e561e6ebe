"""KL-16 VAE: PyTorch ``AutoencoderKL`` state dict (MAR ``kl16.ckpt``) <-> unimm params.

The nnx module mirrors the reference names, so the mapping is a walk over the params
tree: a sub-dict with a ``kernel`` is a conv, one with a ``scale`` a GroupNorm; the dotted
path is the PyTorch name (``encoder.down.0.block.1.conv2.weight``).
"""
from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import numpy as np

from unimm.convert import common
from unimm.models.layers import abstract_params
from unimm.models.vae import KLVAE

# Non-model entries an LDM-trained checkpoint may carry (the LPIPS/discriminator loss
# module). Only these are tolerated; any other unknown key is an error.
IGNORED_PREFIXES = ("loss.",)


def _modules(tree: Mapping, prefix: str = ""):
    """Yields ``(torch_name, leaf_module_dict)`` for every conv / norm in a params tree."""
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if "kernel" in v or "scale" in v:
            yield name, v
        else:
            yield from _modules(v, name + ".")


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for p in parents:
        tree = tree.setdefault(int(p) if p.isdigit() else p, {})
    tree[last] = value


def vae_to_torch(params: Any, cfg: Any) -> dict[str, np.ndarray]:
    """unimm params -> the reference ``AutoencoderKL.state_dict()`` names and layouts."""
    del cfg  # the structure is all in the params tree
    out: dict[str, np.ndarray] = {}
    for name, p in _modules(params):
        out.update(common.conv_to_torch(p, name) if "kernel" in p else common.norm_to_torch(p, name))
    return out


def _expected(cfg: Any) -> tuple[Any, dict[str, tuple[int, ...]]]:
    abstract = abstract_params(KLVAE, cfg)
    # Zero-stride stand-ins: the layout map gives the torch shapes, nothing allocated.
    return abstract, common.shapes_of(vae_to_torch(common.zero_views(abstract), cfg))


def vae_from_torch(state: Mapping[str, np.ndarray], cfg: Any, source: str = "checkpoint") -> Any:
    """Reference state dict -> unimm params (numpy, float32); raises ``CheckpointMismatchError``."""
    abstract, expected = _expected(cfg)
    ignored = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    common.check_state_dict(state, expected, ignored=ignored, source=source)
    params: dict = {}
    for name, p in _modules(abstract):
        leaf = common.conv_from_torch(state, name) if "kernel" in p else common.norm_from_torch(state, name)
        for k, v in leaf.items():
            _set(params, f"{name}.{k}", np.ascontiguousarray(v, dtype=p[k].dtype))
    return params


def vae_from_ckpt(path: str, cfg: Any) -> Any:
    """Reads ``kl16.ckpt`` (weights under ``"model"``, loaded weights-only) into params."""
    return vae_from_torch(common.load_torch_file(path, key="model"), cfg, source=path)
