"""SIGTERM saves the current step and exits cleanly; the same command resumes from it."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow   # processes / loops: the full suite only (tests/README.md)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, steps):
    return [sys.executable, "-m", "unimm.main", "--config=configs/harmon.py:tiny", f"--workdir={workdir}",
            f"--config.train.steps={steps}", "--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=100000", "--config.data.i2t_batch_size=8",
            "--config.data.t2i_batch_size=8", "--config.sharding.mesh.data=1"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def test_sigterm_saves_and_resume_continues(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(workdir, 100000), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, deadline = "", time.time() + 300
    while time.time() < deadline:             # wait until training is under way
        line = proc.stdout.readline()
        seen += line
        if re.search(r"step 3/100000", line):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    seen += out
    assert proc.returncode == 0, seen[-3000:]
    stopped = int(re.search(r"preempted at step (\d+)", seen).group(1))
    assert stopped >= 3
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
    # The same command (with a reachable step count) resumes at the saved step.
    again = subprocess.run(_cmd(workdir, stopped + 2), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    log = again.stdout + again.stderr
    assert f"at step {stopped}" in log and f"step {stopped + 2}/{stopped + 2}" in log
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == [str(stopped), str(stopped + 2)]
