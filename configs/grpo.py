"""Unified-GRPO on top of a supervised Harmon checkpoint.

Usage: ``--config=configs/grpo.py:SIZE[,RECIPE...] --config.init_from=<supervised workdir or
converter output>``. Sizes and the supervised recipes are configs/harmon.py's; ``grpo``
holds the RL settings, and :data:`RECIPES` the measured GRPO recipes
(results/unified_grpo.md), e.g. ``configs/grpo.py:tiny,decoder,retain``.
"""
import ml_collections

from unimm import config_utils

harmon = config_utils.sibling(__file__, "harmon.py")


def grpo_config() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.policy = "captioner"                # "captioner" (generation for understanding) or "decoder"
                                          # (understanding for generation; set trainable to e.g.
                                          # ("mar", "head"), or add "llm")
    g.decoder_from = ""                   # captioner policy: the frozen decoder's supervised workdir
                                          # (UAE's separate decoder); "" = init_from's model
    g.encoder_from = ""                   # decoder policy: the frozen captioner's supervised workdir
                                          # (UAE's separate encoder); "" = init_from's model
    g.trainable = ("llm",)                # param groups the policy update may change
    g.prompts = "captions"                # decoder policy: "captions" (the frozen encoder's caption of
                                          # each training image, scored by `reward`), "geneval" (GenEval
                                          # prompts of the training split, scored by the GenEval check)
                                          # or "both" (half of the inputs each)
    g.group_size = 8                      # G samples per input
    g.inputs_per_step = 8                 # images (captioner) per rollout
    g.temperature = 0.7                   # caption sampling temperature (UAE: 0.7)
    g.max_new_tokens = 48                 # caption length limit during rollouts
    g.beta = 0.04                         # KL weight (k3 estimator for tokens)
    g.epsilon = 0.2                       # PPO clip below 1
    g.epsilon_high = 0.28                 # PPO clip above 1 (DAPO's clip-higher)
    g.advantage = "grpo"                  # grpo | drgrpo | rloo (unimm.train.grpo_math.ADVANTAGES)
    g.advantage_clip = 5.0                # |advantage| cap (Flow-GRPO); 0 = off
    g.loss_aggregation = "seq-mean-token-mean"   # or "token-mean" (DAPO / Dr. GRPO)
    g.ppo_epochs = 1                      # optimizer steps per rollout
    g.drop_constant_groups = True         # DAPO: skip groups whose rewards are all equal
    g.reward = "shapes_match"             # unimm.eval.rewards.REWARDS: image vs its source image
    g.rollout_steps = "10"                # decoder policy: diffusion steps per rollout (sampling: 100)
    g.train_variance = True               # decoder policy: False = only the steps' means move (the
                                          # head's learned variances get no policy gradient)
    g.step_fraction = 1.0                 # decoder policy: fraction of (iteration, step) pairs trained
    g.step_selection = "random"           # decoder policy: which ones: "random" (a new draw each step) or
                                          # "noisiest" (the first steps of each iteration; Flow-GRPO)
    g.sft_weight = 0.0                    # decoder policy: weight of the supervised T2I loss on a batch of
                                          # training long captions added to each step (PPO-ptx); 0 = off
    g.sft_batch_size = 16                 # decoder policy: examples in that supervised batch
    g.retain_weight = 0.0                 # decoder policy: weight of the KL to the reference on every
                                          # diffusion step of the policy's own (unscored) images of
                                          # training long captions, drawn each step; 0 = off
    g.retain_batch_size = 16              # decoder policy: images in that retain rollout
    return g


RECIPES = {
    # The decoder policy on GenEval prompts of the training split, MAR + head trained, for the
    # shapes world's default run (results/unified_grpo.md): fixed variances, the supervised
    # anchor, the noisiest half of each rollout's steps, an EMA of the policy (what evaluation
    # uses); 150 steps.
    "decoder": {
        "grpo.policy": "decoder", "grpo.prompts": "geneval", "grpo.trainable": ("mar", "head"),
        "grpo.train_variance": False, "grpo.sft_weight": 100.0,
        "grpo.step_selection": "noisiest", "grpo.step_fraction": 0.5,
        "optimizer.lr": 3e-5, "train.ema_decay": 0.95, "train.steps": 150,
    },
    # Retain rollouts at weight 10 (with `decoder`): reconstruction held at its ceiling, less
    # GenEval gained (results/unified_grpo.md).
    "retain": {"grpo.retain_weight": 10.0},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, names = config_utils.parse_variant(arg, "configs/grpo.py", harmon.SIZES,
                                             {**harmon.RECIPES, **RECIPES}, default="tiny")
    config = harmon.get_config(",".join([size, *(n for n in names if n in harmon.RECIPES)]))
    config.grpo = grpo_config()
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
