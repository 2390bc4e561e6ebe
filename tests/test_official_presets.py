"""Every official preset (``configs/harmon.py`` OFFICIAL) runs end to end at its real
geometry: the token grid, buffers, sequence lengths, tokenizer special tokens and the KL-16
VAE's structure, with only widths, depths and batch sizes shrunk. A preset added to
OFFICIAL is covered here without a new test."""
import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from unimm import config_utils, resolve, sharding
from unimm.data import pipeline, text
from unimm.data.tokenizer import HFTokenizer
from unimm.inference.model import Model
from unimm.models import layers
from unimm.rl import decoder as rl_decoder
from unimm.train import grpo, grpo_decoder
from unimm.train.state import create_train_state, state_shardings
from unimm.train.step import jit_train_step


def _official():
    spec = importlib.util.spec_from_file_location("harmon_configs", os.path.join(config_utils.REPO_ROOT,
                                                                                 "configs", "harmon.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OFFICIAL


OFFICIAL = _official()
QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
CAPTIONS = ["a red car parked beside a tall tree", "two dogs playing on the beach at sunset",
            "a bowl of green apples on a wooden table"]
# Widths and depths only: the grid, buffers, vocabulary and sequence lengths stay the preset's.
SHRINK = {"model.llm.hidden_size": 64, "model.llm.num_layers": 1, "model.llm.num_heads": 2,
          "model.llm.num_kv_heads": 1, "model.llm.head_dim": 32, "model.llm.intermediate_size": 64,
          "model.mar.width": 32, "model.mar.decoder_width": 32, "model.mar.encoder_depth": 1,
          "model.mar.decoder_depth": 1, "model.mar.num_heads": 2, "model.diffusion.width": 32,
          "model.diffusion.depth": 1, "model.vae.ch": 32, "data.i2t_batch_size": 1, "data.t2i_batch_size": 2,
          "sample.num_iter": 2, "sample.num_sampling_steps": "2",
          "optimizer.warmup_fraction": 0.0}   # the first step moves what it trains


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """A word-level tokenizer.json with Qwen2.5's special tokens at their ids, and a JSONL of
    captioned non-square images of several sizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("qwen_like")
    texts = CAPTIONS + list(text.DENSE_CAPTION_QS) + [text.GEN_TEMPLATE, text.UNCOND_PROMPT, "user assistant"]
    words = sorted(set(re.findall(r"\w+|[^\w\s]", " ".join(texts))))
    vocab = {w: i for i, w in enumerate(["<unk>"] + words)}
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), min(QWEN_SPECIALS.values()))})
    vocab.update(QWEN_SPECIALS)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(QWEN_SPECIALS))
    tok.save(str(folder / "tokenizer.json"))
    rng = np.random.RandomState(0)
    records = []
    for i, (w, h) in enumerate([(300, 200), (180, 260), (530, 410)]):
        Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8)).save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "caption": CAPTIONS[i]})
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(folder)


def preset(spec, folder, image_size, stage):
    config = config_utils.load_config(spec)
    for item in [f"{k}={v}" for k, v in SHRINK.items()]:
        config_utils.apply_override(config, item)
    config.data.source, config.data.jsonl_path = "jsonl", os.path.join(folder, "data.jsonl")
    config.data.tokenizer, config.data.image_size, config.train.stage = folder, image_size, stage
    return config


@pytest.mark.slow
@pytest.mark.parametrize("image_size,stage", [(256, 1), (512, 3)])
@pytest.mark.parametrize("variant", OFFICIAL)
def test_preset_trains_samples_and_captions_at_its_geometry(variant, image_size, stage, qwen_like):
    config = preset(f"configs/harmon.py:{variant}", qwen_like, image_size, stage)
    assert config.model.mar.dropout == 0.1 and config.train.ema_decay == 0.0   # Harmon's training
    tok = HFTokenizer(qwen_like)
    config = resolve.resolve(config, tok)
    d = config.data
    grid = image_size // 16
    assert d.num_image_tokens == grid * grid + 64 and d.i2t_seq_len == d.num_image_tokens + 512
    assert (d.max_t2i_len, tok.eos_id, tok.pad_id) == (128, 151645, 151643)

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    batch = pipeline.global_batch(next(pipeline.make_train_iterator(config, tok)), mesh)
    assert batch["i2t_tokens"].shape == (1, d.i2t_seq_len)
    assert (np.asarray(batch["i2t_tokens"]) == tok.image_id).sum() == d.num_image_tokens
    assert batch["t2i_images"].shape == (2, image_size, image_size, 3)
    state = create_train_state(config, mesh, jax.random.key(0))
    step = jit_train_step(config, mesh, state_shardings(state), batch)
    before = jax.tree.map(np.asarray, state.params)
    with jax.set_mesh(mesh):
        state, metrics = step(state, batch, jax.random.key(1))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and metrics["nonfinite"] == 0
    assert metrics["i2t_loss"] > 0 and metrics["t2i_loss"] > 0
    llm_moved = not np.array_equal(before["llm"]["norm"]["scale"], np.asarray(state.params["llm"]["norm"]["scale"]))
    assert llm_moved == (stage != 1)   # stage 1 freezes the LLM

    model = Model(config, tok, state.params, state.tokenizer_params)
    images = model.generate(["a red car parked beside a tall tree"], jax.random.key(2))
    assert images.shape == (1, image_size, image_size, 3) and images.dtype == np.uint8
    settings = model.decoding()   # Harmon's image2text.py: greedy, penalty 1.1 (Qwen2.5-Instruct's)
    assert settings["repetition_penalty"] == 1.1 and settings["temperature"] == 0.0
    raw = np.asarray(Image.open(os.path.join(qwen_like, "2.png")))
    answer = model.answer([raw], [text.LONG_CAPTION_Q], max_new_tokens=3)
    assert len(answer) == 1 and isinstance(answer[0], str)


@pytest.mark.slow
@pytest.mark.parametrize("variant", OFFICIAL)
def test_grpo_steps_at_stage3_resolution(variant, qwen_like):
    """One GRPO step of each policy at 512 px (32x32 tokens, interpolated positions)."""
    config = preset(f"configs/grpo.py:{variant}", qwen_like, 512, 3)
    config.grpo.group_size, config.grpo.inputs_per_step, config.grpo.captioner.max_new_tokens = 2, 1, 4
    config.grpo.decoder.rollout_steps = "2"
    tok = HFTokenizer(qwen_like)
    # Unchecked: the steps run on their own here, not the loop (whose rollouts need the shapes
    # world); thawed: each policy in turn.
    config = resolve.thaw(resolve.resolve(config, tok, check=False))
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    cfg, d, g = layers.freeze(config.model), config.data, config.grpo
    rewards = jnp.asarray([[0.0, 1.0]])
    for policy, trainable in (("captioner", ("llm",)), ("decoder", ("mar", "head"))):
        config.grpo.policy, config.grpo.trainable = policy, trainable
        state = create_train_state(config, mesh, jax.random.key(0))
        if policy == "captioner":
            image = next(pipeline.make_train_iterator(config, tok))["i2t_images"][:1]
            prompt, mask = text.left_pad([text.i2t_prompt_ids(tok, text.LONG_CAPTION_Q, d.num_image_tokens)],
                                         tok.pad_id)
            tokens = Model(config, tok, state.params, state.tokenizer_params)._image_tokens(
                [np.asarray((image[0] + 1) * 127.5, np.uint8)])
            rollout = grpo.caption_rollout(state.params, state.params, cfg, prompt, mask, tokens, jax.random.key(1),
                                           group_size=g.group_size, temperature=g.captioner.temperature,
                                           max_new_tokens=g.captioner.max_new_tokens, image_id=d.image_token_id,
                                           eos_id=tok.eos_id, pad_id=tok.pad_id)
            step_fn = grpo.grpo_step
        else:
            rollout, images = rl_decoder.decoder_rollout(config, tok, state, state.params, CAPTIONS[:2],
                                                        jax.random.key(1))
            assert images.shape == (2, 512, 512, 3)
            step_fn = grpo_decoder.decoder_grpo_step
        scored = grpo.shard_rollout(grpo.with_advantages(rollout, rewards, g), mesh)
        step = grpo.jit_grpo_step(config, mesh, state_shardings(state), scored, step_fn=step_fn)
        with jax.set_mesh(mesh):
            state, metrics = step(state, scored, jax.random.key(2))
        assert np.isfinite(float(metrics["loss"])), policy


def test_caption_decoding_follows_the_generation_config(qwen_like, tmp_path):
    """``sample.generation_config`` (what unimm.convert keeps from the LLM folder) sets the
    captions' penalty, sampling filters and extra eos ids, as HF's generate applies it;
    greedy decoding (Harmon's image2text.py) keeps only the penalty."""
    config = preset("configs/harmon.py:1.5b", qwen_like, 512, 2)
    tok = HFTokenizer(qwen_like)
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
        "temperature": 0.7, "top_k": 20, "top_p": 0.8}))
    config.sample.generation_config = str(tmp_path)
    model = Model(config, tok, {}, {})
    assert model.decoding() == {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.05,
                                "eos_id": [151645, 151643]}
    config.sample.caption_sampling = True
    assert model.decoding() == {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
                                "eos_id": [151645, 151643]}
    config.sample.generation_config, config.sample.top_p = "", 1.5
    with pytest.raises(ValueError, match=r"config.sample: top_p=1.5 must be in \(0, 1\]"):
        model.decoding()
