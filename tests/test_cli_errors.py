"""User errors at the command line: one ``error:`` line naming the field / file / value, a
non-zero exit, no traceback. Each case is a real ``python -m unimm.main`` run (in parallel)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (extra arguments, text the one-line message must contain)
CASES = {
    "batch_not_divisible": (["--config.data.t2i_batch_size=3"], "data.t2i_batch_size=3 is not divisible by the data-parallel size 8"),
    "mesh_vs_devices": (["--config.sharding.mesh.data=3"], "sharding.mesh: shape {'data': 3, 'fsdp': 1, "
                        "'tensor': 1} needs 3 devices, but 8 are available"),
    "stage": (["--config.train.stage=4"], "train.stage=4: expected one of [1, 2, 3]"),
    "init_from_missing": (["--config.init_from=/nonexistent/harmon"], "/nonexistent/harmon"),
    "jsonl_missing": (["--config.data.source=jsonl", "--config.data.jsonl_path=/nonexistent/data.jsonl"],
                      "/nonexistent/data.jsonl"),
    "tokenizer_missing": (["--config.data.tokenizer=/nonexistent/tokenizer.json"], "/nonexistent/tokenizer.json"),
    "remat": (["--config.model.llm.remat=some"], "model.llm.remat='some'"),
    "prediction": (["--config.model.diffusion.prediction=eps"], "model.diffusion.prediction='eps'"),
    "workdir_not_writable": (["--workdir=/proc/unimm_run"], "--workdir=/proc/unimm_run is not a writable directory"),
}
ABSL_CASES = {   # rejected while the flags are parsed (ml_collections config_flags), before main runs
    "unknown_field": (["--config.train.stepz=1"],
                      'unknown config field in the --config.* overrides: stepz Did you mean "steps"'),
    "unknown_mesh_axis": (["--config.sharding.mesh.model=2"], "unknown config field in the --config.* overrides: model"),
    "wrong_type": (["--config.train.steps=many"], "flag --config.train.steps=many: invalid literal for int() with base 10: many"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "UNIMM_TRACEBACK")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT)
    procs = {}
    for name, (args, _) in {**CASES, **ABSL_CASES}.items():
        workdir = str(tmp_path_factory.mktemp(name))
        argv = [sys.executable, "-m", "unimm.main", "--config=configs/harmon.py:tiny", f"--workdir={workdir}",
                "--config.train.steps=1", "--config.train.eval_every=0", *args]
        procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    return {name: (p.wait(timeout=600), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_line_error(results, name):
    code, out, err = results[name]
    assert code != 0, (out, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and CASES[name][1] in last, err[-2000:]


@pytest.mark.parametrize("name", sorted(ABSL_CASES))
def test_flag_parser_rejects(results, name):
    code, out, err = results[name]
    assert code != 0 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and ABSL_CASES[name][1] in last, last
