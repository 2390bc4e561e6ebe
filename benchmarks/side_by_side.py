"""The official PyTorch Harmon and unimm on the same rows, interleaved, with their ratios.

    python benchmarks/side_by_side.py --harmon_path=/tmp/harmon_ref --rounds=3

Each round runs, for every part (train, t2i, caption), the official command
(``official_harmon.py --what=PART``) and unimm's (``python -m unimm.bench PART --variants
small``) one right after the other, the order swapped from round to round: on a shared
machine whose speed drifts over minutes, the two sides of a ratio are then measured within
about a minute of each other. Prints each round's figures and ratio (official time / unimm
time: above 1, unimm is faster) and the median ratio over the rounds; ``--json`` keeps
every row. Both sides take their best of ``--reps`` calls after warm-up; pin the cores of
both with ``taskset -c 0-1`` (XLA uses every core it sees).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# part -> (unimm.bench component, official component, the figure both print, its unit)
ROWS = {
    "train": [("train_step", "train_step", "ms", "ms/step")],
    "t2i": [(f"t2i num_iter={n}", f"t2i num_iter={n}", "ms_per_image", "ms/image") for n in (16, 64)],
    "caption": [("caption", "caption", "ms_per_batch", "ms/batch")],
}


def _official(args, part: str, out: str) -> list[str]:
    return [sys.executable, os.path.join(HERE, "official_harmon.py"), f"--harmon_path={args.harmon_path}",
            f"--threads={args.threads}", f"--reps={args.reps}", f"--what={part}", f"--json={out}"]


def _unimm(args, part: str, out: str) -> list[str]:
    what = {"t2i": "sample"}.get(part, part)
    return [sys.executable, "-m", "unimm.bench", what, "--variants=small", "--batch=32",
            f"--reps={2 * args.reps if part == 't2i' else args.reps}", f"--json={out}"]


def _run(cmd: list[str], out: str) -> dict[str, dict]:
    """Runs one side's command; its rows by component."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
        rows = json.load(f)
    return {r["component"]: r for r in rows if r.get("variant", "small") == "small"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harmon_path", required=True, help="a checkout of github.com/wusize/Harmon")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2, help="timed calls per row on each side (t2i: twice as many "
                                                       "for unimm, whose bench halves them)")
    p.add_argument("--threads", type=int, default=2, help="the official side's torch threads")
    p.add_argument("--parts", default="caption,t2i,train")
    p.add_argument("--json", default="", help="also write every round's rows to this file")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := set(parts) - set(ROWS):
        p.error(f"--parts: unknown {sorted(unknown)}; expected some of {sorted(ROWS)}")
    if not os.path.isdir(os.path.join(args.harmon_path, "src")):
        p.error(f"--harmon_path={args.harmon_path}: not a checkout of the official code (no src/)")

    results: dict[str, list[tuple[float, float]]] = {}
    log = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for part in parts:
                sides = [("official", _official), ("unimm", _unimm)]
                got = {}
                for name, cmd in (sides if r % 2 == 0 else sides[::-1]):
                    out = os.path.join(tmp, f"{name}.json")
                    got[name] = _run(cmd(args, part, out), out)
                for ours, theirs, key, unit in ROWS[part]:
                    o, u = got["official"][theirs][key], got["unimm"][ours][key]
                    results.setdefault(ours, []).append((o, u))
                    log.append(dict(round=r + 1, component=ours, unit=unit, official=o, unimm=u, ratio=o / u))
                    print(f"round {r + 1}  {ours:<18} official {o:9.1f}  unimm {u:9.1f} {unit:<9} "
                          f"ratio {o / u:5.2f}x", flush=True)
    print("\nmedian over rounds (official time / unimm time):")
    for comp, pairs in results.items():
        ratios = [o / u for o, u in pairs]
        print(f"  {comp:<18} {statistics.median(ratios):5.2f}x   (rounds: "
              f"{', '.join(f'{x:.2f}' for x in ratios)})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(log, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
