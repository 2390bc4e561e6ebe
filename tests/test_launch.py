"""The launch/ scripts: --dry-run output, --help, flag errors, and real runs with stand-ins.

The scripts print each command as a shell line; parsing it back with shlex checks the quoting
as well as the words. Nothing here calls gcloud or SLURM: SLURM's srun and scontrol are replaced
by small fakes on PATH where a real run is tested.
"""
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("tpu_pod.sh", "gpu_multinode.sh", "local.sh")
OVERRIDE = "--config.train.steps=10"


def clean_env(**extra):
    """This process's environment without what would change the scripts' output (the test
    conftest sets XLA_FLAGS and JAX_PLATFORMS; a CI runner might be inside SLURM)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "XLA_")) and k != "PYTHON"}
    env.update(extra)
    return env


def launch(script, *args, env=None, timeout=30):
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                          text=True, env=env or clean_env(), cwd=ROOT, timeout=timeout)


def dry_run(script, *args, env=None):
    """The commands a --dry-run prints, each split into its words."""
    proc = launch(script, "--dry-run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def flag_value(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def env_of(argv):
    """{NAME: value} of an `env NAME=value ... program` line, and the program's words."""
    assert argv[0] == "env"
    i = 1
    while "=" in argv[i] and not argv[i].startswith("-"):
        i += 1
    return dict(a.split("=", 1) for a in argv[1:i]), argv[i:]


# --- all scripts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    assert subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)]).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = launch(script, "--help")
    assert proc.returncode == 0
    assert "Usage:" in proc.stdout and "--dry-run" in proc.stdout


TPU_ARGS = ["--name=unimm-v5e", "--zone=us-west4-a", "--accelerator=v5litepod-16",
            "--config=configs/harmon.py:tiny", "--workdir=gs://bucket/run"]
GPU_ARGS = ["--nodes=2", "--gpus-per-node=4", "--config=configs/harmon.py:tiny",
            "--workdir=/shared/run"]
LOCAL_ARGS = ["--config=configs/harmon.py:tiny", "--workdir=/tmp/run"]


def without(args, flag):
    return [a for a in args if not a.startswith(flag + "=")]


@pytest.mark.parametrize("script,args,flag", [
    *[("tpu_pod.sh", TPU_ARGS, f) for f in ("--name", "--zone", "--accelerator", "--config",
                                            "--workdir")],
    *[("gpu_multinode.sh", GPU_ARGS, f) for f in ("--nodes", "--gpus-per-node", "--config",
                                                 "--workdir")],
    *[("local.sh", LOCAL_ARGS, f) for f in ("--config", "--workdir")],
])
def test_missing_required_flag(script, args, flag):
    proc = launch(script, "--dry-run", *without(args, flag))
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert f"missing required flag {flag}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script,args", [("tpu_pod.sh", TPU_ARGS), ("gpu_multinode.sh", GPU_ARGS),
                                         ("local.sh", LOCAL_ARGS)])
def test_bad_arguments(script, args):
    for bad in (["--bogus"], ["--config.train.steps"], ["--", ]):
        proc = launch(script, "--dry-run", *args, *bad)
        assert proc.returncode != 0 and proc.stdout == "", bad
        assert proc.stderr.startswith(script + ":"), proc.stderr


# --- tpu_pod.sh ----------------------------------------------------------------------------------

def test_tpu_dry_run():
    cmds = dry_run("tpu_pod.sh", *TPU_ARGS, "--project=my-proj", "--delete-after", OVERRIDE,
                   "--config.data.name=a b's")
    create, clean, scp, install, run, delete = cmds
    tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert create == tpu_vm + ["create", "unimm-v5e", "--zone=us-west4-a",
                               "--accelerator-type=v5litepod-16",
                               "--version=tpu-ubuntu2204-base", "--project=my-proj"]
    assert scp == tpu_vm + ["scp", "--recurse", ROOT, "unimm-v5e:~/unimm", "--zone=us-west4-a",
                            "--worker=all", "--project=my-proj"]
    for ssh in (clean, install, run):
        assert ssh[:6] == tpu_vm + ["ssh", "unimm-v5e"]
        assert "--worker=all" in ssh and "--zone=us-west4-a" in ssh and "--project=my-proj" in ssh
    assert shlex.split(flag_value(install, "--command")) == [
        "python3", "-m", "pip", "install", "-e", "~/unimm", "jax[tpu]"]
    line = shlex.split(flag_value(run, "--command"))
    assert line[:3] == ["cd", "~/unimm", "&&"]
    assert line[3:] == ["python3", "-m", "unimm.main", "--config=configs/harmon.py:tiny",
                        "--workdir=gs://bucket/run", "--multiprocess", OVERRIDE,
                        "--config.data.name=a b's"]
    assert delete == tpu_vm + ["delete", "unimm-v5e", "--zone=us-west4-a", "--quiet",
                               "--project=my-proj"]


def test_tpu_existing_slice_from_git_with_command():
    args = without(without(without(TPU_ARGS, "--accelerator"), "--config"), "--workdir")
    cmds = dry_run("tpu_pod.sh", *args, "--no-create", "--install-from=https://example.com/u.git",
                   "--", "python3", "-c", "import jax; print(jax.device_count())")
    assert len(cmds) == 3   # no create, no scp, no delete
    assert all(c[4] == "ssh" and "--worker=all" in c for c in cmds)
    assert shlex.split(flag_value(cmds[0], "--command")) == [
        "rm", "-rf", "~/unimm", "&&", "git", "clone", "--depth=1", "https://example.com/u.git",
        "~/unimm"]
    assert shlex.split(flag_value(cmds[2], "--command")) == [
        "cd", "~/unimm", "&&", "python3", "-c", "import jax; print(jax.device_count())"]


# --- gpu_multinode.sh ----------------------------------------------------------------------------

def split_srun(argv):
    """(environment, srun flags, task script, program) of the srun line."""
    env, rest = env_of(argv)
    assert rest[0] == "srun"
    b = rest.index("bash")
    assert rest[b + 1] == "-c" and rest[b + 3] == "unimm-task"
    return env, rest[1:b], rest[b + 2], rest[b + 4:]


def test_gpu_dry_run_per_host_without_slurm():
    proc = launch("gpu_multinode.sh", "--dry-run", *GPU_ARGS, OVERRIDE)
    assert proc.returncode == 0 and "FIRST_HOST" in proc.stderr
    (line,) = [shlex.split(row) for row in proc.stdout.splitlines()]
    env, srun, script, program = split_srun(line)
    assert env == {"JAX_COORDINATOR_ADDRESS": "FIRST_HOST:12345", "JAX_NUM_PROCESSES": "2",
                   "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=4"} <= set(srun)
    # Escaped: expanded inside each task, not by the launcher.
    assert "export JAX_PROCESS_ID=$SLURM_PROCID" in script and "CUDA_VISIBLE_DEVICES" not in script
    assert program == ["python", "-m", "unimm.main", "--config=configs/harmon.py:tiny",
                       "--workdir=/shared/run", "--multiprocess", OVERRIDE]


FAKE_SCONTROL = """\
#!/usr/bin/env bash
# stand-in for `scontrol show hostnames node[001-002]`
[[ "$1 $2" == "show hostnames" ]] || exit 1
printf 'node001\\nnode002\\n'
"""

FAKE_SRUN = f"""\
#!{sys.executable}
# stand-in for srun: one process per task, in turn, with the task's SLURM variables
import os, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
status = 0
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local))
        status |= subprocess.call(args, env=env)
sys.exit(status)
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """An environment inside a fake two-node allocation; the node's GPUs are 4..7."""
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        path = tmp_path / name
        path.write_text(text)
        path.chmod(0o755)
    return clean_env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
                     SLURM_JOB_NODELIST="node[001-002]", CUDA_VISIBLE_DEVICES="4,5,6,7")


def test_gpu_dry_run_per_gpu_in_allocation(fake_slurm):
    (line,) = dry_run("gpu_multinode.sh", *GPU_ARGS, "--per=gpu", "--port=23456",
                      "--srun-flag=--partition=gpu", OVERRIDE, env=fake_slurm)
    env, srun, script, program = split_srun(line)
    assert env["JAX_COORDINATOR_ADDRESS"] == "node001:23456"
    assert env["JAX_NUM_PROCESSES"] == "8"
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu"} <= set(srun)
    assert "$SLURM_PROCID" in script and "$SLURM_LOCALID" in script
    assert "CUDA_VISIBLE_DEVICES" in script
    assert program[-1] == OVERRIDE


@pytest.mark.parametrize("per,expected", [
    ("host", ["0 4,5,6,7", "1 4,5,6,7"]),
    ("gpu", [f"{node * 4 + i} {4 + i}" for node in range(2) for i in range(4)]),
])
def test_gpu_runs_tasks_with_their_ids(fake_slurm, per, expected):
    """Through a fake srun: the task script sets JAX_PROCESS_ID and, per GPU, one GPU each."""
    code = ("import os; e = os.environ; print(e['JAX_PROCESS_ID'], e['CUDA_VISIBLE_DEVICES']);"
            "assert e['JAX_COORDINATOR_ADDRESS'] == 'node001:12345'")
    proc = launch("gpu_multinode.sh", "--nodes=2", "--gpus-per-node=4", f"--per={per}",
                  "--", sys.executable, "-c", code, env=fake_slurm)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected


def test_gpu_real_run_needs_an_allocation():
    proc = launch("gpu_multinode.sh", *GPU_ARGS)
    assert proc.returncode != 0 and "SLURM_JOB_NODELIST" in proc.stderr


# --- local.sh ------------------------------------------------------------------------------------

def test_local_dry_run_processes():
    cmds = dry_run("local.sh", *LOCAL_ARGS, "--processes=3", "--cpu-devices=2", "--port=2345",
                   OVERRIDE)
    assert len(cmds) == 3
    for i, argv in enumerate(cmds):
        env, program = env_of(argv)
        assert env == {"JAX_COORDINATOR_ADDRESS": "localhost:2345", "JAX_NUM_PROCESSES": "3",
                       "JAX_PROCESS_ID": str(i),
                       "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                       "JAX_PLATFORMS": "cpu"}
        assert program == ["python", "-m", "unimm.main", "--config=configs/harmon.py:tiny",
                           "--workdir=/tmp/run", "--multiprocess", OVERRIDE]


def test_local_dry_run_single_process_is_plain():
    (argv,) = dry_run("local.sh", *LOCAL_ARGS, OVERRIDE,
                      env=clean_env(XLA_FLAGS="--xla_foo --xla_force_host_platform_device_count=8"))
    env, program = env_of(argv)
    assert env == {}   # no JAX_* variables: unimm.main would start the distributed runtime
    assert "--multiprocess" not in program and program[-1] == OVERRIDE
    (argv,) = dry_run("local.sh", *LOCAL_ARGS, "--cpu-devices", "1",
                      env=clean_env(XLA_FLAGS="--xla_foo --xla_force_host_platform_device_count=8"))
    assert env_of(argv)[0]["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=1"


def test_local_runs_every_process():
    code = "import os; print(os.environ['JAX_PROCESS_ID'], os.environ['XLA_FLAGS'])"
    proc = launch("local.sh", "--processes", "2", "--cpu-devices", "1", "--",
                  sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [
        "[0] 0 --xla_force_host_platform_device_count=1",
        "[1] 1 --xla_force_host_platform_device_count=1"]


def test_local_failure_stops_the_others():
    start = time.monotonic()
    proc = launch("local.sh", "--processes=3", "--", "bash", "-c",
                  'if [ "$JAX_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 60')
    assert time.monotonic() - start < 20
    assert proc.returncode == 3
    assert "process 1 exited with status 3" in proc.stderr
