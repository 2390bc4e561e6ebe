"""Benchmarks: ``python -m unimm.bench [components] [train] [sample] [caption] [grpo] [grpo-decoder]
[--variants tiny,small]``.

Every figure is measured side by side in one process: the fp32 matmul peak of this
machine (best of square matmuls) and each component's forward+backward, whose FLOPs come
from XLA's cost analysis of the compiled program. Prints achieved FLOP/s, its fraction
of the measured peak, and the arithmetic intensity (FLOPs per byte accessed, also from the
cost analysis): a low intensity marks a case bounded by memory traffic, not matmuls.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn: Callable[[], Any], reps: int) -> float:
    """Best-of-``reps`` wall seconds of a compiled call (the first call warms up)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _cost(compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of a compiled program from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def matmul_peak(reps: int = 5, sizes=(512, 1024, 2048)) -> tuple[float, int]:
    """fp32 matmul FLOP/s of this machine: the best over a few square sizes."""
    best, best_n = 0.0, 0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        s = _time(lambda: f(a, b), reps)
        rate = 2 * n ** 3 / s
        if rate > best:
            best, best_n = rate, n
    return best, best_n


def measure(name: str, loss_fn: Callable, args: tuple, reps: int, peak: float) -> dict:
    """Compiles ``grad(loss_fn)`` w.r.t. the first argument and times it."""
    step = jax.jit(jax.value_and_grad(loss_fn))
    compiled = step.lower(*args).compile()
    flops, nbytes = _cost(compiled)
    seconds = _time(lambda: compiled(*args), reps)
    return dict(component=name, ms=1e3 * seconds, gflop=flops / 1e9,
                gflops_per_s=flops / seconds / 1e9, peak_fraction=flops / seconds / peak,
                flop_per_byte=flops / max(nbytes, 1.0))


def component_cases(cfg: Any, rng: jax.Array, batch: int) -> list[tuple[str, Callable, tuple]]:
    """(name, loss(params, *inputs), (params, *inputs)) for each component at ``cfg``."""
    from unimm.models import gaussian_diffusion, harmon, mar, qwen2, vae

    m = cfg.model
    keys = jax.random.split(rng, 8)
    params = harmon.init(m, keys[0])
    seq_len = m.mar.grid ** 2
    text_len = 112 - seq_len - m.mar.buffer_size if m.variant == "small" else 16
    text_len = max(text_len, 8)

    tokens = jax.random.randint(keys[1], (batch, text_len + seq_len), 0, m.llm.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    kv_mask = jnp.ones(tokens.shape, bool)

    def llm_loss(p, tok):
        hidden, _ = qwen2.forward(p, m.llm, tok, positions, kv_mask)
        logits = qwen2.lm_logits(p, m.llm, hidden)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tok[:, 1:, None], -1).mean()

    image_tokens = jax.random.normal(keys[2], (batch, seq_len, m.mar.token_dim))
    keep = mar.max_visible_for_training(seq_len, m.mar.mask_ratio_min)
    mask, idx, valid, _ = mar.training_mask(keys[3], batch, seq_len, m.mar.mask_ratio_min, seq_len - keep)

    def mar_loss(p, x):
        z = mar.decode(p, m.mar, mar.encode(p, m.mar, x, idx, valid), idx, valid)
        return jnp.mean(z ** 2)

    head_cfg = harmon.head_config(m)
    cond = jax.random.normal(keys[4], (batch * seq_len, m.mar.decoder_width))
    target = image_tokens.reshape(-1, m.mar.token_dim)
    tok_mask = mask.reshape(-1).astype(jnp.float32)

    def head_loss(p, z):
        return gaussian_diffusion.diffusion_loss(p, head_cfg, m.diffusion, target, z, tok_mask, keys[5])

    text_embeds = qwen2.embed(params["llm"], m.llm, tokens[:, :text_len])
    text_mask = jnp.ones((batch, text_len), bool)

    def harmon_loss(p, x):
        z = harmon.decoder_condition(p, m, text_embeds, text_mask, x, idx, valid)
        return gaussian_diffusion.diffusion_loss(
            p["head"], head_cfg, m.diffusion, target, z.reshape(-1, z.shape[-1]), tok_mask, keys[5])

    cases = [
        ("llm (LM loss)", llm_loss, (params["llm"], tokens)),
        ("mar (enc+dec)", mar_loss, (params["mar"], image_tokens)),
        ("diffusion head loss", head_loss, (params["head"], cond)),
        ("harmon t2i loss", harmon_loss, (params, image_tokens)),
    ]
    if m.vae.kind != "patch":
        vae_params = vae.init(m.vae, keys[6])
        images = jax.random.uniform(keys[7], (1, m.image_size, m.image_size, 3), minval=-1, maxval=1)

        def vae_loss(p, x):
            t = vae.images_to_tokens(p, m.vae, x)
            return jnp.mean(vae.tokens_to_images(p, m.vae, t, (m.mar.grid, m.mar.grid)) ** 2)

        cases.append(("vae (enc+dec)", vae_loss, (vae_params, images)))
    return cases


def run_components(variants: list[str], reps: int, batch: int, peak: float) -> list[dict]:
    from unimm import config_utils

    rows = []
    for variant in variants:
        cfg = config_utils.load_config(f"configs/harmon.py:{variant}")
        for name, fn, args in component_cases(cfg, jax.random.key(0), batch):
            row = dict(variant=variant, **measure(name, fn, args, reps, peak))
            rows.append(row)
            print(f"{variant:>6} {row['component']:<22} fwd+bwd {row['ms']:9.2f} ms  "
                  f"{row['gflop']:8.3f} GFLOP  {row['gflops_per_s']:7.1f} GFLOP/s  "
                  f"{100 * row['peak_fraction']:5.1f}% of peak  {row['flop_per_byte']:6.1f} FLOP/byte",
                  flush=True)
    return rows


def synthetic_batch(config: Any, rng: np.random.Generator) -> dict:
    """A train batch of the benchmark's shapes: DESIGN.md §4 (understanding sequence 112
    tokens incl. the image, generation prompt 32 tokens), latent tokens fed directly."""
    m, d = config.model, config.data
    seq, n_img = m.mar.grid ** 2, d.num_image_tokens
    b1, b2 = d.i2t_batch_size, d.t2i_batch_size
    t1 = max(112, n_img + 16)
    tokens = rng.integers(8, m.llm.vocab_size, (b1, t1)).astype(np.int32)
    tokens[:, 3:3 + n_img] = d.image_token_id
    targets = np.full((b1, t1), -1, np.int32)
    targets[:, 3 + n_img:-1] = tokens[:, 4 + n_img:]
    return {
        "i2t_latents": rng.normal(size=(b1, seq, m.mar.token_dim)).astype(np.float32),
        "i2t_tokens": tokens, "i2t_targets": targets, "i2t_mask": np.ones((b1, t1), np.int32),
        "t2i_latents": rng.normal(size=(b2, seq, m.mar.token_dim)).astype(np.float32),
        "t2i_tokens": rng.integers(8, m.llm.vocab_size, (b2, 32)).astype(np.int32),
        "t2i_mask": np.ones((b2, 32), np.int32),
    }


def run_train(variants: list[str], reps: int, batch: int, peak: float) -> list[dict]:
    """Train-step throughput (examples/s) and FLOP/s against the measured peak: the step as
    training runs it (the understanding loss from the image's end, ``data.i2t_loss_start``),
    and beside it the same step projecting every understanding position onto the vocab."""
    from unimm import config_utils, sharding
    from unimm.train import step as step_lib
    from unimm.train.state import create_train_state, state_shardings

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rows = []
    for variant, whole in ((v, whole) for v in variants for whole in (False, True)):
        config = config_utils.load_config(f"configs/harmon.py:{variant}")
        config.data.image_token_id = 5
        config.data.i2t_batch_size = config.data.t2i_batch_size = batch // 2
        # synthetic_batch's layout: 3 template tokens, then the image slots, then the text.
        config.data.i2t_loss_start = 0 if whole else 3 + config.data.num_image_tokens
        batch_np = synthetic_batch(config, np.random.default_rng(0))
        state = create_train_state(config, mesh, jax.random.key(0))
        step = step_lib.jit_train_step(config, mesh, state_shardings(state), batch_np)
        with jax.set_mesh(mesh):
            compiled = step.lower(state, batch_np, jax.random.key(0)).compile()
            flops, _ = _cost(compiled)
            holder = [state]

            def run():
                holder[0], metrics = compiled(holder[0], batch_np, jax.random.key(0))
                return metrics
            seconds = _time(run, reps)
        row = dict(variant=variant, component="train_step" + ("_i2t_every_position" if whole else ""),
                   ms=1e3 * seconds, examples_per_s=batch / seconds, gflop=flops / 1e9,
                   gflops_per_s=flops / seconds / 1e9, peak_fraction=flops / seconds / peak)
        rows.append(row)
        what = "i2t loss over every position" if whole else "both losses"
        print(f"{variant:>6} train_step (batch {batch}, {what})  {row['ms']:9.2f} ms  {row['gflop']:7.2f} GFLOP  "
              f"{row['examples_per_s']:7.1f} examples/s  {row['gflops_per_s']:7.1f} GFLOP/s  "
              f"{100 * row['peak_fraction']:5.1f}% of peak", flush=True)
    return rows


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, *args, **kwargs):
        if name == self.EVENT:
            self.count += 1


def _fresh_model(variant: str) -> tuple[Any, Any, dict]:
    """``(config, frozen model config, fresh params)`` of ``configs/harmon.py:variant``."""
    from unimm import config_utils
    from unimm.models import harmon, layers
    config = config_utils.load_config(f"configs/harmon.py:{variant}")
    cfg = layers.freeze(config.model)
    return config, cfg, jax.jit(lambda r: harmon.init(cfg, r))(jax.random.key(0))


def run_sample(variants: list[str], reps: int) -> list[dict]:
    """T2I latency per image (4 prompts, CFG 3 -> 8 rows) at 16 and 64 MAR iterations, with
    100 diffusion steps per iteration (the official setting) and with DiSA's annealing from
    50 steps at the first iteration to 5 at the last (``sample.final_sampling_steps``), and
    the number of compilations during a warmed-up sampling call (must be 0). The iterations
    share ``sample.max_windows`` window sizes; a row with one window (the largest) shows what
    that saves."""
    from unimm.models import harmon_sample

    counter = CompileCounter()
    rows = []
    for variant in variants:
        config, cfg, params = _fresh_model(variant)
        windows = config.sample.max_windows
        tokens = jax.random.randint(jax.random.key(1), (8, 32), 8, cfg.llm.vocab_size)
        mask = jnp.ones((8, 32), jnp.int32)
        # More iterations than tokens only repeats empty ones: cap at the token count.
        steps = {"100 diffusion steps": dict(num_steps="100", max_windows=windows),
                 **({"100 steps, one window": dict(num_steps="100", max_windows=1)} if windows > 1 else {}),
                 "DiSA 50 -> 5 steps": dict(num_steps="50", final_steps=5, max_windows=windows)}
        for num_iter in sorted({min(n, cfg.mar.grid ** 2) for n in (16, 64)}):
            for name, step_kw in steps.items():
                kw = dict(num_iter=num_iter, guided=True, cfg_scale=3.0, **step_kw)
                call = lambda: harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(2), **kw)
                jax.block_until_ready(call())                       # warm-up (compiles)
                before = counter.count
                seconds = _time(call, reps)
                suffix = " disa=50->5" if "final_steps" in step_kw else \
                    " one_window" if step_kw["max_windows"] < windows else ""
                row = dict(variant=variant, component=f"t2i num_iter={num_iter}{suffix}",
                           ms_per_image=1e3 * seconds / 4, compiles_after_warmup=counter.count - before)
                rows.append(row)
                print(f"{variant:>6} t2i 4 prompts x CFG, {num_iter:2d} iters, {name}: "
                      f"{row['ms_per_image']:9.1f} ms/image  compilations after warm-up: "
                      f"{row['compiles_after_warmup']}", flush=True)
    return rows


def run_caption(variants: list[str], reps: int) -> list[dict]:
    """Greedy captioning as Harmon's scripts/image2text.py decodes (repetition penalty 1.1 over
    the generated ids): 4 images, a 16-token question after the image slots, 32 new tokens
    (no stop token, so every row decodes all 32)."""
    from unimm.models import harmon_sample

    rows = []
    for variant in variants:
        _, cfg, params = _fresh_model(variant)
        n_img, image_id, new = cfg.mar.grid ** 2 + cfg.mar.buffer_size, 5, 32
        question = np.asarray(jax.random.randint(jax.random.key(1), (4, 16), 8, cfg.llm.vocab_size))
        tokens = np.concatenate([np.full((4, 3), 7), np.full((4, n_img), image_id), question], axis=1)
        images = jax.random.normal(jax.random.key(2), (4, cfg.mar.grid ** 2, cfg.mar.token_dim))
        call = lambda: harmon_sample.caption(params, cfg, tokens, np.ones_like(tokens), images, image_id, new,
                                             eos_id=-1, pad_id=0, repetition_penalty=1.1)
        seconds = _time(call, reps)
        row = dict(variant=variant, component="caption", ms_per_batch=1e3 * seconds, tokens_per_s=4 * new / seconds)
        rows.append(row)
        print(f"{variant:>6} caption greedy, 4 images x {new} new tokens, repetition penalty 1.1: "
              f"{row['ms_per_batch']:8.1f} ms/batch = {row['tokens_per_s']:7.1f} tokens/s", flush=True)
    return rows


def run_grpo(variants: list[str], reps: int) -> list[dict]:
    """Unified-GRPO (captioner policy) at each variant's ``configs/grpo.py`` settings: caption
    rollout throughput (completion tokens/s, incl. the policy and reference scoring passes),
    decoding the captions into images (images/s), and the ``grpo_step`` time."""
    from unimm import config_utils, resolve, sharding
    from unimm.data import images as images_lib
    from unimm.data import shapes, text
    from unimm.eval import rewards
    from unimm.inference.model import Model
    from unimm.models import layers
    from unimm.models import vae as vae_lib
    from unimm.train import grpo
    from unimm.train.state import create_train_state, state_shardings

    rows = []
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    for variant in variants:
        config = config_utils.load_config(f"configs/grpo.py:{variant}")
        tok = resolve.make_tokenizer(config)
        config = resolve.resolve(config, tok)
        g, d, cfg = config.grpo, config.data, layers.freeze(config.model)
        state = create_train_state(config, mesh, jax.random.key(0))
        ref = jax.tree.map(jnp.copy, state.params)
        scenes = [shapes.sample_scene(0, i) for i in range(g.inputs_per_step)]
        source = np.stack([shapes.render(s, d.image_size) for s in scenes])
        image_tokens = vae_lib.images_to_tokens(state.tokenizer_params, cfg.vae, jnp.asarray(
            np.stack([images_lib.to_model(x) for x in source])))
        prompt, prompt_mask = text.left_pad(
            [text.i2t_prompt_ids(tok, text.LONG_CAPTION_Q, d.num_image_tokens)] * len(scenes), tok.pad_id)
        roll = lambda: grpo.caption_rollout(
            state.params, ref, cfg, prompt, prompt_mask, image_tokens, jax.random.key(1), group_size=g.group_size,
            temperature=g.captioner.temperature, max_new_tokens=g.captioner.max_new_tokens, image_id=d.image_token_id,
            eos_id=tok.eos_id, pad_id=tok.pad_id)
        with jax.set_mesh(mesh):
            t_roll = _time(roll, reps)
            rollout = roll()
            n_tokens = int(rollout["completion_mask"].sum())
            captions = grpo.caption_texts(tok, rollout, prompt.shape[1])
            decoder = Model(config, tok, ref, state.tokenizer_params)
            t_dec = _time(lambda: decoder.generate(captions, jax.random.key(2)), max(reps // 2, 1))
            reward = rewards.get_reward("shapes_match")(np.repeat(source, g.group_size, axis=0),
                                                        decoder.generate(captions, jax.random.key(2)))
            scored = grpo.with_advantages(rollout, jnp.asarray(reward.reshape(len(scenes), g.group_size)), g)
            step = grpo.jit_grpo_step(config, mesh, state_shardings(state), scored)
            holder = [state]

            def run():
                holder[0], metrics = step(holder[0], scored, jax.random.key(3))
                return metrics
            t_step = _time(run, reps)
        n_rows = g.inputs_per_step * g.group_size
        row = dict(variant=variant, component="grpo", rollout_ms=1e3 * t_roll, caption_tokens_per_s=n_tokens / t_roll,
                   decode_images_per_s=n_rows / t_dec, grpo_step_ms=1e3 * t_step)
        rows.append(row)
        print(f"{variant:>6} grpo: rollout of {n_rows} captions ({n_tokens} tokens) {row['rollout_ms']:8.1f} ms = "
              f"{row['caption_tokens_per_s']:8.0f} caption tokens/s; decoding them {row['decode_images_per_s']:6.1f} "
              f"images/s; grpo_step {row['grpo_step_ms']:7.1f} ms", flush=True)
    return rows


def run_grpo_decoder(variants: list[str], reps: int) -> list[dict]:
    """Unified-GRPO with the decoder as the policy (GenEval prompts, MAR + head trained, fixed
    variances) at each variant's ``configs/grpo.py`` settings: the trajectory-recording image
    rollout (images/s, incl. the reference's step means) and ``decoder_grpo_step`` training
    every diffusion step against the noisiest half (``grpo.decoder.step_selection``), side by side."""
    from unimm import config_utils, resolve, sharding
    from unimm.data import shapes
    from unimm.rl import decoder as rl_decoder
    from unimm.train import grpo, grpo_decoder
    from unimm.train.state import create_train_state, state_shardings

    rows = []
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    for variant in variants:
        config = config_utils.load_config(f"configs/grpo.py:{variant}")
        config.grpo.update(dict(policy="decoder", prompts="geneval", trainable=("mar", "head"),
                                train_variance=False))
        tok = resolve.make_tokenizer(config)
        config = resolve.resolve(config, tok)
        g = config.grpo
        state = create_train_state(config, mesh, jax.random.key(0))
        ref = jax.tree.map(jnp.copy, state.params)
        prompts = [shapes.geneval_prompt(0, i)[1] for i in range(g.inputs_per_step)]
        texts = list(np.repeat(prompts, g.group_size))
        # Random rewards: every group informative, as in a run that is learning.
        reward = jnp.asarray(np.random.default_rng(0).random((g.inputs_per_step, g.group_size)), jnp.float32)
        with jax.set_mesh(mesh):
            roll = lambda: rl_decoder.decoder_rollout(config, tok, state, ref, texts, jax.random.key(1))[0]
            t_roll = _time(roll, max(reps // 2, 1))
            scored = grpo.with_advantages(roll(), reward, g)
            holder, t_steps = [state], {}
            for selection, fraction in (("random", 1.0), ("noisiest", 0.5)):
                g.decoder.step_selection, g.decoder.step_fraction = selection, fraction
                step = grpo.jit_grpo_step(config, mesh, state_shardings(state), scored,
                                          step_fn=grpo_decoder.decoder_grpo_step)

                def run():
                    holder[0], metrics = step(holder[0], scored, jax.random.key(3))
                    return metrics
                t_steps[selection] = _time(run, reps)
        n_rows = g.inputs_per_step * g.group_size
        row = dict(variant=variant, component="grpo-decoder", rollout_ms=1e3 * t_roll,
                   rollout_images_per_s=n_rows / t_roll, step_all_ms=1e3 * t_steps["random"],
                   step_noisiest_half_ms=1e3 * t_steps["noisiest"])
        rows.append(row)
        print(f"{variant:>6} grpo-decoder: rollout of {n_rows} images ({g.decoder.rollout_steps} steps) "
              f"{row['rollout_ms']:8.1f} ms = {row['rollout_images_per_s']:6.1f} images/s; decoder_grpo_step "
              f"all steps {row['step_all_ms']:7.1f} ms, noisiest half {row['step_noisiest_half_ms']:7.1f} ms "
              f"({t_steps['random'] / t_steps['noisiest']:.2f}x)", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unimm.bench", description=__doc__)
    parser.add_argument("what", nargs="*", default=["components", "train", "sample", "caption", "grpo",
                                                    "grpo-decoder"],
                        choices=("components", "train", "sample", "caption", "grpo", "grpo-decoder"))
    parser.add_argument("--variants", default="tiny,small")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    peak, n = matmul_peak()
    print(f"backend {jax.default_backend()} x{jax.device_count()}; fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (best of square matmuls, n={n})")
    rows = []
    if "components" in args.what:
        rows += run_components(variants, args.reps, args.batch, peak)
    if "train" in args.what:
        rows += run_train(variants, args.reps, args.batch, peak)
    if "sample" in args.what:
        rows += run_sample(variants, max(args.reps // 2, 1))
    if "caption" in args.what:
        rows += run_caption(variants, args.reps)
    if "grpo" in args.what:
        rows += run_grpo(variants, args.reps)
    if "grpo-decoder" in args.what:
        rows += run_grpo_decoder(variants, args.reps)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
