"""UAE's long-caption decoder pretraining, in the shapes world: text->image only, every prompt
the long caption that names each object's colour, shape, size and position.

Usage: ``python -m unimm.main --config=configs/uae_decoder.py:tiny --workdir=DIR``; the
result is a decoder for the auto-encoder view (``unimm.autoencoder``) and the starting point
of Unified-GRPO's decoder side. Variants are the Harmon ones.
"""
import importlib.util
import os


def _harmon():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harmon.py")
    spec = importlib.util.spec_from_file_location("unimm_configs_harmon", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None):
    config = _harmon().get_config(arg)
    d = config.data
    d.i2t_batch_size = 0                  # generation only
    d.t2i_batch_size = 16
    d.t2i_prompt_kinds = ("long_caption",)
    return config
