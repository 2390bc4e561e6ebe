"""UAE's long-caption decoder pretraining, in the shapes world: text->image only, every prompt
the long caption that names each object's colour, shape, size and position.

Usage: ``python -m unimm.main --config=configs/uae_decoder.py:tiny --workdir=DIR``; the
result is a decoder for the auto-encoder view (``unimm.autoencoder``) and the starting point
of Unified-GRPO's decoder side. Variants are the Harmon ones.
"""
from unimm import config_utils

harmon = config_utils.sibling(__file__, "harmon.py")


def get_config(arg: str | None = None):
    config = harmon.get_config(arg)
    d = config.data
    d.i2t_batch_size = 0                  # generation only
    d.t2i_batch_size = 16
    d.t2i_prompt_kinds = ("long_caption",)
    return config
