"""The training loop: checkpoints + metrics, exact resume, init_from, the CLI, mesh errors."""
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from unimm import config_utils, inference
from unimm.convert.__main__ import save as convert_save
from unimm.models import harmon, layers
from unimm.train import loop

import tiny   # tests/tiny.py

pytestmark = pytest.mark.slow   # processes / loops: the full suite only (tests/README.md)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6   # tiny_train_config (tests/conftest.py)


@pytest.fixture(scope="module", autouse=True)
def cache_every_program():
    """The runs below compile the same programs, the small ones too: cache them all (in the
    session's cache, tests/conftest.py, where tests/test_grpo.py finds the same train step)."""
    old = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_train_config):
    workdir = str(tmp_path_factory.mktemp("full"))
    state = loop.train_and_evaluate(tiny_train_config(), workdir)
    return workdir, jax.tree.map(np.asarray, state.params)


def _scalar_tags(workdir):
    import tensorflow as tf
    tags = set()
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_run_writes_checkpoints_and_metrics(full_run):
    workdir, params = full_run
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    tags = _scalar_tags(workdir)
    assert {"loss", "i2t_loss", "t2i_loss", "steps_per_sec"} <= tags, tags
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_resume_is_bit_exact(full_run, tmp_path, tiny_train_config):
    workdir, params = full_run
    # An interrupted run: the same workdir as if it had stopped after the step-3 checkpoint.
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "6"))
    evals = []
    state = loop.train_and_evaluate(tiny_train_config(eval_every=1), resumed_dir,
                                    eval_fn=lambda s, step, writer: evals.append(step))
    assert evals == [4, 5, 6]          # continued after step 3; final evaluation at the end
    assert int(state.step) == STEPS
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), params)


_init = jax.jit(harmon.init, static_argnums=0)   # one compile instead of eager ops


def _converted(tmp_path, config, seed=123):
    params = jax.tree.map(np.asarray, _init(layers.freeze(config.model), jax.random.key(seed)))
    dst = str(tmp_path / "converted")
    convert_save(dst, params, config.model)
    return dst, params


def test_init_from_converter_output(tmp_path, tiny_train_config):
    config = tiny_train_config()
    dst, saved = _converted(tmp_path, config)
    config.init_from = dst
    inference.save_config(config, str(tmp_path / "work"))
    handed = config.to_dict()
    state = loop.train_and_evaluate(config, str(tmp_path / "work"))
    assert config.to_dict() == handed   # the loop resolves a copy; the caller's config is left as it was
    # Six AdamW steps (lr 3e-4) move each parameter by far less than a different init would.
    final = jax.tree.map(np.asarray, state.params)
    drift = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(saved)))
    assert drift < 1e-2
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    loaded = loop.initial_params(config, mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), saved)
    # A training workdir: its newest EMA params (fine-tuning or continuing another run).
    config.init_from = str(tmp_path / "work")
    from_run = loop.initial_params(config, mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, from_run),
                 jax.tree.map(np.asarray, state.ema_params))
    # Only params and EMA are read: a run whose optimizer state has another structure (its
    # config now scales the head's lr, one more optax transform) still loads.
    saved_config = tmp_path / "work" / "config.json"
    raw = json.loads(saved_config.read_text())
    raw["optimizer"]["head_lr_scale"] = 3.0
    saved_config.write_text(json.dumps(raw))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loop.initial_params(config, mesh)),
                 jax.tree.map(np.asarray, state.ema_params))
    config.model.llm.hidden_size = 64
    with pytest.raises(ValueError, match=r"init_from=.*work: its model .* does not match"):
        loop.initial_params(config, mesh)


def test_init_from_errors_name_the_path(tmp_path, tiny_train_config):
    config = tiny_train_config()
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    # A converter output for a different architecture (the LM alone); a missing or non-orbax
    # init_from: tests/test_bad_input.py.
    dst = str(tmp_path / "lm_only")
    params = jax.tree.map(np.asarray, _init(layers.freeze(config.model), jax.random.key(0)))
    convert_save(dst, {"llm": params["llm"]}, config.model)
    config.init_from = dst
    with pytest.raises(ValueError, match="lm_only.*do not fit.*missing"):
        loop.initial_params(config, mesh)


def test_cli(tmp_path):
    # One device keeps the subprocess's compilation short; the train step is
    # tests/test_kill_resume.py's (tests/tiny.py), compiled once through the session's cache.
    env = tiny.process_env(1)
    workdir = tmp_path / "cli"
    cmd = tiny.main_command(workdir, "--config.train.steps=30", "--config.train.log_every=10",
                            "--config.train.checkpoint_every=30", "--config.eval.num_examples=6",
                            "--config.eval.batch_size=6", "--config.sample.num_iter=4")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(workdir / "checkpoints") == ["30"]
    assert "step 30/30 loss=" in proc.stderr
    # The final evaluation wrote its scores and grids; the config was saved for the CLIs.
    with open(workdir / "eval.json") as f:
        scores = json.load(f)
    assert scores["step"] == 30 and 0.0 <= scores["geneval"]["overall"] <= 1.0
    assert {"caption_exact_match", "qa_accuracy", "reconstruction", "unified_bench"} <= set(scores)
    assert set(scores["unified_bench"]) == {"mar", "latent", "overall"}
    assert set(scores["geneval_diagnosis"]) == {"object_count", "named_shapes"}
    assert all(set(d) == set(scores["geneval"]) for d in scores["geneval_diagnosis"].values())
    assert (workdir / "geneval_grid_30.png").exists() and (workdir / "config.json").exists()

    # The inference CLIs read the run's config.json and newest checkpoint.
    from PIL import Image
    from unimm.data import shapes
    Image.fromarray(shapes.render(shapes.sample_scene(0, 7), 32)).save(tmp_path / "x.png")
    out = tmp_path / "grid.png"
    printed = []
    for args in (["unimm.sample", "--prompt=a red circle", "--num_per_prompt=2", f"--out={out}"],
                 ["unimm.caption", f"--image={tmp_path / 'x.png'}"]):
        proc = subprocess.run([sys.executable, "-m", *args, f"--workdir={workdir}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed.append(proc.stdout)
    tiny_config = config_utils.load_config("configs/harmon.py:tiny")
    n = tiny_config.data.image_size
    assert Image.open(out).size == (2 * n, n)     # one prompt, two samples
    assert "x.png: " in printed[1]
    # The tiny recipe plans: each image's description is printed and kept with the scores.
    assert tiny_config.sample.plan and "a red circle\n  plan 0: " in printed[0] and "  plan 1: " in printed[0]
    assert len(scores["plans"]) == len(scores["prompts"])


def _damaged_copy(workdir, tmp_path, name, damage):
    out = str(tmp_path / name)
    shutil.copytree(workdir, out)
    damage(os.path.join(out, "checkpoints"))
    return out


def _truncate_largest(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


@pytest.mark.parametrize("damage", ["truncated", "missing_state"])
def test_damaged_newest_checkpoint_falls_back(full_run, tmp_path, damage, tiny_train_config):
    """The newest step is damaged: resume from the previous one, set the damaged one aside
    (renamed, not deleted) and end bit-identical to the uninterrupted run."""
    workdir, params = full_run
    hurt = {"truncated": lambda c: _truncate_largest(os.path.join(c, "6")),
            "missing_state": lambda c: shutil.rmtree(os.path.join(c, "6", "state"))}[damage]
    run = _damaged_copy(workdir, tmp_path, damage, hurt)
    state = loop.train_and_evaluate(tiny_train_config(), run)
    assert int(state.step) == STEPS
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), params)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["3", "6", "6.broken"]


def test_all_damaged_or_other_architecture_is_one_error(full_run, tmp_path, tiny_train_config):
    workdir, _ = full_run
    run = _damaged_copy(workdir, tmp_path, "all", lambda c: [shutil.rmtree(os.path.join(c, s, "state"))
                                                              for s in ("3", "6")])
    with pytest.raises(ValueError, match=r"no checkpoint in .* could be restored \(step 6: .*; step 3: "):
        loop.train_and_evaluate(tiny_train_config(), run)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["3", "6"]   # nothing touched
    other = tiny_train_config()
    other.model.diffusion.width = 128
    with pytest.raises(ValueError, match=r"checkpoint step 6 in .* was written by another model \(shape mismatch"):
        loop.train_and_evaluate(other, workdir)
