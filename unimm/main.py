"""Train a unified multimodal model.

    python -m unimm.main --config=configs/harmon.py:tiny --workdir=/tmp/run \
        --config.train.steps=100

Re-running with the same --workdir resumes from its newest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from unimm import cli

config_flags.DEFINE_config_file("config", None, "configs/<model>.py:<variant>", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints and metrics go here")
flags.DEFINE_bool("multiprocess", False, "call jax.distributed.initialize() (multi-host runs)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

# What a user can get wrong (config values, paths, files, checkpoints): one "error:" line.
# UNIMM_TRACEBACK=1 shows the traceback instead.
USER_ERRORS = cli.USER_ERRORS


def check_workdir(workdir: str) -> None:
    """The workdir must be creatable and writable before anything is built."""
    cli.check_writable_dir(workdir, f"--workdir={workdir}")


def run(config, workdir: str) -> None:
    # Heavy imports (jax, TensorFlow via clu) only now: flag mistakes are reported without them.
    import jax

    from unimm import inference

    logging.info("process %d/%d, %d devices, config:\n%s", jax.process_index(),
                 jax.process_count(), jax.device_count(), config)
    cli.validate_config(config)   # enum / consistency mistakes before anything is built
    if not workdir.startswith("gs://"):
        check_workdir(workdir)
    if jax.process_index() == 0:
        inference.save_config(config, workdir)   # for the sample / caption / evaluate CLIs
    if "grpo" in config:
        from unimm.train.grpo_loop import train_grpo
        train_grpo(config, workdir)
    else:
        from unimm.eval.evaluate import make_eval_fn
        from unimm.train.loop import train_and_evaluate
        train_and_evaluate(config, workdir, eval_fn=make_eval_fn(config, workdir))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from unimm import distributed

    with cli.user_errors():
        distributed.initialize(FLAGS.multiprocess)
        run(FLAGS.config, FLAGS.workdir)


# absl's parser, with config-flag mistakes (unknown fields, wrong types) as one line.
parse_flags = cli.parse_flags


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
