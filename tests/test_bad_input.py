"""Bad input: one catalogue of what a user can get wrong, each case its own test.

Every case asserts the error type and that the message is one line naming the field / file /
value and what is expected. Command-line cases (``cli``) are real ``python -m`` runs, started
together by one module fixture (four at a time): a non-zero exit, no traceback, and the last
stderr line is ``error: ...`` (plus, where the input is accepted with a change, the warning).
The other cases (``api``) call the function the tools use, in this process; the exception
must be one the CLIs turn into one ``error:`` line (``unimm.cli.USER_ERRORS``).

Cases (name: input -> outcome)

config and flags
  cli main_unknown_field          --config.train.stepz=1 -> unknown config field ... train.stepz (did you mean steps)
  unit moved_grpo_field           --config.grpo.prompts=geneval -> ... grpo.prompts (now grpo.decoder.prompts)
  cli main_wrong_type             --config.train.steps=many -> invalid literal for int()
  cli main_config_file_missing    --config=configs/nope.py:tiny -> cannot load the config file
  cli main_unknown_variant        --config=configs/harmon.py:huge -> unknown variant huge; choose one of ...
  cli main_rules_not_evaluated    --config.sharding.logical_axis_rules=__import__(...) -> not a pair; nothing runs
  cli main_prediction             --config.model.diffusion.prediction=eps -> expected one of (...)
  api config_override_unknown     apply_override train.stepz=1 -> train.stepz is not a config field
  api config_override_wrong_type  apply_override train.steps=many -> not a valid int for train.steps
  api config_override_no_eval     apply_override rules=__import__(...) -> not a valid tuple; nothing runs
  api config_stage                train.stage=4 -> expected one of [1, 2, 3]
  api config_remat                model.llm.remat=some -> expected one of ('none', 'full', 'dots')
  api config_token_dim            model.mar.token_dim=17 -> but model.vae (patch) produces 24-dim tokens
  api config_mask_ratio           model.mar.mask_ratio_min=1.0 -> must lie in [0, 1)
  api config_mask_ratio_dist      model.mar.mask_ratio_dist=normal -> expected one of ('truncnorm', 'cosine', 'uniform')
  api config_mask_full_prob       model.mar.mask_full_prob=1.5 -> must lie in [0, 1]
  api config_loss_weighting       model.mar.loss_weighting=image -> expected one of ('token', 'example')
  api config_late_loss            model.mar.late_mask_ratio=0 -> ... late_mask_ratio=0.0 in (0, 1]
  api config_code_dim             model.vae.code_dim=0 (tokens of 24) -> model.mar.token_dim=24 but ... 192-dim
  api config_final_steps          sample.final_sampling_steps=30 (25 steps) -> annealing runs down from 25
  api config_max_windows          sample.max_windows=0 -> expected an integer >= 1
  api config_unknown_variant      configs/harmon.py:huge -> unknown variant 'huge'
  api config_file_missing         configs/nope.py -> config file not found
  api config_rules_missing_entry  logical_axis_rules without 'embed' -> no entry for the logical axis 'embed'
mesh and batch
  cli main_batch_not_divisible    data.t2i_batch_size=3 on 8 devices -> not divisible by the data-parallel size 8
  cli main_mesh_vs_devices        sharding.mesh.data=3 -> needs 3 devices, but 8 are available
  api mesh_unknown_axis           mesh {"model": 2} -> unknown mesh axis 'model'; expected one of (...)
  api mesh_two_free_axes          mesh {"data": -1, "fsdp": -1} -> at most one axis may be -1
paths, workdirs, tokenizers
  cli main_workdir_not_writable   --workdir=/proc/... -> is not a writable directory
  cli sample_workdir_missing      --workdir=/nonexistent -> does not exist: expected a training workdir
  cli evaluate_config_json_bad    config.json not JSON -> not a valid JSON config
  cli evaluate_set_not_sample     --set=model.llm.num_layers=1 -> only sample.* fields can change
  api config_json_missing_field   config.json {"model": {}} -> a required config field is missing
  api tokenizer_missing           data.tokenizer=/nonexistent -> tokenizer file not found
  api tokenizer_invalid           tokenizer.json not JSON -> not a valid tokenizer.json
prompts and questions
  cli sample_no_prompt            no --prompt / --prompt_file -> no prompt: give --prompt=TEXT ...
  cli sample_empty_prompt         --prompt="   " -> --prompt #1 is empty
  cli sample_non_utf8_prompt      --prompt=<bytes ff> -> --prompt #1 is not valid UTF-8 (byte 0xff ...)
  cli sample_prompt_file_non_utf8 --prompt_file with a 0xff byte on line 2 -> FILE:2: not valid UTF-8
  cli sample_overlong_prompt      500-word prompt -> warning: more than the context holds: truncated
  cli sample_num_per_prompt       --num_per_prompt=0 -> expected a number > 0
  cli sample_out_format           --out=grid.xyz -> unknown image format '.xyz'
  cli caption_empty_question      --question="" -> --question is empty
  cli caption_overlong_question   1200-word question -> warning: ... max_position_embeddings ...: truncated
  api prompt_file_empty           only blank lines -> no prompts (expected one per line)
images
  cli caption_image_missing       --image=nope.png -> image file not found
  cli caption_image_corrupt       not an image -> cannot decode image ...; expected an image file
  cli caption_image_too_small     5x30 px -> too small: 5x30 px (need at least 8 px per side)
  api image_truncated             a PNG cut in half -> cannot decode image
  api image_float_mode            32-bit float TIFF -> mode F (32-bit samples); expected 8-bit or 16-bit
  api image_too_large             over PIL's pixel limit -> too large to decode safely
  api image_is_directory          a folder -> is not a file; expected an image file
  api image_16bit_scaled          16-bit greyscale PNG -> accepted, scaled to 8 bits (PIL alone clips: white)
  (L, LA, P, RGBA and CMYK images are accepted as RGB: tests/test_data.py::test_load_image_modes)
JSONL data files
  api jsonl_missing               no such file -> JSONL file not found
  api jsonl_malformed_line        line 3 not JSON -> data.jsonl:3: malformed JSON
  api jsonl_non_utf8_line         0xff on line 2 -> data.jsonl:2: not valid UTF-8 (byte 0xff at column ...)
  api jsonl_not_an_object         a JSON list -> expected an object with an 'image' field
  api jsonl_missing_image         {"caption"} -> expected an object with an 'image' field, found ['caption']
  api jsonl_no_text               {"image"} -> needs a string 'caption' or 'prompt', or 'conversations'
  api jsonl_bad_conversations     gpt turn first -> must start with a human turn and a gpt turn
  api jsonl_path_escapes_root     ../outside.png -> escapes the JSONL folder (set data.jsonl_allow_outside_root)
  api jsonl_absolute_path         /etc/passwd -> escapes the JSONL folder
  api jsonl_empty                 blank lines only -> no records
  api jsonl_corrupt_image         a record's image is corrupt -> data.jsonl:1: cannot decode image (via grain)
checkpoints
  cli caption_ckpt_missing_keys   checkpoint params lack proj_out -> written by another model (missing: ...)
  cli evaluate_ckpt_extra_keys    checkpoint params have extra/w -> written by another model (unexpected: ...)
  cli evaluate_decoder_workdir_missing       --decoder_workdir=/nope -> does not exist (named once)
  cli evaluate_decoder_workdir_other_model   --decoder_workdir of another model -> written by another model
  cli convert_not_a_checkpoint    a text file -> cannot be read as a weights-only PyTorch checkpoint
  cli convert_missing_keys        .pth without one key -> does not fit the configured model: missing keys
  cli convert_bad_kind            kind llama -> argument kind: invalid choice
  cli convert_dst_not_writable    DST under /proc -> destination ... is not a writable directory
  api convert_extra_keys          .pth with an extra key -> unexpected keys [...]
  api convert_wrong_shape         .pth with a 5x5 tensor -> shape mismatches [...: checkpoint (5, 5) vs model ...]
  api convert_src_missing         no such .pth -> checkpoint file not found
  api init_from_missing           init_from=/nonexistent -> no params/ directory (expected the output of unimm.convert)
  api init_from_not_orbax         params/ with junk -> cannot read an orbax checkpoint

Tested elsewhere (they need a trained model or real weights): a .pth that would run code
(tests/test_security.py), damaged or other-architecture training checkpoints
(tests/test_loop.py::test_damaged_*, ::test_all_damaged_or_other_architecture_is_one_error),
init_from with another architecture (tests/test_loop.py::test_init_from_errors_name_the_path),
a Harmon .pth for another variant (tests/test_harmon.py::test_wrong_architecture_is_rejected),
image / token shapes given to the VAE (tests/test_vae.py::test_shape_errors_are_clear), an
understanding example longer than data.max_i2t_len and an overlong training prompt
(tests/test_data.py::test_i2t_example_alignment, ::test_t2i_example), a batch not divisible by
the process count (tests/test_data.py::test_process_sharding).
"""
import concurrent.futures
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import tiny   # tests/tiny.py
from unimm import checkpoint, cli, config_utils, inference, sharding
from unimm.convert import common
from unimm.data import images, pipeline, text
from unimm.data.tokenizer import HFTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = ["unimm.main", "--config=configs/harmon.py:tiny", "--workdir={tmp}/main_{name}", "--config.train.steps=1",
        "--config.train.eval_every=0"]
TINY = "--config=configs/harmon.py:tiny"

# name: (argv after `python -m` ({tmp} = the fixture's folder, {name} = the case), text the last
# stderr line contains after "error: ", text a warning line contains or None)
CLI = {
    "main_unknown_field": (MAIN + ["--config.train.stepz=1"],
                           'unknown config field in the --config.* overrides: train.stepz Did you mean "steps"', None),
    "main_wrong_type": (MAIN + ["--config.train.steps=many"],
                        "flag --config.train.steps=many: invalid literal for int() with base 10: many", None),
    "main_config_file_missing": (["unimm.main", "--config=configs/nope.py:tiny", "--workdir={tmp}/main_cfg"],
                                 "--config: cannot load the config file ([Errno 2] No such file or directory: "
                                 "'configs/nope.py')", None),
    "main_unknown_variant": (["unimm.main", "--config=configs/harmon.py:huge", "--workdir={tmp}/main_var"],
                             "flag --config=configs/harmon.py:huge: ValueError: configs/harmon.py: unknown variant "
                             "huge; choose one of (tiny, small, 0.5b, 1.5b)", None),
    "main_rules_not_evaluated": (MAIN + ["--config.sharding.logical_axis_rules=__import__('os').system('touch "
                                         "{tmp}/pwned')"],
                                 "sharding.logical_axis_rules: entry \"__import__('os').system('touch", None),
    "main_prediction": (MAIN + ["--config.model.diffusion.prediction=eps"],
                        "model.diffusion.prediction='eps'; expected one of ('epsilon', 'v', 'x0')", None),
    "main_batch_not_divisible": (MAIN + ["--config.data.t2i_batch_size=3"],
                                 "data.t2i_batch_size=3 is not divisible by the data-parallel size 8", None),
    "main_mesh_vs_devices": (MAIN + ["--config.sharding.mesh.data=3"],
                             "sharding.mesh: shape {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices, but 8 are "
                             "available", None),
    "main_workdir_not_writable": (MAIN + ["--workdir=/proc/unimm_run"],
                                  "--workdir=/proc/unimm_run is not a writable directory", None),
    "sample_workdir_missing": (["unimm.sample", "--workdir=/nonexistent/run", "--prompt=a red circle"],
                               "--workdir=/nonexistent/run does not exist: expected a training workdir", None),
    "sample_no_prompt": (["unimm.sample", "--workdir={tmp}/wd_config"],
                         "no prompt: give --prompt=TEXT (repeatable) or --prompt_file=FILE", None),
    "sample_empty_prompt": (["unimm.sample", "--workdir={tmp}/wd_config", "--prompt=a red circle", "--prompt=   "],
                            "--prompt #2 is empty; expected some text", None),
    "sample_non_utf8_prompt": (["unimm.sample", "--workdir={tmp}/wd_config", b"--prompt=a red \xff circle"],
                               "--prompt #1 is not valid UTF-8 (byte 0xff at position 6); expected UTF-8 text", None),
    "sample_prompt_file_non_utf8": (["unimm.sample", "--workdir={tmp}/wd_config", "--prompt_file={tmp}/prompts.txt"],
                                    "{tmp}/prompts.txt:2: not valid UTF-8 (byte 0xff at column 6); expected UTF-8 text",
                                    None),
    "sample_overlong_prompt": (["unimm.sample", "--workdir={tmp}/wd_config", "--prompt=" + "red circle " * 250],
                               "no checkpoints in --workdir={tmp}/wd_config",
                               "more than the 499 that model.llm.max_position_embeddings=512 leaves beside 13 "
                               "image tokens: truncated, its end is dropped"),
    "sample_num_per_prompt": (["unimm.sample", "--workdir={tmp}/wd_config", "--prompt=x", "--num_per_prompt=0"],
                              "--num_per_prompt=0: expected a number > 0", None),
    "sample_out_format": (["unimm.sample", "--workdir={tmp}/wd_config", "--prompt=x", "--out={tmp}/grid.xyz"],
                          "--out={tmp}/grid.xyz: unknown image format '.xyz'; expected e.g. a .png file", None),
    "caption_empty_question": (["unimm.caption", "--workdir={tmp}/wd_config", "--image={tmp}/ok.png", "--question="],
                               "--question is empty; expected some text", None),
    "caption_overlong_question": (["unimm.caption", "--workdir={tmp}/wd_config", "--image={tmp}/ok.png",
                                   "--question=" + "how many circles " * 400],
                                  "no checkpoints in --workdir={tmp}/wd_config",
                                  "model.llm.max_position_embeddings=512 leaves beside sample.max_new_tokens=64: "
                                  "truncated"),
    "caption_image_missing": (["unimm.caption", "--workdir={tmp}/wd_config", "--image={tmp}/nope.png"],
                              "image file not found: {tmp}/nope.png", None),
    "caption_image_corrupt": (["unimm.caption", "--workdir={tmp}/wd_config", "--image={tmp}/ok.png",
                               "--image={tmp}/corrupt.png"],
                              "cannot decode image {tmp}/corrupt.png: cannot identify image file", None),
    "caption_image_too_small": (["unimm.caption", "--workdir={tmp}/wd_config", "--image={tmp}/small.png"],
                                "image {tmp}/small.png is too small: 5x30 px (need at least 8 px per side)", None),
    "caption_ckpt_missing_keys": (["unimm.caption", "--workdir={tmp}/wd_missing", "--image={tmp}/ok.png"],
                                  "checkpoint step 1 in {tmp}/wd_missing/checkpoints was written by another model "
                                  "(missing: ['proj_out/fc1/bias'", None),
    "evaluate_ckpt_extra_keys": (["unimm.evaluate", "--workdir={tmp}/wd_extra"],
                                 "checkpoint step 1 in {tmp}/wd_extra/checkpoints was written by another model "
                                 "(unexpected: ['extra/w']); pass the --config that wrote it", None),
    "evaluate_decoder_workdir_missing": (["unimm.evaluate", "--workdir={tmp}/wd_config",
                                          "--decoder_workdir={tmp}/nope"],
                                         "error: --decoder_workdir={tmp}/nope does not exist", None),
    "evaluate_decoder_workdir_other_model": (["unimm.evaluate", "--workdir={tmp}/wd_config",
                                              "--decoder_workdir={tmp}/wd_extra"],
                                             "--decoder_workdir: checkpoint step 1 in {tmp}/wd_extra/checkpoints "
                                             "was written by another model (unexpected: ['extra/w'])", None),
    "evaluate_set_not_sample": (["unimm.evaluate", "--workdir={tmp}/wd_config", "--set=model.llm.num_layers=1"],
                                "--set=model.llm.num_layers=1: only sample.* fields (how images and captions "
                                "are drawn) can change", None),
    "evaluate_config_json_bad": (["unimm.evaluate", "--workdir={tmp}/wd_badjson"],
                                 "{tmp}/wd_badjson/config.json: not a valid JSON config (Expecting property name",
                                 None),
    "convert_not_a_checkpoint": (["unimm.convert", "harmon", "{tmp}/notes.pth", "{tmp}/conv_{name}", TINY],
                                 "{tmp}/notes.pth: cannot be read as a weights-only PyTorch checkpoint", None),
    "convert_missing_keys": (["unimm.convert", "harmon", "{tmp}/missing.pth", "{tmp}/conv_{name}", TINY],
                             "{tmp}/missing.pth does not fit the configured model: missing keys "
                             "['mar.decoder_blocks.0.attn.proj.weight']", None),
    "convert_bad_kind": (["unimm.convert", "llama", "{tmp}/missing.pth", "{tmp}/conv_{name}"],
                         "argument kind: invalid choice: 'llama' (choose from", None),
    "convert_dst_not_writable": (["unimm.convert", "harmon", "{tmp}/missing.pth", "/proc/unimm_out", TINY],
                                 "destination /proc/unimm_out is not a writable directory", None),
}

DROPPED_KEY = "mar.decoder_blocks.0.attn.proj.weight"
TMP = {}   # {tmp}: set by the `files` fixture


def _fill(arg: str, name: str) -> str:
    return arg.replace("{tmp}", TMP["tmp"]).replace("{name}", name)


def _tiny():
    return config_utils.load_config("configs/harmon.py:tiny")


def _write_fake_checkpoint(workdir, params):
    """A training checkpoint (step 1) whose params are ``params``: as cheap as it gets."""
    import orbax.checkpoint as ocp

    manager = checkpoint.make_manager(workdir, keep=1)
    manager.save(1, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave({"step": np.int32(1), "params": params, "opt_state": {"count": np.int32(0)},
                                     "ema_params": {"x": np.zeros(1, np.float32)}}),
        data=ocp.args.JsonSave({})))
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad (and a few good) input files every case reads."""
    tmp = tmp_path_factory.mktemp("bad_input")
    f = {"tmp": str(tmp)}
    TMP["tmp"] = str(tmp)
    Image.new("RGB", (24, 24), "red").save(tmp / "ok.png")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (5, 30)).save(tmp / "small.png")
    png = (tmp / "ok.png").read_bytes()
    (tmp / "truncated.png").write_bytes(png[:len(png) // 2])
    Image.fromarray(np.full((12, 12), 0.5, np.float32)).save(tmp / "float.tiff")
    Image.fromarray((np.arange(144).reshape(12, 12) * 455).astype(np.uint16)).save(tmp / "gray16.png")
    (tmp / "prompts.txt").write_bytes(b"a red circle\nblue \xff square\n")
    (tmp / "notes.pth").write_text("these are my notes, not a checkpoint\n")

    config = _tiny()
    for name in ("wd_config", "wd_missing", "wd_extra", "wd_badjson"):
        inference.save_config(config, str(tmp / name))
    (tmp / "wd_badjson" / "config.json").write_text("{not json")
    from unimm.models import harmon
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), harmon.abstract_params(config.model))
    _write_fake_checkpoint(str(tmp / "wd_missing"), {k: v for k, v in params.items() if k != "proj_out"})
    _write_fake_checkpoint(str(tmp / "wd_extra"), {**params, "extra": {"w": np.zeros(3, np.float32)}})

    from unimm.convert.harmon_pth import expected_shapes
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes(config.model).items()}
    f["state"] = state
    missing = dict(state)
    del missing[DROPPED_KEY]
    common.save_torch_file(missing, str(tmp / "missing.pth"))
    return f


@pytest.fixture(scope="module")
def cli_results(files):
    """Every command-line case, four processes at a time (each imports jax; some TensorFlow or torch)."""
    env = tiny.process_env(8)

    def run(name):
        args = [_fill(a, name) if isinstance(a, str) else a for a in CLI[name][0]]
        p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, timeout=300)
        return name, (p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))

    # The slowest first (they import TensorFlow or torch), so the pool ends together.
    order = sorted(CLI, key=lambda n: not n.startswith(("main_batch", "main_mesh", "main_workdir", "evaluate",
                                                        "caption_ckpt", "caption_over", "sample_over", "convert")))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, order))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CLI))
def test_cli(cli_results, files, name):
    code, out, err = cli_results[name]
    _, want, warning = CLI[name]
    want = _fill(want, name)
    assert code != 0, (out, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and want in last, f"{last!r}\nwanted {want!r}"
    if warning:
        assert any(warning in line for line in err.splitlines()), err[-3000:]
    if name == "main_rules_not_evaluated":
        assert not os.path.exists(os.path.join(files["tmp"], "pwned"))


# ----------------------------------------------------------------------------- in-process cases

def _override(item):
    return lambda f: config_utils.apply_override(_tiny(), item)


def _validate(item):
    def run(f):
        config = _tiny()
        config_utils.apply_override(config, item)
        cli.validate_config(config)
    return run


def _no_eval(f):
    marker = os.path.join(f["tmp"], "pwned_override")
    try:
        config_utils.apply_override(_tiny(), f"sharding.logical_axis_rules=__import__('os').system('touch {marker}')")
    finally:
        assert not os.path.exists(marker)


def _rules_missing_entry(f):
    from unimm.models import harmon
    config = _tiny()
    rules = [r for r in config.sharding.logical_axis_rules if r[0] != "embed"]
    sharding.param_shardings(harmon.abstract_params(config.model), harmon.logical_specs(config.model),
                             sharding.make_mesh({"data": 8}), rules)


def _config_json_missing_field(f):
    wd = os.path.join(f["tmp"], "wd_nofield")
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "config.json"), "w") as fh:
        json.dump({"model": {}}, fh)
    inference.load_config(wd)


def _tokenizer_invalid(f):
    path = os.path.join(f["tmp"], "tok", "tokenizer.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("{not json")
    HFTokenizer(os.path.dirname(path))


def _blank_prompt_file(f):
    path = os.path.join(f["tmp"], "blank.txt")
    with open(path, "w") as fh:
        fh.write("\n  \n")
    text.read_lines(path)


def _too_large(f):
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100   # ok.png has 576 pixels: over twice the limit, PIL refuses it
    try:
        images.load_image(os.path.join(f["tmp"], "ok.png"))
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _gray16(f):
    img = images.load_image(os.path.join(f["tmp"], "gray16.png"))
    raw = np.asarray(Image.open(os.path.join(f["tmp"], "gray16.png"))).astype(np.int64)
    assert img.shape == (12, 12, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[..., 0], (raw * 255 + 32767) // 65535)   # scaled, not clipped
    assert img.min() == 0 and 100 < img.max() < 255


def _jsonl(lines, name="data.jsonl"):
    """Writes ``lines`` (dicts -> JSON, str / bytes as they are) to a fresh folder and reads it."""
    def run(f):
        folder = os.path.join(f["tmp"], f"jsonl_{abs(hash(str(lines)))}")
        os.makedirs(folder, exist_ok=True)
        Image.new("RGB", (16, 16)).save(os.path.join(folder, "ok.png"))
        raw = b"".join((x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode())
                       + b"\n" for x in lines)
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(raw)
        return pipeline.read_jsonl(os.path.join(folder, name))
    return run


def _jsonl_corrupt_image(f):
    path = os.path.join(f["tmp"], "jsonl_corrupt", "data.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.path.join(os.path.dirname(path), "corrupt.png"), "wb") as fh:
        fh.write(b"\x89PNG garbage")
    with open(path, "w") as fh:
        fh.write(json.dumps({"image": "corrupt.png", "caption": "x"}) + "\n")
    config = _tiny()
    config.data.update(dict(source="jsonl", jsonl_path=path, i2t_batch_size=1, t2i_batch_size=0, plan_batch_size=0))
    next(pipeline.make_train_iterator(config, text.shapes_tokenizer()))


def _convert(change):
    def run(f):
        from unimm.convert.harmon_pth import harmon_from_torch
        state = dict(f["state"])
        if change == "extra":
            state["mar.encoder_blocks.7.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
        else:
            state[DROPPED_KEY] = np.zeros((5, 5), np.float32)
        harmon_from_torch(state, _tiny().model, source="h.pth")
    return run


def _init_from(where):
    def run(f):
        path = os.path.join(f["tmp"], where)
        if where == "junk":
            os.makedirs(os.path.join(path, "params"), exist_ok=True)
            with open(os.path.join(path, "params", "file"), "w") as fh:
                fh.write("junk")
        checkpoint.load_params(path, {"w": np.zeros(2, np.float32)})
    return run


OK_PNG = {"image": "ok.png", "caption": "a red square"}

# name: (function of the `files` fixture's dict, exception type, regex the one-line message matches;
# exception type None: the input is accepted and the function asserts how)
API = {
    "config_override_unknown": (_override("train.stepz=1"), ValueError,
                                r"override 'train.stepz=1': train.stepz is not a config field"),
    "config_override_wrong_type": (_override("train.steps=many"), ValueError,
                                   r"'many' is not a valid int for train.steps"),
    "config_override_no_eval": (_no_eval, ValueError, r"is not a valid tuple for sharding.logical_axis_rules"),
    "config_stage": (_validate("train.stage=4"), ValueError, r"train.stage=4: expected one of \[1, 2, 3\]"),
    "config_remat": (_validate("model.llm.remat=some"), ValueError,
                     r"model.llm.remat='some'; expected one of \('none', 'full', 'dots'\)"),
    "config_token_dim": (_validate("model.mar.token_dim=17"), ValueError,
                         r"model.mar.token_dim=17 but model.vae \(patch\) produces 24-dim tokens"),
    "config_mask_ratio": (_validate("model.mar.mask_ratio_min=1.0"), ValueError,
                          r"model.mar.mask_ratio_min=1.0 must lie in \[0, 1\) and "
                          r"model.mar.mask_ratio_std=0.25 be > 0"),
    "config_final_steps": (_validate("sample.final_sampling_steps=30"), ValueError,
                           r"sample.final_sampling_steps=30: diffusion step annealing runs from the first "
                           r"iteration's plain step count \('25'\) down to at least 2"),
    "config_max_windows": (_validate("sample.max_windows=0"), ValueError,
                           r"sample.max_windows=0: expected an integer >= 1"),
    "config_mask_ratio_dist": (_validate("model.mar.mask_ratio_dist=normal"), ValueError,
                               r"model.mar.mask_ratio_dist='normal': expected one of \('truncnorm', 'cosine', "
                               r"'uniform'\)"),
    "config_mask_full_prob": (_validate("model.mar.mask_full_prob=1.5"), ValueError,
                              r"model.mar.mask_full_prob=1.5 must lie in \[0, 1\]"),
    "config_loss_weighting": (_validate("model.mar.loss_weighting=image"), ValueError,
                              r"model.mar.loss_weighting='image': expected one of \('token', 'example'\)"),
    "config_late_loss": (_validate("model.mar.late_mask_ratio=0"), ValueError,
                         r"model.mar.late_mask_ratio=0.0 in \(0, 1\]"),
    "config_code_dim": (_validate("model.vae.code_dim=0"), ValueError,
                        r"model.mar.token_dim=24 but model.vae \(patch\) produces 192-dim tokens"),
    "config_unknown_variant": (lambda f: config_utils.load_config("configs/harmon.py:huge"), ValueError,
                               r"configs/harmon.py: unknown variant 'huge'; choose one of"),
    "config_file_missing": (lambda f: config_utils.load_config("configs/nope.py:tiny"), FileNotFoundError,
                            r"config file not found: configs/nope.py"),
    "config_rules_missing_entry": (_rules_missing_entry, ValueError,
                                   r"sharding.logical_axis_rules: no entry for the logical axis 'embed'"),
    "mesh_unknown_axis": (lambda f: sharding.make_mesh({"model": 2}), ValueError,
                          r"sharding.mesh: unknown mesh axis 'model'; expected one of \('data', 'fsdp', 'tensor'\)"),
    "mesh_two_free_axes": (lambda f: sharding.make_mesh({"data": -1, "fsdp": -1}), ValueError,
                           r"sharding.mesh: at most one axis may be -1"),
    "config_json_missing_field": (_config_json_missing_field, ValueError,
                                  r"wd_nofield/config.json: a required config field is missing \(sharding\)"),
    "tokenizer_missing": (lambda f: HFTokenizer("/nonexistent/tokenizer.json"), FileNotFoundError,
                          r"tokenizer file not found: /nonexistent/tokenizer.json"),
    "tokenizer_invalid": (_tokenizer_invalid, ValueError, r"tok/tokenizer.json: not a valid tokenizer.json"),
    "prompt_file_empty": (_blank_prompt_file, ValueError, r"blank.txt: no prompts \(expected one per line\)"),
    "image_truncated": (lambda f: images.load_image(os.path.join(f["tmp"], "truncated.png")), ValueError,
                        r"cannot decode image .*truncated.png: .*truncated"),
    "image_float_mode": (lambda f: images.load_image(os.path.join(f["tmp"], "float.tiff")), ValueError,
                         r"image .*float.tiff has mode F \(32-bit samples\); expected an 8-bit or 16-bit image"),
    "image_too_large": (_too_large, ValueError,
                        r"image .*ok.png is too large to decode safely: .*576 pixels.*; expected at most 200 pixels"),
    "image_is_directory": (lambda f: images.load_image(f["tmp"]), ValueError,
                           r"image path .* is not a file; expected an image file"),
    "image_16bit_scaled": (_gray16, None, None),
    "jsonl_missing": (lambda f: pipeline.read_jsonl("/nonexistent/data.jsonl"), FileNotFoundError,
                      r"JSONL file not found: /nonexistent/data.jsonl"),
    "jsonl_malformed_line": (_jsonl([OK_PNG, OK_PNG, "{not json"]), ValueError,
                             r"data.jsonl:3: malformed JSON \(.*\); expected one JSON object per line"),
    "jsonl_non_utf8_line": (_jsonl([OK_PNG, b'{"image": "ok.png", "caption": "caf\xe9"}']), ValueError,
                            r"data.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 36\); expected UTF-8"),
    "jsonl_not_an_object": (_jsonl([["ok.png", "x"]]), ValueError,
                            r"data.jsonl:1: expected an object with an 'image' field, found list"),
    "jsonl_missing_image": (_jsonl([{"caption": "x"}]), ValueError,
                            r"data.jsonl:1: expected an object with an 'image' field, found \['caption'\]"),
    "jsonl_no_text": (_jsonl([{"image": "ok.png"}]), ValueError,
                      r"data.jsonl:1: needs a string 'caption' or 'prompt', or 'conversations' \(found the "
                      r"fields \['image'\]\)"),
    "jsonl_bad_conversations": (_jsonl([{"image": "ok.png", "conversations": [{"from": "gpt", "value": "x"},
                                                                              {"from": "human", "value": "y"}]}]),
                                ValueError, r"data.jsonl:1: 'conversations' must start with a human turn"),
    "jsonl_path_escapes_root": (_jsonl([OK_PNG, {"image": "../outside.png", "caption": "x"}]), ValueError,
                                r"data.jsonl:2: image path '../outside.png' escapes the JSONL folder .* \(set "
                                r"data.jsonl_allow_outside_root to allow it\)"),
    "jsonl_absolute_path": (_jsonl([{"image": "/etc/passwd", "caption": "x"}]), ValueError,
                            r"data.jsonl:1: image path '/etc/passwd' escapes the JSONL folder"),
    "jsonl_empty": (_jsonl(["", "   "]), ValueError, r"data.jsonl: no records"),
    "jsonl_corrupt_image": (_jsonl_corrupt_image, ValueError,
                            r"jsonl_corrupt/data.jsonl:1: cannot decode image .*corrupt.png"),
    "convert_extra_keys": (_convert("extra"), common.CheckpointMismatchError,
                           r"h.pth does not fit the configured model: unexpected keys "
                           r"\['mar.encoder_blocks.7.attn.qkv.weight'\]"),
    "convert_wrong_shape": (_convert("shape"), common.CheckpointMismatchError,
                            r"shape mismatches \[mar.decoder_blocks.0.attn.proj.weight: checkpoint \(5, 5\) vs "
                            r"model \(\d+, \d+\)\]"),
    "convert_src_missing": (lambda f: common.load_torch_file("/nonexistent/h.pth"), FileNotFoundError,
                            r"checkpoint file not found: /nonexistent/h.pth"),
    "init_from_missing": (_init_from("nothing_here"), FileNotFoundError,
                          r"init_from='.*nothing_here': no params/ directory at .* \(expected the output "
                          r"directory of `python -m unimm.convert`\)"),
    "init_from_not_orbax": (_init_from("junk"), ValueError,
                            r"init_from='.*junk': cannot read an orbax checkpoint at .*junk/params"),
}


@pytest.mark.parametrize("name", sorted(API))
def test_api(files, name):
    fn, error, pattern = API[name]
    if error is None:
        fn(files)
        return
    with pytest.raises(error) as info:
        fn(files)
    message = str(info.value)
    assert isinstance(info.value, cli.USER_ERRORS)   # the CLIs print these as one `error:` line
    assert "\n" not in message and re.search(pattern, message), message


def test_catalogue_is_documented():
    """The docstring lists every case (and the count the issue asks for is met)."""
    listed = re.findall(r"^  (?:cli|api) (\w+)", __doc__, re.M)
    assert sorted(listed) == sorted(set(listed))
    assert set(CLI) | set(API) <= set(listed) and len(CLI) + len(API) >= 32


def test_jsonl_outside_root_when_allowed(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "/etc/passwd", "caption": "x"}) + "\n")
    assert pipeline.read_jsonl(str(path), allow_outside_root=True)[0]["image"] == "/etc/passwd"



def test_moved_grpo_field_names_its_new_place():
    """config_flags names only the unknown field; the error names the override's path, and
    where a GRPO field of the layout before the policy groups lives now."""
    from unimm import cli
    argv = ["unimm.main", "--config=configs/grpo.py:tiny", "--config.grpo.prompts=geneval"]
    assert cli._flag_error_message(KeyError("prompts"), argv) == (
        "unknown config field in the --config.* overrides: grpo.prompts (now grpo.decoder.prompts)")
