"""Harmon composition and its official checkpoint layout."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import config_utils
from unimm.convert import common
from unimm.convert.harmon_pth import harmon_from_pth, harmon_from_torch, harmon_to_torch
from unimm.models import decoding, harmon, mar, qwen2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    cfg = config_utils.load_config("configs/harmon.py:tiny").model
    cfg.readout_weight = 0.0   # Harmon's own architecture: the checkpoints have no training aids
    return cfg, harmon.init(cfg, jax.random.key(0))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_official_key_layout(tiny):
    cfg, params = tiny
    sd = harmon_to_torch(params, cfg)
    assert "llm.model.embed_tokens.weight" in sd and "llm.lm_head.weight" not in sd
    for key in ("mar.fake_latent", "mar.z_proj.weight", "mar.encoder_blocks.0.attn.qkv.weight",
                "mar.decoder_blocks.1.mlp.fc2.bias", "mar.diffusion_pos_embed_learned",
                "mar.diffloss.net.time_embed.mlp.0.weight", "mar.diffloss.net.res_blocks.0.adaLN_modulation.1.weight",
                "mar.diffloss.net.final_layer.linear.weight", "proj_in.0.weight", "proj_out.2.bias"):
        assert key in sd, key
    assert sd["proj_in.0.weight"].shape == (cfg.llm.hidden_size, cfg.mar.width)   # torch [out, in]


def test_round_trip_is_exact(tiny):
    cfg, params = tiny
    back = harmon_from_torch(harmon_to_torch(params, cfg), cfg)
    assert_trees_equal(params, back)


def test_pth_file_round_trip_ignores_class_emb(tiny, tmp_path):
    cfg, params = tiny
    sd = harmon_to_torch(params, cfg)
    sd["mar.class_emb.weight"] = np.zeros((1000, cfg.mar.width), np.float32)
    sd["llm.lm_head.weight"] = sd["llm.model.embed_tokens.weight"].copy()   # tied, listed twice
    path = str(tmp_path / "harmon_tiny.pth")
    common.save_torch_file(sd, path)
    assert_trees_equal(params, harmon_from_pth(path, cfg))


def test_wrong_architecture_is_rejected(tiny):
    cfg, params = tiny
    small = config_utils.load_config("configs/harmon.py:small").model
    with pytest.raises(common.CheckpointMismatchError, match="does not fit the configured model"):
        harmon_from_torch(harmon_to_torch(params, cfg), small)


def test_convert_cli_writes_orbax_checkpoint(tiny, tmp_path):
    import orbax.checkpoint as ocp

    cfg, params = tiny
    src = str(tmp_path / "h.pth")
    common.save_torch_file(harmon_to_torch(params, cfg), src)
    dst = str(tmp_path / "out")
    llm = tmp_path / "Qwen2.5-Instruct"   # the LLM folder: its decoding settings and tokenizer are kept
    llm.mkdir()
    (llm / "generation_config.json").write_text('{"repetition_penalty": 1.1, "eos_token_id": [7, 8]}')
    (llm / "tokenizer.json").write_text("{}")
    run = subprocess.run([sys.executable, "-m", "unimm.convert", "harmon", src, dst, "--llm_folder", str(llm),
                          "--config", "configs/harmon.py:tiny"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    restored = ocp.StandardCheckpointer().restore(os.path.join(dst, "params"),
                                                  jax.tree.map(np.asarray, params))
    assert_trees_equal(params, restored)
    assert os.path.exists(os.path.join(dst, "model_config.json"))
    assert "kept generation_config.json" in run.stdout and os.path.isfile(os.path.join(dst, "tokenizer.json"))
    assert decoding.settings_from_generation_config(dst) == {"repetition_penalty": 1.1, "eos_token_ids": (7, 8)}

    bad = subprocess.run([sys.executable, "-m", "unimm.convert", "harmon", src, str(tmp_path / "o2"),
                          "--config", "configs/harmon.py:small"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_decoder_condition_ignores_masked_tokens(tiny):
    """Only visible tokens reach the encoder and the LLM; masked slots come from mask tokens."""
    cfg, params = tiny
    b, seq = 2, cfg.mar.grid ** 2
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (b, seq, cfg.mar.token_dim))
    keep = mar.max_visible_for_training(seq, cfg.mar.mask_ratio_min)
    mask, idx, valid, _ = mar.training_mask(keys[1], b, seq, cfg.mar.mask_ratio_min, seq - keep)
    text = jax.random.randint(keys[2], (b, 5), 0, cfg.llm.vocab_size)
    embeds = qwen2.embed(params["llm"], cfg.llm, text)
    text_mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    f = jax.jit(lambda x: harmon.decoder_condition(params, cfg, embeds, text_mask, x, idx, valid))
    z = f(x)
    assert z.shape == (b, seq, cfg.mar.decoder_width)
    noise = jax.random.normal(keys[3], x.shape) * mask[..., None]      # perturb masked tokens only
    np.testing.assert_allclose(f(x + noise), z, atol=1e-6)
    assert not np.allclose(f(x + jax.random.normal(keys[3], x.shape)), z, atol=1e-3)
