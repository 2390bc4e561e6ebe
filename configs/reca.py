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
import ml_collections

from unimm import config_utils

harmon = config_utils.sibling(__file__, "harmon.py")


def _official(micro: int) -> dict:
    """Two reconstruction and two understanding micro-batches of ``micro`` per step."""
    return {
        "data.recon_batch_size": 2 * micro, "data.i2t_batch_size": 2 * micro, "data.t2i_batch_size": 0,
        "train.recon_weight": 0.5, "train.i2t_weight": 0.5, "train.t2i_weight": 0.0,
        "data.recon_square": "stretch", "train.steps": 12_500, "train.ema_decay": 0.0,
        "optimizer.lr": 1e-5, "optimizer.warmup_fraction": 0.01, "optimizer.final_lr_fraction": 0.0,
    }


# The shapes world, from the README's main command's workdir (init_from): RecA's 2 : 2 : 0 mix
# at the tiny batch sizes. Measured in results/reca.md: without generation batches the
# generator overfills its images; beside them it does not beat a control.
SHAPES = {"data.recon_batch_size": 8, "data.i2t_batch_size": 8, "data.t2i_batch_size": 0,
          "train.steps": 3000, "optimizer.lr": 1e-4}
TABLES = {"0.5b": _official(96), "1.5b": _official(48), "tiny": SHAPES, "small": SHAPES}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, _ = config_utils.parse_variant(arg, "configs/reca.py", harmon.SIZES, {}, default="tiny")
    config = harmon.get_config(size)
    config_utils.apply_table(config, TABLES[size], f"configs/reca.py {size!r}")
    return config
