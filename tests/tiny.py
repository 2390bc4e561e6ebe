"""What the test processes share: their XLA flags (``xla_flags``), and the tiny config one
block per stack for the tests whose property holds at any depth, in process
(``one_block_each``: the training and RL loops, the compiled steps they compare) and on the
command line of the tests that start ``python -m unimm.main`` (``main_command``:
tests/test_loop.py::test_cli, test_kill_resume.py, test_preemption.py, test_multiprocess.py).

Their properties (the CLI's outputs, bit-exact restarts, SIGTERM saves, two processes equal
to one, a sharded step equal to one device) hold at any depth, so every stack is one block
deep: each program compiles ~30 % faster than at the tiny config's depths. One command line
for all of them means one train step, compiled once into the session's cache
(tests/conftest.py) and read from it by every later process with the same device count.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every process of the test session compiles for compile time, not run time: XLA's CPU
# backend at -O0 (LLVM's cheapest code generation) and its older elemental fusion emitters.
# The tiny train step compiles twice as fast and runs a step 3.5x slower, the right
# trade for programs compiled once and run a few times (results/test_suite.md). Results agree
# with the default flags' to float rounding, not bit for bit, so every process of a comparison
# compiles with the same flags: subprocess environments take theirs from ``xla_flags``.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a test process with ``devices`` fake CPU devices."""
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"


def process_env(devices: int, *, jax_cache_only: bool = False, **extra) -> dict:
    """The environment of a process a test starts: this one's, with ``devices`` fake CPU
    devices and the test XLA flags, the repository on the path, and ``extra`` (str()-ed).
    The session's compilation cache (tests/conftest.py) travels in ``JAX_COMPILATION_CACHE_DIR``.
    ``jax_cache_only`` drops every other ``JAX_*`` variable (a distributed run sets its own)."""
    keep = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "UNIMM_TRACEBACK")
           and not (jax_cache_only and k.startswith("JAX_") and k not in keep)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), PYTHONPATH=ROOT,
               **{k: str(v) for k, v in extra.items()})
    return env


ONE_BLOCK = {"model.llm.num_layers": 1, "model.mar.encoder_depth": 1, "model.mar.decoder_depth": 1,
             "model.diffusion.depth": 1}
ONE_BLOCK_EACH = tuple(f"--config.{k}={v}" for k, v in ONE_BLOCK.items())


def one_block_each(config):
    """``config`` (a tiny config, changed in place and returned) with one block per stack."""
    from unimm import config_utils
    for k, v in ONE_BLOCK.items():
        config_utils.apply_override(config, f"{k}={v}")
    return config


def main_command(workdir, *overrides: str, batch: int = 4) -> list[str]:
    """``python -m unimm.main`` on the tiny config, one block per stack, ``batch``
    understanding, generation and planning examples per step; ``overrides`` are further
    ``--config.*`` flags (no field twice)."""
    return [sys.executable, "-m", "unimm.main", "--config=configs/harmon.py:tiny", f"--workdir={workdir}",
            *ONE_BLOCK_EACH, *(f"--config.data.{task}_batch_size={batch}" for task in ("i2t", "t2i", "plan")),
            *overrides]


def sigterm_after_step(monkeypatch, step: int) -> None:
    """The GRPO loops' next runs send this process SIGTERM right after their ``step``-th
    optimizer step (a scheduler's preemption, in process): the runner then saves and returns."""
    import signal

    from unimm.train import grpo
    make = grpo.jit_grpo_step
    calls = [0]

    def jit_grpo_step(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def preempted(*a):
            out = step_fn(*a)
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return preempted
    monkeypatch.setattr(grpo, "jit_grpo_step", jit_grpo_step)
