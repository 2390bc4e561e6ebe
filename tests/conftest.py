"""Test setup: fake 8 CPU devices before jax is imported anywhere."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tiny import xla_flags  # noqa: E402  (tests/tiny.py: the test processes' XLA flags)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the test session (and the subprocesses it starts,
# through the environment): identical programs, e.g. the official presets shrunk to the same
# widths, compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # xdist workers inherit the controller's
    import atexit
    import shutil
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="unimm_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# The files that take longest on 2 cores (measured with --durations=0), longest first: with
# `-n 2 --dist loadfile` each worker takes the next file as it frees up, so running the long
# ones first keeps both workers busy to the end instead of one finishing a long file alone.
LONGEST_FIRST = ("test_grpo_decoder.py", "test_official_presets.py", "test_loop.py", "test_memory.py",
                 "test_grpo.py", "test_train_step.py", "test_multiprocess.py", "test_kill_resume.py",
                 "test_harmon_sample.py", "test_notebook.py", "test_bad_input.py", "test_preemption.py")


# Seconds each test spends lowering and compiling programs in its own process (setup, call
# and teardown; a persistent-cache hit counts its read; tracing is left out, as nested jits
# would count twice): printed after --durations, to tell the tests slowed by compilation
# from those slowed by running. The processes a test starts are not counted.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _count_compile(event, seconds, **_):
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile)


_COMPILE_START = pytest.StashKey[float]()
_compile_rows = []   # (seconds, nodeid), gathered where the reports arrive (the controller under xdist)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_COMPILE_START] = _compile_seconds[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.when == "teardown":   # setup + call + teardown, shipped to the controller with the report
        report.user_properties.append(("compile_s", _compile_seconds[0] - item.stash.get(_COMPILE_START, 0.0)))
    return report


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        seconds = dict(report.user_properties).get("compile_s")
        if seconds is not None:
            _compile_rows.append((seconds, report.nodeid))


def pytest_terminal_summary(terminalreporter):
    rows = sorted(_compile_rows, reverse=True)[:15]
    if rows and rows[0][0] >= 1.0:
        terminalreporter.write_sep("=", "most compile time (lowering + XLA) in the test's own process, s")
        for seconds, nodeid in rows:
            terminalreporter.write_line(f"{seconds:8.2f}s  {nodeid}")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: file order kept otherwise


@pytest.fixture(scope="session")
def tiny_train_config():
    """``configs/harmon.py:tiny`` as the in-process training runs use it (tests/test_loop.py,
    the supervised workdir GRPO starts from): batches of 8 over 8 fake devices with fsdp, so
    restores land in real shardings, and 6 steps. The runs share one train step, compiled
    once through the session's cache. One block per stack (tests/tiny.py): resumes,
    checkpoints and init_from hold at any depth. Keyword arguments override ``config.train``."""
    from unimm import config_utils
    from tiny import one_block_each

    def make(**train):
        config = one_block_each(config_utils.load_config("configs/harmon.py:tiny"))
        config.data.i2t_batch_size = config.data.t2i_batch_size = config.data.plan_batch_size = 8
        # (a tensor axis costs ~30 % more compile time here; tests/test_sharding.py covers it)
        config.sharding.mesh = {"data": 4, "fsdp": 2, "tensor": 1}
        config.train.update(dict(steps=6, log_every=2, checkpoint_every=3, eval_every=0))
        config.train.update(train)
        return config
    return make
