"""One resolved config per run: every check in :func:`validate`, then :func:`resolve` returns
a frozen copy with the fields that follow from the tokenizer and the data resolution set.
The config a caller hands in is never changed. Shared by training, RL, the inference CLIs and
the tools (bench, memory)."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
from absl import logging

from unimm import rl, schema, sharding
from unimm.data import pipeline, text
from unimm.data.tokenizer import HFTokenizer
from unimm.models import decoding, gaussian_diffusion, harmon, layers, qwen2
from unimm.models import vae as vae_lib
from unimm.train import state


def make_tokenizer(config: Any):
    path = config.data.tokenizer
    return text.shapes_tokenizer() if path == "" else HFTokenizer(path)


def validate(config: Any, mesh: jax.sharding.Mesh | None = None) -> None:
    """Every check of a config that can fail before anything is built, each one ValueError
    line: enum fields, cross-field consistency, the sharding rules, the GRPO settings (the
    generic ones, then the policy's own), and with ``mesh`` the batches against its
    data-parallel size."""
    state.frozen_groups(config)                          # train.stage / grpo.trainable
    pipeline.check_data_modes(config.data)               # data.*_square, data.caption_questions
    s = config.sample
    decoding.check_settings(s.repetition_penalty, s.caption_temperature, s.top_k, s.top_p, "config.sample")
    if s.final_sampling_steps:
        first = s.num_sampling_steps or config.model.diffusion.num_sampling_steps
        try:
            gaussian_diffusion.annealed_steps(s.num_iter, first, s.final_sampling_steps)
        except ValueError as e:
            raise ValueError(f"sample.final_sampling_steps={s.final_sampling_steps}: {e}") from None
    if not isinstance(s.max_windows, int) or s.max_windows < 1:
        raise ValueError(f"sample.max_windows={s.max_windows!r}: expected an integer >= 1 (1 = one window "
                         "for every MAR iteration)")
    qwen2.check_remat(config.model.llm.remat)
    for part in ("llm", "mar"):
        layers.attention_impl(config.model[part].attention, f"model.{part}.attention")
    gaussian_diffusion.check_prediction(config.model.diffusion.prediction)
    harmon.validate(config.model)
    sharding.rules_dict(config.sharding.logical_axis_rules)
    if "grpo" in config:
        validate_grpo(config.grpo)
        if config.data.source != "shapes":
            raise ValueError("grpo: rollouts draw images from the shapes world (data.source='shapes')")
    if mesh is not None:
        check_batch_sizes(config, mesh)


def validate_grpo(g: Any) -> None:
    """Clear errors for ``config.grpo`` settings that cannot run: the generic ones, then the
    policy's own (``Policy.validate``)."""
    policy = rl.get(g.policy)
    defaults = schema.grpo()
    for other in schema.POLICY_GROUPS:   # a group the policy does not read would be ignored
        for key, default in defaults[other].items() if other != policy.settings else ():
            if g[other][key] != default:
                raise ValueError(f"grpo.{other}.{key}={g[other][key]!r} is a setting of the {other} policy, "
                                 f"and grpo.policy={g.policy!r}: leave it at {default!r} or set "
                                 f"grpo.policy='{other}'")
    if g.reward == "geneval":
        raise ValueError("grpo.reward='geneval': grpo.reward scores images against their source image; GenEval "
                         "prompts (grpo.decoder.prompts='geneval' or 'both') are always scored by the GenEval check")
    policy.validate(g)


def mesh_shape(config: Any) -> dict:
    mesh = config.sharding.mesh
    return mesh.to_dict() if hasattr(mesh, "to_dict") else dict(mesh)


def check_batch_sizes(config: Any, mesh: jax.sharding.Mesh) -> None:
    """Each task's global batch is split over the data-parallel axes (data x fsdp), and the
    mix of tasks trains something: weights >= 0, one task with examples and weight > 0.
    GRPO: its rollout rows and the decoder policy's extra batches split the same way."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if "grpo" in config:
        g = config.grpo
        rows = g.inputs_per_step * g.group_size
        if rows % dp:
            raise ValueError(f"grpo.inputs_per_step x grpo.group_size = {rows} is not divisible by the "
                             f"data-parallel size {dp}")
        for key in ("sft", "retain"):
            size = g.decoder[f"{key}_batch_size"]
            if g.decoder[f"{key}_weight"] and size % dp:
                raise ValueError(f"grpo.decoder.{key}_batch_size = {size} is not divisible by the "
                                 f"data-parallel size {dp}")
        return
    weights = {task: float(config.train[f"{task}_weight"]) for task in pipeline.TASKS}
    for task, w in weights.items():
        if w < 0:
            raise ValueError(f"train.{task}_weight={w}: expected >= 0")
    if not any(pipeline.batch_size(config.data, t) > 0 and weights[t] > 0 for t in pipeline.TASKS):
        mix = ", ".join(f"{t}: batch {pipeline.batch_size(config.data, t)} x weight {weights[t]:g}"
                        for t in pipeline.TASKS)
        raise ValueError(f"no task trains ({mix}); give one task data.<task>_batch_size > 0 and "
                         "train.<task>_weight > 0")
    for task in pipeline.TASKS:
        size = pipeline.batch_size(config.data, task)
        if size % dp:
            raise ValueError(
                f"data.{task}_batch_size={size} is not divisible by the data-parallel size {dp} "
                f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} from "
                f"sharding.mesh={mesh_shape(config)}); change the batch size or the mesh")


def thaw(config: Any) -> ml_collections.ConfigDict:
    """A mutable deep copy of ``config`` (e.g. a resolved one, to vary). Not
    ``FrozenConfigDict.as_configdict()``: that returns one cached object, shared by every
    caller, so a change to it would reach the next."""
    return ml_collections.ConfigDict(config.to_dict())


def resolve(config: Any, tok: Any = None, mesh: jax.sharding.Mesh | None = None,
            check: bool = True) -> ml_collections.FrozenConfigDict:
    """The config a run uses: a copy of ``config`` with the fields it lacks from the schema
    (``schema.backfill``), validated (:func:`validate`, with ``mesh`` if given; ``check=False``
    skips it, for a saved run's config), its derived fields set, frozen. ``tok`` defaults to
    the config's own tokenizer.

    Derived: ``data.image_token_id``, ``data.num_image_tokens`` (the token grid of
    ``data.image_size`` plus the buffers; a ``data.image_size`` above ``model.image_size`` is
    stage 3's higher resolution), ``data.i2t_seq_len`` (the understanding sequence length),
    ``data.i2t_loss_start`` (no understanding target before it) and ``data.recon_seq_len``
    (the reconstruction prompt's)."""
    out = schema.backfill(thaw(config))   # a copy with every field: defaults come from the schema only
    if check:
        validate(out, mesh)
    tok = make_tokenizer(out) if tok is None else tok
    if tok.vocab_size > config.model.llm.vocab_size:
        raise ValueError(f"tokenizer {config.data.tokenizer or '(built-in shapes)'} has "
                         f"{tok.vocab_size} tokens but model.llm.vocab_size is "
                         f"{config.model.llm.vocab_size}")
    d = out.data
    if int(out.train.stage) == 3 and d.image_size == out.model.image_size:
        # Stage 3's preset: twice the model's native resolution (Harmon: 256 -> 512 px).
        d.image_size = 2 * out.model.image_size
        logging.info("train.stage=3: data.image_size set to %d", d.image_size)
    h, w = vae_lib.grid(out.model.vae, d.image_size)
    d.image_token_id = int(tok.image_id)
    d.num_image_tokens = h * w + out.model.mar.buffer_size
    # 0 follows the grid (stage 3, another data.image_size): image tokens + text budget.
    d.i2t_seq_len = int(d.max_i2t_len) or d.num_image_tokens + int(d.i2t_text_len)
    # The understanding loss projects positions from here on only onto the vocabulary.
    d.i2t_loss_start = text.i2t_loss_start(tok, d.num_image_tokens)
    d.recon_seq_len = d.num_image_tokens + int(d.recon_text_len)
    if d.i2t_seq_len <= d.num_image_tokens:
        raise ValueError(f"data.max_i2t_len={d.max_i2t_len} leaves no room for text beside the "
                         f"{d.num_image_tokens} image tokens of data.image_size={d.image_size}; set it "
                         "to 0 (image tokens + data.i2t_text_len)")
    return ml_collections.FrozenConfigDict(out)
