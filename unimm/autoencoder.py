"""UAE's auto-encoder view: understanding encodes an image into a caption, generation decodes
the caption back into an image.

    ae = AutoEncoder.from_workdirs("runs/harmon")                    # one unified model
    ae = AutoEncoder.from_workdirs("runs/captioner", "runs/decoder")  # two models + connector
    captions = ae.encode(images)            # uint8 [N, H, W, 3] -> list[str]
    images2 = ae.decode(captions, rng)      # list[str] -> uint8 [N, H, W, 3]
    captions, images2 = ae.reconstruct(images, rng)

With one model, encoder and decoder share every parameter (Harmon). With two, each keeps
its own config, tokenizer and weights, and the ``connector`` carries the caption from one to
the other; the default passes the text through unchanged (each side tokenizes it itself).
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import jax
import numpy as np

from unimm.data import text

Connector = Callable[[list[str]], list[str]]


def identity_connector(captions: list[str]) -> list[str]:
    return list(captions)


class AutoEncoder:
    """``encoder`` / ``decoder``: :class:`unimm.inference.model.Model` (or anything with
    ``answer(images, questions)`` and ``generate(prompts, rng)``)."""

    def __init__(self, encoder: Any, decoder: Any | None = None, connector: Connector = identity_connector,
                 question: str = text.LONG_CAPTION_Q):
        self.encoder = encoder
        self.decoder = encoder if decoder is None else decoder
        self.connector, self.question = connector, question

    @property
    def unified(self) -> bool:
        return self.decoder is self.encoder

    @classmethod
    def from_workdirs(cls, encoder_dir: str, decoder_dir: str | None = None, **kwargs) -> AutoEncoder:
        """Models from training workdirs (their ``config.json`` and newest checkpoint)."""
        from unimm import inference
        encoder, _ = inference.load_model(inference.load_config(encoder_dir), encoder_dir)
        decoder = None
        if decoder_dir is not None:
            decoder, _ = inference.load_model(inference.load_config(decoder_dir), decoder_dir)
        return cls(encoder, decoder, **kwargs)

    def encode(self, images_uint8: Sequence[np.ndarray]) -> list[str]:
        """Image -> caption (greedy I2T with the detailed-caption question)."""
        return self.encoder.answer(images_uint8, [self.question] * len(images_uint8))

    def decode(self, captions: Sequence[str], rng: jax.Array) -> np.ndarray:
        """Caption -> image (the decoder's T2I sampler)."""
        return self.decoder.generate(self.connector(list(captions)), rng)

    def reconstruct(self, images_uint8: Sequence[np.ndarray], rng: jax.Array) -> tuple[list[str], np.ndarray]:
        captions = self.encode(images_uint8)
        return captions, self.decode(captions, rng)
