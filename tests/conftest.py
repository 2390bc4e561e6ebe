"""Test setup: fake 8 CPU devices before jax is imported anywhere."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402

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


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: file order kept otherwise
