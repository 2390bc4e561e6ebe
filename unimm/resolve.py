"""What a config leaves to run time: the tokenizer it names, and the fields that follow from
that tokenizer and the data resolution. Shared by training, RL and the inference CLIs."""
from __future__ import annotations

from typing import Any

from absl import logging

from unimm.data import text
from unimm.data.tokenizer import HFTokenizer
from unimm.models import vae as vae_lib


def make_tokenizer(config: Any):
    path = config.data.tokenizer
    return text.shapes_tokenizer() if path == "" else HFTokenizer(path)


def set_derived_fields(config: Any, tok: Any) -> None:
    """Fields that follow from the tokenizer and the data resolution: ``data.image_token_id``,
    ``data.num_image_tokens`` (the token grid of ``data.image_size`` plus the buffers; a
    ``data.image_size`` above ``model.image_size`` is stage 3's higher resolution) and
    ``data.i2t_seq_len`` (the understanding sequence length), ``data.i2t_loss_start`` (no
    understanding target before it) and ``data.recon_seq_len`` (the reconstruction prompt's)."""
    if tok.vocab_size > config.model.llm.vocab_size:
        raise ValueError(f"tokenizer {config.data.tokenizer or '(built-in shapes)'} has "
                         f"{tok.vocab_size} tokens but model.llm.vocab_size is "
                         f"{config.model.llm.vocab_size}")
    with config.unlocked():
        if int(config.train.stage) == 3 and config.data.image_size == config.model.image_size:
            # Stage 3's preset: twice the model's native resolution (Harmon: 256 -> 512 px).
            config.data.image_size = 2 * config.model.image_size
            logging.info("train.stage=3: data.image_size set to %d", config.data.image_size)
    h, w = vae_lib.grid(config.model.vae, config.data.image_size)
    d = config.data
    with config.unlocked():   # config_flags hands out a locked ConfigDict
        d.image_token_id = int(tok.image_id)
        d.num_image_tokens = h * w + config.model.mar.buffer_size
        # 0 follows the grid (stage 3, another data.image_size): image tokens + text budget.
        d.i2t_seq_len = int(d.max_i2t_len) or d.num_image_tokens + int(d.i2t_text_len)
        # The understanding loss projects positions from here on only onto the vocabulary.
        d.i2t_loss_start = text.i2t_loss_start(tok, d.num_image_tokens)
        if "recon_text_len" in d:   # older runs' config.json predate RecA
            d.recon_seq_len = d.num_image_tokens + int(d.recon_text_len)
    if d.i2t_seq_len <= d.num_image_tokens:
        raise ValueError(f"data.max_i2t_len={d.max_i2t_len} leaves no room for text beside the "
                         f"{d.num_image_tokens} image tokens of data.image_size={d.image_size}; set it "
                         "to 0 (image tokens + data.i2t_text_len)")
