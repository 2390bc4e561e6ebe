"""RecA (Reconstruction Alignment) post-training of a Harmon model.

Usage: ``--config=configs/reca.py:1.5b --config.init_from=<converted Harmon weights>
--config.data.source=jsonl --config.data.jsonl_path=<images>`` (``:0.5b``, ``:tiny`` for the
shapes world). Every field is configs/harmon.py's; RecA changes the task mix and the
optimizer only. Each training image is also a generation target whose prompt carries that
image's own understanding embeddings (``data.recon_batch_size``, unimm/train/step.py
``recon_loss``); no caption is needed for it.

The official variants follow the RecA code (HorizonWind2004/reconstruction-alignment,
``Harmon/configs/examples/reca.py`` and its dataset config): per optimizer step two
reconstruction and two understanding micro-batches of 48 (1.5B; 96 for 0.5B, as its comment
says), each loss averaged over the four (weights 0.5 / 0.5), no text-to-image batches;
AdamW lr 1e-5, betas (0.9, 0.95), weight decay 0.02, clip 1.0; 50000 micro-batches =
12500 steps, 1 % warmup, cosine to 0; no EMA; images stretched to 512 px.
"""
import os

import ml_collections

OFFICIAL = ("0.5b", "1.5b")


def _harmon_config(arg):
    """configs/harmon.py's config, found beside this file (works from any working directory)."""
    from unimm import config_utils
    here = os.path.dirname(os.path.abspath(__file__))
    return config_utils.load_config(os.path.join(here, "harmon.py") + (f":{arg}" if arg else ""))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = (arg or "tiny").lower()
    config = _harmon_config(variant)
    d, t, o = config.data, config.train, config.optimizer
    if variant in OFFICIAL:
        micro = 48 if variant == "1.5b" else 96
        d.recon_batch_size, d.i2t_batch_size, d.t2i_batch_size = 2 * micro, 2 * micro, 0
        t.recon_weight, t.i2t_weight, t.t2i_weight = 0.5, 0.5, 0.0
        d.recon_square = "stretch"
        t.steps, t.ema_decay = 12_500, 0.0
        o.lr, o.warmup_fraction, o.final_lr_fraction = 1e-5, 0.01, 0.0
    else:
        # The shapes world, from the README's main command's workdir (init_from): RecA's
        # 2 : 2 : 0 mix at the tiny batch sizes. Measured in results/reca.md: without generation
        # batches the generator overfills its images; beside them it does not beat a control.
        d.recon_batch_size, d.i2t_batch_size, d.t2i_batch_size = 8, 8, 0
        t.steps = 3000
        o.lr = 1e-4
    return config
