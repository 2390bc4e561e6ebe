"""The config schema: every field of a run's config once, with its default and what it means.

``configs/*.py`` build their sizes and recipes as tables of overrides on :func:`base` (and
:func:`grpo` for RL runs); :func:`backfill` gives a config that lacks fields (a workdir's
``config.json`` written before they existed) these defaults, which are the behaviour those
runs had. Checks of the values live beside it, in ``unimm.resolve``. Imports nothing from
unimm.
"""
import ml_collections


def base() -> ml_collections.ConfigDict:
    """Every field, once, with what it means: the 0.5b architecture and generic settings."""
    config = ml_collections.ConfigDict()
    m = config.model = ml_collections.ConfigDict()
    m.variant = "0.5b"                    # which size built this
    m.image_size = 256                    # pixels per side (the MAR position embeddings' grid)

    c = m.llm = ml_collections.ConfigDict()
    c.vocab_size = 151936                 # tokenizer vocabulary (Qwen2.5: 151936)
    c.hidden_size = 896                   # residual stream width
    c.num_layers = 24                     # decoder layers
    c.num_heads = 14                      # query heads
    c.num_kv_heads = 2                    # key/value heads (GQA); divides num_heads
    c.head_dim = 64                       # per-head width (hidden_size // num_heads in Qwen2)
    c.intermediate_size = 4864            # SwiGLU hidden width
    c.rms_norm_eps = 1e-6                 # RMSNorm epsilon
    c.rope_theta = 1e6                    # rotary base frequency
    c.tie_word_embeddings = True          # lm_head shares embed_tokens
    c.max_position_embeddings = 32768     # longest sequence the KV cache may hold
    c.dtype = "float32"                   # compute dtype (params stay float32)
    c.initializer_range = 0.02            # std of the normal init of every weight (HF)
    c.scan_layers = False                 # one lax.scan over the layers (fast compiles at depth)
    c.remat = "none"                      # "none", "full" (recompute layers) or "dots" (keep matmuls)
    c.attention = "xla"                   # jax.nn.dot_product_attention implementation: "xla",
                                          # "cudnn" (GPU) or "auto" (JAX picks per backend)

    c = m.mar = ml_collections.ConfigDict()
    c.token_dim = 16                      # latent channels per token (vae embed_dim * patch**2)
    c.grid = 16                           # tokens per side of the image grid (img / vae_stride)
    c.width = 768                         # encoder_embed_dim
    c.encoder_depth = 12                  # encoder blocks
    c.decoder_width = 768                 # decoder_embed_dim
    c.decoder_depth = 12                  # decoder blocks
    c.num_heads = 12                      # heads in encoder and decoder blocks
    c.mlp_ratio = 4.0                     # timm Block MLP ratio
    c.buffer_size = 64                    # buffer tokens (hold fake_latent in Harmon)
    c.mask_ratio_min = 0.7                # training mask ratio lower bound
    c.mask_ratio_std = 0.25               # truncnorm's scale (loc 1.0)
    # How training masks are drawn. Harmon (MAR): one truncated-normal ratio per batch.
    # "cosine" is MaskGIT's cos(pi/2 * u): the masked fractions the cosine sampling schedule
    # visits, equally often; per example, every batch holds fully masked images (the prompt
    # alone) beside images with most tokens visible (what later MAR iterations condition on).
    c.mask_ratio_dist = "truncnorm"       # "truncnorm" (MAR), "cosine" (MaskGIT) or "uniform"
    c.mask_ratio_per_example = False      # False: one ratio per batch (MAR); True: per example
    c.mask_full_prob = 0.0                # chance a ratio is 1 instead (all masked); MAR: 0
    # How the masked tokens' losses are averaged. "token" (MAR, Harmon): every masked token of
    # the batch weighs the same, so an image with few tokens left to draw (what the last
    # sampling iterations predict) counts for little. "example": each image's masked tokens
    # share one weight, so every stage of the MAR loop is trained about equally.
    c.loss_weighting = "token"
    # > 0: + this x the mean loss over the masked tokens of the images with at most
    # late_mask_ratio of their tokens masked (the states of the last sampling iterations,
    # a few % of MAR's loss), the loss above unchanged. Harmon: 0.
    c.late_loss_weight = 0.0
    c.late_mask_ratio = 0.25
    c.layer_norm_eps = 1e-6               # LayerNorm epsilon
    # Attention and projection dropout of the blocks in training (timm's attn_drop / proj_drop;
    # Harmon's MAR configs: 0.1); off at inference.
    c.dropout = 0.0
    c.pos_embed_init_std = 0.02           # std of the encoder / decoder position embeddings' init
    c.dtype = "float32"                   # compute dtype
    c.attention = "xla"                   # attention implementation, as model.llm.attention

    c = m.diffusion = ml_collections.ConfigDict()
    c.width = 1024                        # SimpleMLPAdaLN model_channels
    c.depth = 6                           # residual blocks
    c.num_timesteps = 1000                # training diffusion steps
    c.num_sampling_steps = "100"          # respacing for sampling (guided-diffusion syntax)
    c.noise_schedule = "cosine"           # beta schedule
    c.prediction = "epsilon"              # network target: "epsilon" (MAR / Harmon), "v" or "x0"
    c.batch_mul = 4                       # diffusion_batch_mul: repeats per token in the loss
    # The loss runs the head on the masked tokens only, gathered per example into the smallest
    # of this many static sizes that holds them (the loss unchanged, ~10 % fewer rows at MAR's
    # mask ratios); 1 = every token, weighted 0 where unmasked (MAR, Harmon).
    c.loss_row_buckets = 4
    c.clip_denoised = 0.0                 # sampling: clamp predicted x0 to [-c, c] (0 = off, as MAR)
    c.clip_log_variance = False           # sampling: keep the learned log-variance within
                                          # [posterior, beta_t] (off = MAR, unbounded)
    c.dtype = "float32"                   # compute dtype

    c = m.vae = ml_collections.ConfigDict()
    c.kind = "kl16"                       # "kl16" (LDM AutoencoderKL) or "patch" (pixel patches)
    c.embed_dim = 16                      # latent channels
    c.ch = 128                            # base channels
    c.ch_mult = (1, 1, 2, 2, 4)           # per-level channel multipliers (stride 2**(len-1))
    c.num_res_blocks = 2                  # resnet blocks per level
    c.attn_resolutions = (16,)            # encoder attention at these feature sizes (256 px input)
    c.resolution = 256                    # nominal input resolution (for attn_resolutions)
    c.scale = 0.2325                      # latent scale factor
    c.patch_size = 16                     # "patch" kind: pixels per token side
    # "patch" kind, > 0: a token is this many principal components of the pixel patches
    # (fitted on the first data.code_fit_images training images, the same at every start) instead
    # of the 3 * patch_size**2 pixels, scaled so a channel varies as a pixel does on average.
    # The diffusion head then draws a few channels per token, as Harmon's draws the KL-16 VAE's 16.
    c.code_dim = 0

    m.understanding_grad_scale = 0.1      # I2T loss gradient into MAR encoder / proj_in
    # > 0: + this x MSE of a linear readout z -> token on the masked tokens (a training aid,
    # not in Harmon). From scratch (tiny) the head's zero-init adaLN leaves the LLM and the
    # MAR decoder without a signal to carry the prompt into z: without it tiny never follows
    # prompts; with it the prompt-vs-unconditional loss gap opens after ~1000 steps.
    m.readout_weight = 0.0
    # True: the diffusion head models token - readout(z) and samples add the (guided)
    # readout back (needs readout_weight > 0; not in Harmon; set diffusion.clip_denoised=2
    # with it). Off: on tiny it reconstructed less (results/generation.md).
    m.readout_residual = False

    d = config.data = ml_collections.ConfigDict()
    d.source = "shapes"                   # "shapes" (built-in world), "tfds" or "jsonl"
    d.seed = 0                            # shapes world seed / shuffle seed
    # Pixels per side of training images; above model.image_size = stage 3 (positions
    # interpolated). Official presets: 512 (Harmon's fine-tune and scripts, image_length 1024 + 64).
    d.image_size = 256
    d.i2t_batch_size = 8                  # global understanding examples per step
    d.t2i_batch_size = 8                  # global generation examples per step
    # Global reconstruction examples per step (RecA: generation conditioned on the image's own
    # understanding embeddings; any image source, no caption needed). 0 = none, as Harmon.
    d.recon_batch_size = 0
    # Global planning examples per step (text only, shapes world): a generation prompt -> the
    # long caption of a scene that fits it, the description sample.plan writes before drawing
    # (BAGEL's thinking mode). 0 = none, as Harmon.
    d.plan_batch_size = 0
    d.plan_seq_len = 112                  # planning sequence length (template + prompt + description)
    d.plan_prompt_kinds = ("long_caption", "short_caption", "geneval")   # planning prompts, in rotation
    # Shapes world: "cell" = a long caption names the objects in cell order; "shuffled" = the
    # generation prompts' long captions in a random order, and planning descriptions of a
    # GenEval prompt in the order it names the objects (each colour copied beside its shape).
    d.caption_order = "cell"
    d.max_i2t_len = 0                     # understanding sequence length incl. image tokens;
                                          # 0 = num_image_tokens + i2t_text_len (follows the grid)
    d.i2t_text_len = 80                   # understanding text budget beside the image tokens
                                          # (chat template + question + answer; Harmon: 512)
    d.max_t2i_len = 64                    # generation prompt length in training, chat template
                                          # included (Harmon: 128); sampling fits the longest prompt
    d.recon_text_len = 24                 # reconstruction prompt budget beside the image tokens
                                          # (chat template + instruction; RecA: 128 with its image)
    # Reconstruction instructions, one drawn per example: a file with one per line or a JSON
    # list (RecA draws from a list of 364); "" = "Describe the image in detail." alone.
    d.recon_instructions = ""
    d.cfg_drop_prob = 0.1                 # prompts replaced by the unconditional prompt
    d.t2i_prompt_kinds = ("long_caption", "short_caption", "geneval")   # shapes prompts, in rotation
    # How JSONL / TFDS images become squares: "pad" (centred on gray 127, as Harmon's
    # understanding data), "random_crop" (Harmon's crop2square for text-to-image data),
    # "center_crop" or "stretch" (resized whole). The shapes world renders squares.
    d.i2t_square = "pad"
    d.t2i_square = "pad"
    d.recon_square = "pad"                # reconstruction images ("stretch": RecA, configs/reca.py)
    # Question of JSONL / TFDS captions: "fixed" ("Describe the image.") or "harmon" (one of
    # Harmon's dense-caption prompts at random per example, as its caption datasets do).
    d.caption_questions = "fixed"
    # Derived (set again from the tokenizer and data.image_size at run time): <image>
    # placeholders (the token grid + buffers) and the understanding sequence length.
    d.num_image_tokens = 0
    d.i2t_seq_len = 0
    d.i2t_loss_start = 0                  # set at run time: the chat head + image slots carry no target
    d.recon_seq_len = 0                   # the reconstruction prompt's length
    d.image_token_id = -1                 # set from the tokenizer at run time
    d.tokenizer = ""                      # "" = built-in shapes vocabulary, else tokenizer.json path
    d.eval_offset = 1_000_000_000         # shapes indices >= this are held out for evaluation
    d.val_offset = 2_000_000_000          # ... and >= this for validation (choosing sampling settings)
    d.tfds_name = ""                      # tfds: dataset name, split and feature keys
    d.tfds_split = "train"
    d.tfds_data_dir = ""
    d.tfds_image_key = "image"
    d.tfds_text_key = "caption"
    d.jsonl_path = ""                     # jsonl: records with image path + caption/prompt/conversations
    d.jsonl_allow_outside_root = False    # image paths may not escape the JSONL's folder
    d.worker_count = 0                    # grain worker processes (0 = in-process)
    d.code_fit_images = 256               # model.vae.code_dim: training images its PCA is fitted on
    # Threads preparing whole batches ahead of the step, and how many batches they keep ready
    # (grain ReadOptions; its defaults, 16 and 500, hold hundreds of batches and cost the shapes
    # world's 2-core runs ~10 % of their steps in thread contention). More threads or
    # data.worker_count for decoding real images.
    d.read_threads = 1
    d.prefetch_batches = 2

    t = config.train = ml_collections.ConfigDict()
    t.steps = 100_000                     # optimizer steps
    t.stage = 2                           # 1: LLM frozen; 2: all trainable; 3: all trainable at
                                          # data.image_size > model.image_size (e.g. 2x)
    # Loss weights of the two tasks' means. Official presets: 0.2 / 0.8, what Harmon's
    # accumulation of 1 understanding and 4 generation batches (each loss / 5) amounts to.
    t.i2t_weight = 1.0
    t.t2i_weight = 1.0
    t.recon_weight = 1.0                  # weight of the reconstruction loss's mean (RecA: 1)
    t.plan_weight = 1.0                   # weight of the planning loss's mean (data.plan_batch_size)
    # EMA of the params, which evaluation and the CLIs use; 0 = none (the params themselves,
    # as Harmon's fine-tune, which keeps no EMA).
    t.ema_decay = 0.0
    t.log_every = 50                      # steps between metric writes
    t.checkpoint_every = 500              # steps between checkpoints
    t.eval_every = 4000                   # steps between evaluations (0 = never)
    t.keep_checkpoints = 3                # newest checkpoints kept
    t.max_nonfinite_steps = 10            # this many skipped (NaN / inf) steps in a row stop the run
    t.preemption_grace_secs = 30          # SIGTERM -> save within this long (warned if slower)

    o = config.optimizer = ml_collections.ConfigDict()
    o.lr = 1e-4                           # peak learning rate (Harmon's fine-tune: 1e-5)
    o.schedule = "cosine"                 # "cosine" (warmup + cosine) or "constant" (after warmup)
    o.warmup_fraction = 0.01              # warmup steps as a fraction of train.steps
    o.final_lr_fraction = 0.1             # cosine ends at lr * this (Harmon: 0)
    o.b1 = 0.9                            # AdamW betas (MAR / Harmon)
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.02                 # not on 1-D params, biases or the diffusion head
    o.grad_clip = 1.0                     # global-norm clip (0 = off)
    o.head_lr_scale = 1.0                 # the diffusion head's lr as a multiple of lr (Harmon, MAR: 1)

    s = config.sample = ml_collections.ConfigDict()
    s.num_iter = 64                       # MAR iterations (<= tokens per image), each conditioned
                                          # on the tokens drawn before it
    s.cfg = 3.0                           # classifier-free guidance scale
    s.cfg_schedule = "constant"           # "constant" or "linear" (Muse)
    s.temperature = 1.0                   # diffusion noise temperature
    s.num_sampling_steps = ""             # "" = model.diffusion.num_sampling_steps
    s.final_sampling_steps = 0            # DiSA (arXiv 2505.20297): diffusion steps of the last MAR
                                          # iteration, annealed linearly from the first's; 0 = off
                                          # (every iteration the same, as Harmon and MAR). GRPO's
                                          # rollouts keep grpo.decoder.rollout_steps throughout
    s.max_windows = 4                     # groups of static sizes the MAR iterations share (one loop
                                          # body compiled each): the head's rows follow the tokens an
                                          # iteration draws, the encoder's and LLM's the tokens drawn
                                          # before it; the image does not change
    # True: the LLM first writes a detailed description of each prompt's scene (trained by
    # data.plan_batch_size; sampled at plan_temperature, 0 = greedy) and the image is drawn from
    # that description (BAGEL's thinking mode). False: drawn from the prompt itself, as Harmon.
    s.plan = False
    s.plan_temperature = 1.0
    # Captioning, as transformers' generate (unimm.models.decoding).
    s.max_new_tokens = 64                 # caption length limit
    s.caption_sampling = False            # False: greedy (do_sample=False); True: sample with
                                          # caption_temperature, top_k, top_p
    s.caption_temperature = 1.0           # caption sampling temperature
    s.top_k = 0                           # caption sampling: keep the k best tokens (0 = off)
    s.top_p = 1.0                         # caption sampling: nucleus mass (1 = off)
    s.repetition_penalty = 1.0            # HF's penalty (1 = off)
    # A generation_config.json (or its folder; unimm.convert keeps the model folder's) whose
    # repetition_penalty, temperature, top_k, top_p and eos ids replace the fields above.
    s.generation_config = ""

    e = config.eval = ml_collections.ConfigDict()
    e.num_examples = 60                   # held-out items per task (shapes benchmark)
    e.batch_size = 12                     # items per sampling / captioning call
    e.unified_bench = ("mar", "latent")   # image encoders of the Unified-Bench score (mean cosine
                                          # of source vs reconstruction features)

    config.sharding = sharding_config()
    config.seed = 0                       # base PRNG seed
    config.init_from = ""                 # converted checkpoint to start from ("" = random init)
    return config


def sharding_config() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.mesh = {"data": -1, "fsdp": 1, "tensor": 1}   # mesh axis sizes; -1 = remaining devices
    # Logical axis -> mesh axes (MaxText base.yml style). Axes that do not divide a
    # dimension are dropped for it (unimm.sharding.logical_to_spec).
    s.logical_axis_rules = (
        # activations
        ("batch", ("data", "fsdp")),
        # language model
        ("vocab", "tensor"),               # embedding rows / lm_head columns
        ("embed", "fsdp"),                 # residual width
        ("mlp", "tensor"),                 # SwiGLU / MLP hidden
        ("heads", "tensor"),               # fused query heads * head_dim
        ("kv_heads", "tensor"),            # fused kv heads * head_dim
        ("norm", None),                    # norm scales and biases: replicated
        # MAR, diffusion head, projectors
        ("seq", None),                     # position-embedding rows
        ("token", None),                   # latent token channels (16)
        ("qkv", "tensor"),                 # fused qkv projection output
        ("cond", "fsdp"),                  # adaLN conditioning width
        # VAE convolutions
        ("conv_in", None),
        ("conv_out", "tensor"),
        ("kernel_h", None),
        ("kernel_w", None),
    )
    return s


def grpo() -> ml_collections.ConfigDict:
    """Unified-GRPO: the settings of both policies, then each policy's own group
    (``grpo.captioner.*``, ``grpo.decoder.*``; the group of the policy not chosen stays at
    these values: unimm.resolve.validate_grpo)."""
    g = ml_collections.ConfigDict()
    g.policy = "captioner"                # "captioner" (generation for understanding) or "decoder"
                                          # (understanding for generation; set trainable to e.g.
                                          # ("mar", "head"), or add "llm")
    g.trainable = ("llm",)                # param groups the policy update may change
    g.group_size = 8                      # G samples per input
    g.inputs_per_step = 8                 # inputs (images or prompts) per rollout
    g.beta = 0.04                         # KL weight (k3 estimator for tokens)
    g.epsilon = 0.2                       # PPO clip below 1
    g.epsilon_high = 0.28                 # PPO clip above 1 (DAPO's clip-higher)
    g.advantage = "grpo"                  # grpo | drgrpo | rloo (unimm.train.grpo_math.ADVANTAGES)
    g.advantage_clip = 5.0                # |advantage| cap (Flow-GRPO); 0 = off
    g.loss_aggregation = "seq-mean-token-mean"   # or "token-mean" (DAPO / Dr. GRPO)
    g.ppo_epochs = 1                      # optimizer steps per rollout
    g.drop_constant_groups = True         # DAPO: skip groups whose rewards are all equal
    g.reward = "shapes_match"             # unimm.eval.rewards.REWARDS: image vs its source image

    c = g.captioner = ml_collections.ConfigDict()   # policy "captioner": the LLM's captions
    c.decoder_from = ""                   # the frozen decoder's supervised workdir (UAE's separate
                                          # decoder); "" = init_from's model
    c.temperature = 0.7                   # caption sampling temperature (UAE: 0.7)
    c.max_new_tokens = 48                 # caption length limit during rollouts

    d = g.decoder = ml_collections.ConfigDict()     # policy "decoder": the image sampler
    d.encoder_from = ""                   # the frozen captioner's supervised workdir (UAE's separate
                                          # encoder); "" = init_from's model
    d.prompts = "captions"                # "captions" (the frozen encoder's caption of each training
                                          # image, scored by grpo.reward), "geneval" (GenEval prompts
                                          # of the training split, scored by the GenEval check) or
                                          # "both" (half of the inputs each)
    d.rollout_steps = "10"                # diffusion steps per rollout (sampling: 100)
    d.train_variance = True               # False = only the steps' means move (the head's learned
                                          # variances get no policy gradient)
    d.step_fraction = 1.0                 # fraction of (iteration, step) pairs trained
    d.step_selection = "random"           # which ones: "random" (a new draw each step) or "noisiest"
                                          # (the first steps of each iteration; Flow-GRPO)
    d.sft_weight = 0.0                    # weight of the supervised T2I loss on a batch of training
                                          # long captions added to each step (PPO-ptx); 0 = off
    d.sft_batch_size = 16                 # examples in that supervised batch
    d.retain_weight = 0.0                 # weight of the KL to the reference on every diffusion step
                                          # of the policy's own (unscored) images of training long
                                          # captions, drawn each step; 0 = off
    d.retain_batch_size = 16              # images in that retain rollout
    return g


POLICY_GROUPS = ("captioner", "decoder")   # grpo.<policy>.*: one group of settings per policy


def moved_grpo_field(name: str) -> str | None:
    """Where a flat ``grpo.<name>`` of configs written before the policy groups lives now
    (``"grpo.decoder.prompts"``), or None."""
    g = grpo()
    return next((f"grpo.{p}.{name}" for p in POLICY_GROUPS if name in g[p]), None)


# What a saved config must hold, never defaulted: the architecture its checkpoints were built with.
ARCHITECTURE = (
    "model.image_size",
    *(f"model.llm.{k}" for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                 "head_dim", "intermediate_size", "max_position_embeddings")),
    *(f"model.mar.{k}" for k in ("token_dim", "grid", "width", "encoder_depth", "decoder_width",
                                 "decoder_depth", "num_heads", "buffer_size")),
    "model.diffusion.width", "model.diffusion.depth", "model.vae.kind", "model.vae.patch_size",
)


def backfill(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with every field it lacks added from the schema (in place; returned). A
    missing :data:`ARCHITECTURE` field is a KeyError naming it instead."""
    for path in ARCHITECTURE:
        node = config
        for name in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise KeyError(f"'{path}'")
            node = node[name]

    def fill(node, defaults):
        for key, value in defaults.items():
            if key not in node:
                node[key] = value
            elif isinstance(value, ml_collections.ConfigDict) and isinstance(node[key], ml_collections.ConfigDict):
                fill(node[key], value)

    with config.unlocked():
        defaults = base()
        if "grpo" in config:
            defaults.grpo = grpo()
            _group_grpo_fields(config.grpo)
        fill(config, defaults)
    return config


def _group_grpo_fields(g: ml_collections.ConfigDict) -> None:
    """Moves the flat policy fields of an older config (``grpo.prompts``) into their
    policy's group (``grpo.decoder.prompts``)."""
    for name in list(g):
        moved = moved_grpo_field(name)
        if moved and not isinstance(g[name], ml_collections.ConfigDict):
            group = moved.split(".")[1]
            if group not in g:
                g[group] = ml_collections.ConfigDict()
            g[group][name] = g[name]
            del g[name]
