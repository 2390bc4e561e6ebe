"""Multi-process training: 2 CPU processes x 4 devices equal 1 process x 8 devices.

Both runs go through the real entry point (``python -m unimm.main``) in subprocesses; the
two-process run joins through ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` (gloo collectives on CPU) and writes one checkpoint from both processes.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess

import jax
import numpy as np
import pytest

from unimm import checkpoint, distributed

import tiny   # tests/tiny.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
OVERRIDES = (f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=0",
             "--config.train.checkpoint_every=1000")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    # The session's compilation cache (tests/conftest.py) stays, and the one-process run goes
    # first: the two-process run then took 60 s instead of 74 s with an empty cache.
    return tiny.process_env(devices, jax_cache_only=True, **extra)


def _start(workdir: str, env: dict) -> subprocess.Popen:
    cmd = tiny.main_command(workdir, *OVERRIDES, batch=8)   # 8 examples over 8 devices
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+ loss=([0-9.]+)", log)]


def _params(workdir: str) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint.read_step_arrays(workdir, STEPS)["params"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single_dir, multi_dir = (str(tmp_path_factory.mktemp(n)) for n in ("one_process", "two_processes"))
    single_log = _finish(_start(single_dir, _env(8)))
    port = _free_port()
    procs = [_start(multi_dir, _env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                                    JAX_PROCESS_ID=i)) for i in range(2)]
    multi_logs = [_finish(p) for p in procs]
    return single_dir, single_log, multi_dir, multi_logs


@pytest.mark.slow   # three processes: the full suite only (tests/README.md)
def test_two_processes_match_one(runs):
    single_dir, single_log, multi_dir, multi_logs = runs
    assert "process 1 of 2, 4 local / 8 global devices" in multi_logs[1]
    single, multi = _losses(single_log), _losses(multi_logs[0])
    assert len(single) == STEPS and len(multi) == STEPS, (single_log[-2000:], multi_logs[0][-2000:])
    np.testing.assert_allclose(multi, single, rtol=1e-4)
    for a, b in zip(_params(multi_dir), _params(single_dir)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_explicit_settings_errors(monkeypatch):
    for k in distributed.EXPLICIT_ENV:
        monkeypatch.delenv(k, raising=False)
    assert distributed.explicit_settings() is None
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(ValueError, match="missing JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
        distributed.explicit_settings()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must lie in \[0, JAX_NUM_PROCESSES=2\)"):
        distributed.explicit_settings()
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        distributed.explicit_settings()
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.explicit_settings() == dict(coordinator_address="localhost:1234", num_processes=2,
                                                   process_id=1)
