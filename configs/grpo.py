"""Unified-GRPO on top of a supervised Harmon checkpoint.

Usage: ``--config=configs/grpo.py:SIZE[,RECIPE...] --config.init_from=<supervised workdir or
converter output>``. Sizes and the supervised recipes are configs/harmon.py's; ``grpo``
holds the RL settings, and :data:`RECIPES` the measured GRPO recipes
(results/unified_grpo.md), e.g. ``configs/grpo.py:tiny,decoder,retain``.
"""
import ml_collections

from unimm import config_utils, schema

harmon = config_utils.sibling(__file__, "harmon.py")


RECIPES = {
    # The decoder policy on GenEval prompts of the training split, MAR + head trained, for the
    # shapes world's default run (results/unified_grpo.md): fixed variances, the supervised
    # anchor, the noisiest half of each rollout's steps, an EMA of the policy (what evaluation
    # uses); 150 steps.
    "decoder": {
        "grpo.policy": "decoder", "grpo.decoder.prompts": "geneval", "grpo.trainable": ("mar", "head"),
        "grpo.decoder.train_variance": False, "grpo.decoder.sft_weight": 100.0,
        "grpo.decoder.step_selection": "noisiest", "grpo.decoder.step_fraction": 0.5,
        "optimizer.lr": 3e-5, "train.ema_decay": 0.95, "train.steps": 150,
    },
    # Retain rollouts at weight 10 (with `decoder`): reconstruction held at its ceiling, less
    # GenEval gained (results/unified_grpo.md).
    "retain": {"grpo.decoder.retain_weight": 10.0},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, names = config_utils.parse_variant(arg, "configs/grpo.py", harmon.SIZES,
                                             {**harmon.RECIPES, **RECIPES}, default="tiny")
    config = harmon.get_config(",".join([size, *(n for n in names if n in harmon.RECIPES)]))
    config.grpo = schema.grpo()
    config.train.steps = 200 if size == "tiny" else 1000
    config.optimizer.lr = 1e-5
    config.optimizer.warmup_fraction = 0.0
    config.optimizer.schedule = "constant"
    config.train.ema_decay = 0.0          # evaluate the policy itself
    config.train.log_every = 10
    config.train.checkpoint_every = 50
    for name in names:
        if name in RECIPES:
            config_utils.apply_table(config, RECIPES[name], f"configs/grpo.py recipe {name!r}")
    return config
