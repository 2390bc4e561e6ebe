"""``python -m unimm.convert {qwen2,harmon,vae} SRC DST`` -> an orbax checkpoint in DST.

DST gets ``params/`` (orbax, the params pytree) and ``model_config.json`` (the architecture
the params belong to, so they can be loaded without guessing). The language model's folder
(SRC for ``qwen2``; ``--llm_folder`` for ``harmon``, the Qwen2.5-Instruct folder Harmon was
built on) gives its ``tokenizer.json`` and ``generation_config.json``, copied into DST: the
decoding settings HF's ``generate`` applies implicitly (``config.sample.generation_config``)
and the tokenizer (``config.data.tokenizer``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys

import jax
import numpy as np

from unimm import cli


def _harmon_variant(src_state) -> str:
    hidden = src_state.get("llm.model.norm.weight")
    variants = {896: "0.5b", 1536: "1.5b"}
    if hidden is None or hidden.shape[0] not in variants:
        raise SystemExit("error: cannot infer the Harmon variant (no llm.model.norm.weight of width "
                         "896 or 1536); pass --config=configs/harmon.py:<variant>")
    return variants[hidden.shape[0]]


def check_dst(dst: str) -> str:
    """``DST/params`` must not exist and DST must be creatable and writable (checked before
    anything is read or converted)."""
    target = os.path.join(os.path.abspath(dst), "params")
    if os.path.exists(target):
        raise SystemExit(f"error: {target} already exists; choose an empty destination")
    try:
        cli.check_writable_dir(dst, f"destination {dst}")
    except PermissionError as e:
        raise SystemExit(f"error: {e}") from None
    return target


KEPT_FILES = ("tokenizer.json", "generation_config.json")


def keep_llm_files(folder: str | None, dst: str) -> list[str]:
    """Copies :data:`KEPT_FILES` that ``folder`` has into ``dst`` (bytes only; nothing runs)."""
    if not folder:
        return []
    kept = []
    for name in KEPT_FILES:
        src = os.path.join(folder, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst, name))
            kept.append(name)
    return kept


def save(dst: str, params, model_cfg) -> str:
    import orbax.checkpoint as ocp

    target = check_dst(dst)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
    with open(os.path.join(dst, "model_config.json"), "w", encoding="utf-8") as f:
        f.write(model_cfg.to_json_best_effort(indent=2))
    return target


def _usage_error(parser: argparse.ArgumentParser, message: str):
    parser.print_usage(sys.stderr)
    raise SystemExit(f"error: {message}")   # exit status 1, the message as the last line


def main(argv=None) -> int:
    from unimm import config_utils
    from unimm.convert import common

    parser = argparse.ArgumentParser(prog="python -m unimm.convert", description=__doc__)
    parser.add_argument("kind", choices=("qwen2", "harmon", "vae"))
    parser.add_argument("src", help="HF folder (qwen2), harmon_*.pth (harmon) or kl16.ckpt (vae)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--config", default=None,
                        help="architecture, e.g. configs/harmon.py:1.5b (harmon: inferred; vae: 1.5b's KL-16)")
    parser.add_argument("--llm_folder", default=None,
                        help="harmon: the Qwen2.5-Instruct folder whose tokenizer.json and "
                             "generation_config.json are kept in DST")
    parser.error = lambda message: _usage_error(parser, message)
    args = parser.parse_args(argv)
    if args.llm_folder is not None and (args.kind != "harmon" or not os.path.isdir(args.llm_folder)):
        _usage_error(parser, f"--llm_folder={args.llm_folder}: expected the language model's folder, "
                             "with the harmon kind")
    created = not os.path.exists(args.dst)
    check_dst(args.dst)
    try:
        try:
            model_cfg, params = _convert(args, config_utils, common)
        except (common.CheckpointMismatchError, FileNotFoundError, ValueError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        target = save(args.dst, params, model_cfg)
        created = False
        folder = args.src if args.kind == "qwen2" else args.llm_folder
        for name in keep_llm_files(folder, args.dst):
            print(f"kept {name} in {args.dst}")
    finally:
        if created:   # nothing written: leave no empty destination behind
            with contextlib.suppress(OSError):
                os.rmdir(args.dst)
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    print(f"wrote {n:,} parameters to {target}")
    return 0


def _convert(args, config_utils, common):
    if args.kind == "qwen2":
        from unimm.convert.qwen2_hf import qwen2_from_hf
        return qwen2_from_hf(args.src)
    if args.kind == "harmon":
        from unimm.convert.harmon_pth import harmon_from_torch
        state = common.load_torch_file(args.src)
        spec = args.config or f"configs/harmon.py:{_harmon_variant(state)}"
        model_cfg = config_utils.load_config(spec).model
        return model_cfg, harmon_from_torch(state, model_cfg, source=args.src)
    from unimm.convert.vae_ckpt import vae_from_ckpt
    model_cfg = config_utils.load_config(args.config or "configs/harmon.py:1.5b").model.vae
    return model_cfg, vae_from_ckpt(args.src, model_cfg)


if __name__ == "__main__":
    sys.exit(main())
