"""Train a unified multimodal model.

    python -m unimm.main --config=configs/harmon.py:tiny --workdir=/tmp/run \
        --config.train.steps=100

Re-running with the same --workdir resumes from its newest checkpoint.
"""
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from unimm import distributed, inference
from unimm.eval.evaluate import make_eval_fn
from unimm.train.grpo_loop import train_grpo
from unimm.train.loop import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "configs/<model>.py:<variant>", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints and metrics go here")
flags.DEFINE_bool("multiprocess", False, "call jax.distributed.initialize() (multi-host runs)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize(FLAGS.multiprocess)
    config = FLAGS.config
    logging.info("process %d/%d, %d devices, config:\n%s", jax.process_index(),
                 jax.process_count(), jax.device_count(), config)
    if jax.process_index() == 0:
        inference.save_config(config, FLAGS.workdir)   # for the sample / caption / evaluate CLIs
    if "grpo" in config:
        train_grpo(config, FLAGS.workdir)
    else:
        train_and_evaluate(config, FLAGS.workdir, eval_fn=make_eval_fn(config, FLAGS.workdir))


if __name__ == "__main__":
    app.run(main)
