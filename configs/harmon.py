"""Harmon: a shared MAR encoder + Qwen2.5 LM + per-token diffusion head.

Usage: ``--config=configs/harmon.py:SIZE[,RECIPE...]``. A size is an architecture
(:data:`SIZES`), a recipe a set of training and sampling settings (:data:`RECIPES`); each is
a short table of overrides on the commented schema (unimm/schema.py: every field, once).
Each size brings its default recipe (:data:`DEFAULT_RECIPE`); recipes named after it apply
on top, in order.

* ``tiny`` (+ ``shapes``): the built-in shapes world's model and its tuned recipe (CPU tests,
  the README's main command).
* ``small``: the benchmark's main case (unimm.bench).
* ``0.5b`` and ``1.5b`` (+ ``harmon``): exactly the official architectures
  (Qwen2.5-0.5B-Instruct + MAR-B + head 6x1024, Qwen2.5-1.5B-Instruct + MAR-H + head
  12x1536, KL-16 VAE, 64 buffer tokens; MAR position embeddings for 256 px, 16x16 tokens)
  with the official fine-tune and scripts: 512 px (32x32 tokens, interpolated positions),
  Harmon's data handling, optimizer and decoding; docs/official_recipes.md lists each setting
  beside the official script or config.
"""
import ml_collections

from unimm import config_utils
from unimm.schema import base, sharding_config  # noqa: F401  (sharding_config: tests)


# Architectures: what a converted checkpoint must match.
SIZES = {
    "tiny": {                             # the shapes world's: 24 px, 8 px patch tokens, no VAE
        "model.image_size": 24, "data.image_size": 24,
        "model.llm.vocab_size": 512, "model.llm.hidden_size": 128, "model.llm.num_layers": 3,
        "model.llm.num_heads": 4, "model.llm.num_kv_heads": 2, "model.llm.head_dim": 32,
        "model.llm.intermediate_size": 256, "model.llm.max_position_embeddings": 512,
        # ~1/sqrt(width): 0.02 is tuned for 896+ wide models; at width 128 it leaves
        # attention nearly uniform for thousands of steps (captions learn ~2x slower).
        "model.llm.initializer_range": 0.08,
        # Each token the 24 principal components of its 3 * 8 * 8 pixels (model.vae.code_dim,
        # fitted on the training images; a cell is a colour times one of 8 masks, so 24 rebuild
        # it exactly). A 256-wide head drawing the 192 pixels blended the objects a prompt asks
        # for; Harmon's draws the KL-16 VAE's 16 channels, 1024 wide (results/generation.md).
        # Recipe pixel_tokens: the 192 pixels.
        "model.mar.token_dim": 24, "model.vae.code_dim": 24,
        "model.mar.grid": 3, "model.mar.width": 128, "model.mar.decoder_width": 128,
        "model.mar.encoder_depth": 2, "model.mar.decoder_depth": 2, "model.mar.num_heads": 4,
        "model.mar.buffer_size": 4,
        "model.diffusion.width": 256, "model.diffusion.depth": 3,
        # 8 px patches: one token per cell of the shapes world's 3x3 grid. (`small` keeps the
        # KL-16 geometry, latents fed directly.)
        "model.vae.kind": "patch", "model.vae.patch_size": 8,
    },
    "small": {                            # the benchmark's main case: fp32, 8x8 KL-16 tokens
        "model.image_size": 128, "data.image_size": 128,
        "model.llm.vocab_size": 1024, "model.llm.hidden_size": 256, "model.llm.num_layers": 4,
        "model.llm.num_heads": 4, "model.llm.num_kv_heads": 2, "model.llm.head_dim": 64,
        "model.llm.intermediate_size": 704, "model.llm.max_position_embeddings": 1024,
        "model.mar.grid": 8, "model.mar.width": 256, "model.mar.decoder_width": 256,
        "model.mar.encoder_depth": 4, "model.mar.decoder_depth": 4, "model.mar.num_heads": 4,
        "model.mar.buffer_size": 16,
        "model.diffusion.width": 512, "model.diffusion.depth": 3,
        "train.ema_decay": 0.9999,
    },
    "0.5b": {},                           # Qwen2.5-0.5B-Instruct + MAR-B + head 6x1024: the base
    "1.5b": {                             # Qwen2.5-1.5B-Instruct + MAR-H + head 12x1536
        "model.llm.hidden_size": 1536, "model.llm.num_layers": 28, "model.llm.num_heads": 12,
        "model.llm.num_kv_heads": 2, "model.llm.head_dim": 128, "model.llm.intermediate_size": 8960,
        "model.mar.width": 1280, "model.mar.decoder_width": 1280, "model.mar.encoder_depth": 20,
        "model.mar.decoder_depth": 20, "model.mar.num_heads": 16,
        "model.diffusion.width": 1536, "model.diffusion.depth": 12,
    },
}

RECIPES = {
    # Harmon's fine-tune of its released weights and its scripts (docs/official_recipes.md).
    "harmon": {
        "model.mar.dropout": 0.1,
        "data.image_size": 512,           # image_length 1024 + 64
        # Batches of 32 in the ratio repeat = [1, 4] (understanding : generation) accumulated
        # into one step; train.i2t_weight / t2i_weight carry the 1 : 4.
        "data.i2t_batch_size": 32, "data.t2i_batch_size": 128,
        "data.i2t_text_len": 512, "data.max_t2i_len": 128,
        "data.t2i_square": "random_crop", "data.caption_questions": "harmon",
        "train.i2t_weight": 0.2, "train.t2i_weight": 0.8,
        "optimizer.lr": 1e-5, "optimizer.final_lr_fraction": 0.0,
        # scripts/image2text.py: greedy up to 1024 new tokens, with the repetition penalty 1.1
        # that llm.generate takes from Qwen2.5-Instruct's generation_config.json.
        "sample.max_new_tokens": 1024, "sample.repetition_penalty": 1.1,
    },
    # The shapes world from scratch in 30 minutes on 2 CPU cores (results/generation.md).
    "shapes": {
        # x0: its loss makes the head read z at every noise level, which also trains the LLM
        # and MAR to carry the prompt (the readout alone rebuilt 1.00 of held-out scenes at
        # step 12000, 0.75 with eps). Its x0 at t < 20 is off by more than beta_t, so the
        # learned variance runs past its range there: clipped.
        "model.diffusion.prediction": "x0", "model.diffusion.clip_log_variance": True,
        "model.diffusion.num_sampling_steps": "25",
        "model.diffusion.clip_denoised": 6.5,   # the patch code's channels stay within +-6.3
        "model.readout_weight": 1.0,
        # MAR's training masks (one ratio per batch in [0.7, 1]) never show a 9-token image with
        # more than 2 tokens visible, which later sampling iterations condition on. A cosine
        # ratio per example over [0, 1] (MaskGIT) shows every count; a quarter of the examples
        # stay fully masked, where the prompt alone must carry the scene (a half: validation
        # GenEval 0.508 against 0.650; results/generation.md). Harmon: no fully masked share.
        "model.mar.mask_ratio_dist": "cosine", "model.mar.mask_ratio_per_example": True,
        "model.mar.mask_ratio_min": 0.0, "model.mar.mask_full_prob": 0.25,
        # With a quarter of the images fully masked, a batch nearly always needs the head on
        # every token: no smaller row sizes to compile (model.diffusion.loss_row_buckets).
        "model.diffusion.loss_row_buckets": 1,
        # The LLM first writes each prompt out as a long caption (every object's size, colour,
        # shape and cell; greedy), and the image is drawn from that: 4 planning examples per
        # step, a long caption planning to itself; generation trains on long captions alone, in
        # any object order, so a plan names a GenEval prompt's objects in the prompt's order.
        # Drawn from GenEval prompts directly, two objects' colours and relations came out as
        # chance had them (validation GenEval 0.650; plans 0.800; this 0.992; results/
        # generation.md). Harmon: no planning; its own caption data.
        "data.t2i_batch_size": 16, "data.t2i_prompt_kinds": ("long_caption",),
        "data.caption_order": "shuffled",
        "data.plan_batch_size": 4, "data.plan_seq_len": 88,
        "data.plan_prompt_kinds": ("long_caption", "geneval", "geneval"),
        "sample.plan": True, "sample.plan_temperature": 0.0,
        # The planning loss at half weight: at 1 it took capacity from the captions of the same
        # LLM (validation caption exact match 0.942, reconstruction 0.933; at 0.5 both 1.000).
        "train.plan_weight": 0.5,
        # The shapes world's longest examples (4 objects): 51 understanding text tokens (64
        # with the 13 image tokens), 47 prompt tokens. Padding to 160 / 64 made the LLM do
        # 1.5x the work per step for nothing; 67 keeps the sequence at 80.
        "data.i2t_text_len": 67, "data.max_t2i_len": 48,
        # 10000 steps at batch_mul 4 (Harmon's and MAR's noise draws per token) and one
        # evaluation at the end fit the main command's 30 minutes on 2 cores.
        "train.steps": 10_000, "train.eval_every": 10_000, "train.ema_decay": 0.995,
        "optimizer.lr": 5e-4,
        # 4 MAR iterations, each conditioned on the tokens drawn before it (validation, with
        # plans: GenEval 1.000 at 1, 2 and 4 iterations, 0.992 at 9; without plans 9 one-token
        # iterations were what got the number of objects right).
        "sample.num_iter": 4, "sample.cfg": 2.0, "sample.temperature": 1.0,
    },
    # On tiny: tokens of the 192 pixels themselves, the default before the patch code (validation,
    # same recipe: reconstruction 0.608, GenEval 0.475 against the code's 0.950 / 0.508).
    "pixel_tokens": {
        "model.vae.code_dim": 0, "model.mar.token_dim": 192, "model.diffusion.clip_denoised": 1.0,
    },
    # The patch code, tiny's default since it was measured; kept so recorded commands still run.
    "patch_code": {
        "model.vae.code_dim": 24, "model.mar.token_dim": 24, "model.diffusion.clip_denoised": 6.5,
    },
}
DEFAULT_RECIPE = {"0.5b": "harmon", "1.5b": "harmon", "small": None, "tiny": "shapes"}
OFFICIAL = ("0.5b", "1.5b")               # the released Harmon checkpoints' architectures
VARIANTS = tuple(SIZES)                   # what the argument may start with


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, recipes = config_utils.parse_variant(arg, "configs/harmon.py", SIZES, RECIPES, default="tiny")
    config = base()
    config.model.variant = size
    config_utils.apply_table(config, SIZES[size], f"configs/harmon.py size {size!r}")
    for name in filter(None, (DEFAULT_RECIPE[size], *recipes)):
        config_utils.apply_table(config, RECIPES[name], f"configs/harmon.py recipe {name!r}")
    derive_lengths(config)
    return config


def derive_lengths(config: ml_collections.ConfigDict) -> None:
    """The sequence lengths that follow from the grid and the text budgets (set again from the
    tokenizer and data.image_size at run time: unimm.resolve)."""
    d, m = config.data, config.model
    d.num_image_tokens = (d.image_size * m.mar.grid // m.image_size) ** 2 + m.mar.buffer_size
    d.i2t_seq_len = d.max_i2t_len or d.num_image_tokens + d.i2t_text_len
    d.recon_seq_len = d.num_image_tokens + d.recon_text_len
