"""HF ``Qwen2ForCausalLM`` checkpoints (config.json + safetensors) <-> unimm Qwen2 params.

``params_to_hf_state`` / ``params_from_hf_state`` work on plain dicts with the HF key
names, so the Harmon converter reuses them on its ``llm.``-stripped state dict.
"""
from __future__ import annotations

import json
import os
from typing import Any
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm import schema
from unimm.convert import common
from unimm.models import layers
from unimm.models.qwen2 import Qwen2


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The unimm LLM config (``model.llm`` of unimm/schema.py, architecture from the HF config)."""
    if hf_config.get("model_type") != "qwen2":
        raise ValueError(f"config.json: model_type {hf_config.get('model_type')!r} is not 'qwen2'")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf_config['hidden_act']!r} is not supported (only 'silu')")
    # transformers 5 writes rope_parameters; older checkpoints rope_theta + rope_scaling.
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: rope scaling {rope} is not supported (only default RoPE)")
    if hf_config.get("use_sliding_window") or "sliding_attention" in (hf_config.get("layer_types") or ()):
        raise ValueError("config.json: sliding-window attention is not supported")
    try:
        hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
        c = schema.base().model.llm   # the settings HF does not hold (remat, attention, ...)
        c.vocab_size = hf_config["vocab_size"]
        c.hidden_size = hidden
        c.num_layers = hf_config["num_hidden_layers"]
        c.num_heads = heads
        c.num_kv_heads = hf_config.get("num_key_value_heads") or heads
        c.head_dim = hf_config.get("head_dim") or hidden // heads
        c.intermediate_size = hf_config["intermediate_size"]
    except KeyError as e:
        raise ValueError(f"config.json: missing required field {e.args[0]!r}") from None
    # Defaults below are Qwen2Config's.
    c.rms_norm_eps = float(hf_config.get("rms_norm_eps", 1e-6))
    c.rope_theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    c.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", False))
    c.max_position_embeddings = int(hf_config.get("max_position_embeddings", 32768))
    c.dtype = "float32"
    if c.num_heads % c.num_kv_heads:
        raise ValueError(f"config.json: num_attention_heads {heads} not divisible by "
                         f"num_key_value_heads {c.num_kv_heads}")
    return c


def params_to_hf_state(params: Any, cfg) -> dict[str, np.ndarray]:
    """HF state dict (numpy, torch layouts) of unimm Qwen2 params."""
    sd = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"])}
    for i in range(cfg.num_layers):
        p, pre = params["layers"][i], f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd.update(common.linear_to_torch(p["self_attn"][name], f"{pre}self_attn.{name}"))
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd.update(common.linear_to_torch(p["mlp"][name], f"{pre}mlp.{name}"))
        for name in ("input_layernorm", "post_attention_layernorm"):
            sd.update(common.norm_to_torch(p[name], pre + name))
    sd.update(common.norm_to_torch(params["norm"], "model.norm"))
    if not cfg.tie_word_embeddings:
        sd.update(common.linear_to_torch(params["lm_head"], "lm_head"))
    return sd


def params_from_hf_state(state: Mapping[str, np.ndarray], cfg, source: str = "checkpoint") -> Any:
    """unimm Qwen2 params (float32 numpy) from an HF state dict; raises CheckpointMismatchError."""
    abstract = layers.abstract_params(Qwen2, cfg)
    # Expected HF shapes from zero-stride views: nothing is allocated.
    views = common.zero_views(abstract)
    expected = common.shapes_of(params_to_hf_state(views, cfg))
    ignored = []
    if cfg.tie_word_embeddings and "lm_head.weight" in state:
        # HF may save the tied head; accept it only if it really is the embedding.
        head, emb = state["lm_head.weight"], state.get("model.embed_tokens.weight")
        if emb is not None and head.shape == emb.shape and np.array_equal(head, emb):
            ignored.append("lm_head.weight")
    common.check_state_dict(state, expected, ignored=ignored, source=source)

    def linear(name, bias=True):
        return common.linear_from_torch(state, name, bias=bias)

    params: dict[str, Any] = {"embed_tokens": {"embedding": state["model.embed_tokens.weight"]},
                              "layers": {}}
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        params["layers"][i] = {
            "self_attn": {n: linear(f"{pre}self_attn.{n}", bias=n != "o_proj")
                          for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {n: linear(f"{pre}mlp.{n}", bias=False) for n in ("gate_proj", "up_proj", "down_proj")},
            **{n: common.norm_from_torch(state, pre + n, bias=False)
               for n in ("input_layernorm", "post_attention_layernorm")},
        }
    params["norm"] = common.norm_from_torch(state, "model.norm", bias=False)
    if not cfg.tie_word_embeddings:
        params["lm_head"] = linear("lm_head", bias=False)
    return jax.tree.map(lambda a, s: np.ascontiguousarray(a, dtype=s.dtype), params, abstract)


def qwen2_from_hf(path: str) -> tuple[ml_collections.ConfigDict, Any]:
    """(llm config, params as float32 jax arrays) of an HF Qwen2 folder."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = config_from_hf(json.load(f))
    params = params_from_hf_state(common.load_safetensors_dir(path), cfg, source=path)
    return cfg, jax.tree.map(jnp.asarray, params)
