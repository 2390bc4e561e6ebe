"""The command line of the tests that start ``python -m unimm.main`` on the tiny config
(tests/test_loop.py::test_cli, test_kill_resume.py, test_preemption.py, test_multiprocess.py).

Their properties (the CLI's outputs, bit-exact restarts, SIGTERM saves, two processes equal
to one) hold at any depth, so every stack is one block deep: each process compiles its
programs ~30 % faster than at the tiny config's depths. One command line for all of them
means one train step, compiled once into the session's cache (tests/conftest.py) and read
from it by every later process with the same device count.
"""
import sys

ONE_BLOCK_EACH = ("--config.model.llm.num_layers=1", "--config.model.mar.encoder_depth=1",
                  "--config.model.mar.decoder_depth=1", "--config.model.diffusion.depth=1")


def main_command(workdir, *overrides: str, batch: int = 4) -> list[str]:
    """``python -m unimm.main`` on the tiny config, one block per stack, ``batch``
    understanding and ``batch`` generation examples per step; ``overrides`` are further
    ``--config.*`` flags (no field twice)."""
    return [sys.executable, "-m", "unimm.main", "--config=configs/harmon.py:tiny", f"--workdir={workdir}",
            *ONE_BLOCK_EACH, f"--config.data.i2t_batch_size={batch}", f"--config.data.t2i_batch_size={batch}",
            *overrides]
