"""Score a trained model on the held-out shapes benchmark; prints and writes DIR/eval.json.

    python -m unimm.evaluate --workdir=DIR [--num_examples=60]
"""
import json
import sys

from absl import app, flags

from unimm import inference
from unimm.eval import evaluate, shapes_bench

flags.DEFINE_string("workdir", None, "training workdir (checkpoints + config.json)")
flags.DEFINE_string("config", None, "configs/<model>.py:<variant> (default: the run's config.json)")
flags.DEFINE_integer("num_examples", None, "held-out items per task (default: config.eval.num_examples)")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config, model, step = inference.load_or_exit(FLAGS.workdir, FLAGS.config)
    try:
        metrics, samples = shapes_bench.evaluate(model, FLAGS.num_examples or config.eval.num_examples,
                                                 config.eval.batch_size)
    except ValueError as e:
        sys.exit(f"error: {e}")
    path = evaluate.write_results(FLAGS.workdir, step, metrics, samples)
    print(json.dumps({"step": step, **metrics}, indent=2))
    print(f"{evaluate.summary_line(metrics)}\nwrote {path}")


if __name__ == "__main__":
    app.run(main)
