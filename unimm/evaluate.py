"""Score a trained model on the held-out shapes benchmark; prints and writes DIR/eval.json.

    python -m unimm.evaluate --workdir=DIR [--num_examples=60] [--decoder_workdir=DIR2]

``--decoder_workdir`` generates (and reconstructs) with another run's params while DIR's
params caption and answer: UAE's separate captioner and decoder (GRPO's ``grpo.decoder_from``).
"""
import json

from absl import app, flags

from unimm import cli, inference

flags.DEFINE_string("workdir", None, "training workdir (checkpoints + config.json)")
flags.DEFINE_string("config", None, "configs/<model>.py:<variant> (default: the run's config.json)")
flags.DEFINE_integer("num_examples", None, "held-out items per task (default: config.eval.num_examples)")
flags.DEFINE_string("decoder_workdir", None, "generate images with this run's params instead "
                    "(a separate decoder, as grpo.decoder_from); same model architecture")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    with cli.user_errors():
        cli.check_positive(num_examples=FLAGS.num_examples)
        config = inference.load_config(FLAGS.workdir, FLAGS.config)
        if config.data.source != "shapes":
            raise ValueError(f"the shapes benchmark needs data.source='shapes'; this run's data.source "
                             f"is {config.data.source!r}")
        if FLAGS.decoder_workdir:   # checked before any model is built: it exists and fits this model
            decoder_config = inference.load_config(FLAGS.decoder_workdir, flag="--decoder_workdir")
            try:
                inference.latest_step(config, FLAGS.decoder_workdir, flag="--decoder_workdir")
            except ValueError as e:   # params of another model: the message names the directory only
                raise ValueError(f"--decoder_workdir: {e}") from None
        model, step = inference.load_model(config, FLAGS.workdir)
        if FLAGS.decoder_workdir:
            model.decoder_params = inference.load_model(decoder_config, FLAGS.decoder_workdir, tok=model.tok)[0].params
        from unimm.eval import evaluate, shapes_bench   # heavy: only once the inputs are checked
        metrics, samples = shapes_bench.evaluate(model, FLAGS.num_examples or config.eval.num_examples,
                                                 config.eval.batch_size)
    path = evaluate.write_results(FLAGS.workdir, step, metrics, samples)
    print(json.dumps({"step": step, **metrics}, indent=2))
    print(f"{evaluate.summary_line(metrics)}\nwrote {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
