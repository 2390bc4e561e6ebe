"""Times the official PyTorch Harmon (github.com/wusize/Harmon) on CPU at unimm's ``small`` size.

    python benchmarks/official_harmon.py --harmon_path=/tmp/harmon_ref --threads=2 --reps=3 \\
        --what=train,t2i,caption [--json=official_small.json]

Beside ``python -m unimm.bench train --variants small --batch 32`` and ``python -m unimm.bench
sample caption --variants small`` (benchmarks/README.md). Rows: train (HarmonDev.compute_loss on
16 understanding + 16 generation examples, backward, grad clip 1.0, AdamW), t2i (Harmon.sample:
4 prompts x CFG 3, 16 and 64 MAR iterations, 100 diffusion steps; ms/image) and caption
(scripts/image2text.py's llm.generate path: 4 images, greedy, repetition penalty 1.1, 32 new
tokens). Random weights from configs, nothing downloaded; the KL-16 VAE is an identity on
16-channel 8x8 latents. A script: kept out of the ``unimm`` package and its tests.
"""
import argparse
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
import types
import warnings
from functools import partial

import numpy as np
import torch
import transformers
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache

IMAGE_TOKEN = -200          # xtuner.utils.IMAGE_TOKEN_INDEX
TEMPLATE = dict(INSTRUCTION='<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n')
GRID, BUFFER, LATENT_CH = 8, 16, 16   # 128 px / vae_stride 16; 16 buffer tokens; KL-16 channels


def _build(cfg):
    """mmengine's Registry.build as Harmon.__init__ uses it: ready objects (llm, mar, vae, None) as they are."""
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        return cfg.pop("type")(**cfg)
    return cfg


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def install_stubs():
    """mmengine/xtuner: src/builder.py and src/models/harmon_dev.py import them; this path uses
    only the registry's build, an nn.Module base class, print_log and IMAGE_TOKEN_INDEX."""
    _module("mmengine")
    _module("mmengine.registry", Registry=lambda name: types.SimpleNamespace(build=_build))
    _module("mmengine.model", BaseModel=type("BaseModel", (nn.Module,), {}))
    _module("mmengine.logging", print_log=print)
    _module("xtuner")
    _module("xtuner.utils", IMAGE_TOKEN_INDEX=IMAGE_TOKEN)
    _module("xtuner.model")
    _module("xtuner.model.utils", guess_load_checkpoint=None)   # only with pretrained_pth


class _StubMeta(type):
    """Any torchvision name: a class whose attributes are such classes again (subclassable, hashable)."""
    made = {}

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{cls.__name__}.{name}"
        return _StubMeta.made.setdefault(full, _StubMeta(full, (), {}))


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves torchvision and its submodules as modules of _StubMeta classes."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__, mod.__getattr__ = [], partial(getattr, _StubMeta(spec.name, (), {}))
        return mod

    def exec_module(self, module):
        pass


def import_timm():
    """timm imports torchvision at module level (transforms, FrozenBatchNorm2d), which the MAR
    blocks never use. Where torchvision does not import (a CPU-only torch with no matching
    wheel), a stub stands in during timm's import only and is removed afterwards."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        finder = _TorchvisionStub()
        sys.meta_path.insert(0, finder)
        try:
            import timm.models.vision_transformer  # noqa: F401
        finally:
            sys.meta_path.remove(finder)
            for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
                del sys.modules[name]
    import timm
    return timm.__version__


def _curtail_layers(cache, cur_len):
    for layer in cache.layers:          # Harmon.curtail_cache's slice, on transformers 5's cache layers
        layer.keys, layer.values = layer.keys[:, :, :cur_len], layer.values[:, :, :cur_len]


def patch_official(harmon_cls):
    # DiffLoss.sample draws its noise with .cuda(): an identity where there is no GPU.
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
    # transformers >= 5 has no DynamicCache.from_legacy_cache, and iterating a cache yields
    # (keys, values, sliding) per layer, which Harmon.curtail_cache cannot unpack.
    if not hasattr(DynamicCache, "from_legacy_cache"):
        DynamicCache.from_legacy_cache = classmethod(lambda cls, past_key_values=None: cls())
        harmon_cls.curtail_cache = staticmethod(_curtail_layers)


class LatentVAE(nn.Module):
    """Stands in for the KL-16 VAE: the 'pixels' are already latents (b, 16, 8, 8)."""
    embed_dim = LATENT_CH

    def encode(self, x):
        return types.SimpleNamespace(mode=x.clone)     # Harmon.encode scales mode() in place

    def decode(self, z):
        return z


def build(args):
    from src.models.harmon_dev import HarmonDev
    from src.models.mar.mar import MAR

    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, rms_norm_eps=1e-6, attn_implementation="sdpa"))
    mar = MAR(img_size=GRID * 16, vae_stride=16, patch_size=1,
              encoder_embed_dim=256, encoder_depth=4, encoder_num_heads=4,
              decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=4,
              mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), vae_embed_dim=LATENT_CH,
              buffer_size=BUFFER, diffloss_d=3, diffloss_w=512, num_sampling_steps=args.diff_steps,
              diffusion_batch_mul=4, attn_dropout=args.dropout, proj_dropout=args.dropout)
    return HarmonDev(vae=LatentVAE(), vae_scale=0.2325, llm=llm, mar=mar, tokenizer=None,
                     prompt_template=TEMPLATE, gradient_checkpointing=args.grad_ckpt)


def best_of(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_train(model, args, vocab):
    b, n_img = 16, GRID * GRID + BUFFER
    ids = torch.randint(8, vocab, (b, args.i2t_len))
    ids[:, 3:3 + n_img] = IMAGE_TOKEN          # 3 template tokens, the image slots, then text
    labels = torch.full_like(ids, -100)
    labels[:, 3 + n_img:] = ids[:, 3 + n_img:]
    data = {"image2text": dict(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool),
                               labels=labels, pixel_values=torch.randn(b, LATENT_CH, GRID, GRID)),
            "text2image": dict(input_ids=torch.randint(8, vocab, (b, 32)),
                               attention_mask=torch.ones(b, 32, dtype=torch.bool),
                               pixel_values=torch.randn(b, LATENT_CH, GRID, GRID))}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.02)   # the official fine-tune's

    def step():
        loss = sum(model.compute_loss(data).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = best_of(step, args.reps, warmup=2)
    print(f" small train_step (16 i2t x {args.i2t_len} tokens + 16 t2i, both losses, AdamW)  "
          f"{s:7.3f} s/step = {32 / s:6.1f} examples/s", flush=True)
    return [dict(component="train_step", seconds=s, ms=1e3 * s, examples_per_s=32 / s)]


def bench_t2i(model, args, vocab):
    model.eval()
    ids, mask = torch.randint(8, vocab, (8, 32)), torch.ones(8, 32, dtype=torch.bool)
    rows = []
    for it in args.iters:
        call = lambda: model.sample(input_ids=ids, attention_mask=mask, num_iter=it, cfg=3.0,
                                    cfg_schedule="constant", temperature=1.0, image_shape=(GRID, GRID))
        out = call()                            # warm-up, and a shape check
        assert out.shape == (4, LATENT_CH, GRID, GRID), out.shape
        s = best_of(call, args.reps, warmup=0)
        rows.append(dict(component=f"t2i num_iter={it}", diffusion_steps=args.diff_steps,
                         ms_per_image=1e3 * s / 4))
        print(f" small t2i 4 prompts x CFG 3, {it:2d} iters, {args.diff_steps} diffusion steps: "
              f"{1e3 * s / 4:9.1f} ms/image", flush=True)
    return rows


def bench_caption(model, args, vocab):
    model.eval()
    n_img, new = GRID * GRID + BUFFER, 32
    ids = torch.cat([torch.full((4, 3), 7), torch.full((4, n_img), IMAGE_TOKEN),
                     torch.randint(8, vocab, (4, 16))], dim=1)
    images = torch.randn(4, LATENT_CH, GRID, GRID)

    @torch.no_grad()
    def caption():                              # scripts/image2text.py, batched
        _, z_enc = model.extract_visual_feature(model.encode(images))
        embeds = z_enc.new_zeros(*ids.shape, model.llm.config.hidden_size)
        embeds[ids == IMAGE_TOKEN] = z_enc.flatten(0, 1)
        embeds[ids != IMAGE_TOKEN] = model.llm.get_input_embeddings()(ids[ids != IMAGE_TOKEN])
        # inputs_embeds only: the penalty sees the generated ids, as in the official script
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=True,
                                 do_sample=False, repetition_penalty=1.1, max_new_tokens=new,
                                 min_new_tokens=new, eos_token_id=1, pad_token_id=0)
        assert out.shape == (4, new), out.shape
    s = best_of(caption, args.reps, warmup=1)
    print(f" small caption greedy, 4 images x {new} new tokens, repetition penalty 1.1: "
          f"{s:7.3f} s/batch = {4 * new / s:7.1f} tokens/s", flush=True)
    return [dict(component="caption", seconds=s, ms_per_batch=1e3 * s, tokens_per_s=4 * new / s)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harmon_path", required=True, help="a checkout of github.com/wusize/Harmon")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--what", default="train,t2i,caption")
    p.add_argument("--iters", default="16,64", help="MAR iterations of the t2i rows")
    p.add_argument("--diff_steps", default="100", help="diffusion sampling steps (MAR's num_sampling_steps)")
    p.add_argument("--i2t_len", type=int, default=112,
                   help="understanding sequence: 3 template + 80 image slots + text tokens (unimm.bench: 112)")
    p.add_argument("--dropout", type=float, default=0.1, help="MAR blocks' attn/proj dropout (official 0.1)")
    p.add_argument("--grad_ckpt", action="store_true", help="HarmonDev's gradient checkpointing (official default)")
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args(argv)
    args.iters = [int(x) for x in args.iters.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)       # MAR's orders and mask ratios use numpy's global generator
    warnings.filterwarnings("ignore", category=FutureWarning)    # transformers 5's renamed arguments
    warnings.filterwarnings("ignore", message="Passing `repetition_penalty`")   # noted at generate()
    transformers.logging.set_verbosity_error()

    timm_version = import_timm()
    install_stubs()
    path = os.path.abspath(args.harmon_path)
    sys.path.insert(0, path)
    from src.models.harmon import Harmon
    patch_official(Harmon)
    model = build(args)
    n_llm = sum(x.numel() for x in model.llm.parameters())
    n_mar = sum(x.numel() for x in model.mar.parameters())
    print(f"official Harmon ({path}) on CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}, timm {timm_version}; LLM {n_llm / 1e6:.2f}M params, "
          f"MAR+head {n_mar / 1e6:.2f}M, fp32", flush=True)

    vocab, rows = model.llm.config.vocab_size, []
    for what in args.what.split(","):
        rows += {"train": bench_train, "t2i": bench_t2i, "caption": bench_caption}[what](model, args, vocab)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([dict(variant="small", implementation="official_pytorch", threads=args.threads, **r)
                       for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
