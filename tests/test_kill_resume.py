"""SIGKILL at two moments (one step after a checkpoint write, and as one is written) and a
restart each time end with parameters bit-identical to one uninterrupted run of the same
command."""
import os
import re
import subprocess

import jax
import numpy as np
import pytest

from unimm import checkpoint

import tiny   # tests/tiny.py

pytestmark = pytest.mark.slow   # processes / loops: the full suite only (tests/README.md)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
# Step 9 comes one step after a checkpoint (its async write may still be running), step 16
# is a checkpoint step (killed as it is written); each restart finds a saved step.
KILL_AFTER = (9, 16)


def _cmd(workdir):
    # The train step is tests/test_loop.py::test_cli's too (tests/tiny.py).
    return tiny.main_command(workdir, f"--config.train.steps={STEPS}", "--config.train.log_every=1",
                             "--config.train.eval_every=0", "--config.train.checkpoint_every=4",
                             "--config.train.keep_checkpoints=2")


def _env():
    # Four processes compile the same programs: they share them through the session's
    # persistent cache (tests/conftest.py), every program of them.
    return tiny.process_env(1, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)


def _final_params(workdir):
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint.read_step_arrays(workdir, STEPS))]


def _run_until_killed(workdir, kill_after, env):
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = ""
    for line in proc.stdout:
        log += line
        m = re.search(rf"step (\d+)/{STEPS} loss", line)
        if m and int(m.group(1)) >= kill_after:
            proc.kill()
            break
    proc.wait(timeout=120)
    return log


def test_sigkill_and_restart_is_bit_exact(tmp_path):
    env = _env()
    reference = str(tmp_path / "reference")
    done = subprocess.run(_cmd(reference), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = str(tmp_path / "killed")
    resumed_at = []
    for kill_after in KILL_AFTER:
        log = _run_until_killed(killed, kill_after, env)
        resumed_at += [int(x) for x in re.findall(r"resumed from .* at step (\d+)", log)]
    done = subprocess.run(_cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed_at += [int(x) for x in re.findall(r"resumed from .* at step (\d+)", done.stderr)]
    # Both restarts continued from a saved step (an older one where the newest write was cut).
    assert len(resumed_at) == 2 and all(0 < s <= k for s, k in zip(resumed_at, KILL_AFTER)), resumed_at
    for a, b in zip(_final_params(killed), _final_params(reference)):
        np.testing.assert_array_equal(a, b)
