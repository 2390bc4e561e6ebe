"""SIGTERM saves the current step and exits cleanly; the same command resumes from it."""
import os
import re
import signal
import subprocess
import time

import pytest

import tiny   # tests/tiny.py

pytestmark = pytest.mark.slow   # processes / loops: the full suite only (tests/README.md)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir):
    # A step count no run reaches: each one ends by SIGTERM. The train step is
    # tests/test_kill_resume.py's (tests/tiny.py), so the cache may already hold it.
    return tiny.main_command(workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                             "--config.train.eval_every=0", "--config.train.checkpoint_every=100000",
                             "--config.sharding.mesh.data=1")


def _env():
    return tiny.process_env(1)


def _run_until(workdir, pattern):
    """Starts the command, sends SIGTERM once a log line matches ``pattern``; its whole log."""
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, deadline = "", time.time() + 300
    while time.time() < deadline:             # wait until training is under way
        line = proc.stdout.readline()
        seen += line
        if re.search(pattern, line) or not line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    seen += out
    assert proc.returncode == 0, seen[-3000:]
    return seen


def test_sigterm_saves_and_resume_continues(tmp_path):
    workdir = str(tmp_path / "run")
    seen = _run_until(workdir, r"step 3/100000")
    stopped = int(re.search(r"preempted at step (\d+)", seen).group(1))
    assert stopped >= 3
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
    # The same command resumes at the saved step (and compiles nothing new: the session's
    # cache holds the first run's programs); preempted again two steps on, it saves again.
    again = _run_until(workdir, rf"step {stopped + 2}/100000")
    assert f"at step {stopped}" in again, again[-3000:]
    assert f"step {stopped + 1}/100000" in again and f"step {stopped + 2}/100000" in again
    second = int(re.search(r"preempted at step (\d+)", again).group(1))
    assert second >= stopped + 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == [str(stopped), str(second)]
