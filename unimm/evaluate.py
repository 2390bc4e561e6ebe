"""Score a trained model on the held-out shapes benchmark; prints and writes DIR/eval.json.

    python -m unimm.evaluate --workdir=DIR [--num_examples=60] [--decoder_workdir=DIR2]
        [--split=validation] [--set=sample.num_iter=9 ...]

``--decoder_workdir`` generates (and reconstructs) with another run's params while DIR's
params caption and answer: UAE's separate captioner and decoder (GRPO's ``grpo.captioner.decoder_from``).

Choose sampling settings on ``--split=validation`` (items of their own, from
``data.val_offset``, and their own sampling seed; written as ``validation_eval.json``), then
score the held-out test items (``data.eval_offset``) once with the chosen ``--set`` values.
"""
import json

from absl import app, flags

from unimm import cli, inference
from unimm.eval import splits

flags.DEFINE_string("workdir", None, "training workdir (checkpoints + config.json)")
flags.DEFINE_string("config", None, "configs/<model>.py:<variant> (default: the run's config.json)")
flags.DEFINE_integer("num_examples", None, "held-out items per task (default: config.eval.num_examples)")
flags.DEFINE_string("decoder_workdir", None, "generate images with this run's params instead "
                    "(a separate decoder, as grpo.captioner.decoder_from); same model architecture")
flags.DEFINE_enum("split", "test", list(splits.SPLITS), "test: the held-out items (data.eval_offset), "
                  "sampling seed 0; validation: items of their own (data.val_offset), sampling seed 1, "
                  "for choosing sampling settings")
flags.DEFINE_multi_string("set", [], "sample.FIELD=VALUE: a sampling setting for this evaluation "
                          "(repeatable), e.g. --set=sample.num_iter=9 --set=sample.cfg=3.0")
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
        seed, prefix = splits.select(config, FLAGS.split, FLAGS.set)
        model, step = inference.load_model(config, FLAGS.workdir)
        if FLAGS.decoder_workdir:
            model.decoder_params = inference.load_model(decoder_config, FLAGS.decoder_workdir, tok=model.tok)[0].params
        from unimm.eval import evaluate, shapes_bench   # heavy: only once the inputs are checked
        metrics, samples = shapes_bench.evaluate(model, FLAGS.num_examples or config.eval.num_examples,
                                                 config.eval.batch_size, seed=seed)
    settings = {"split": FLAGS.split, "sample": {k: v for k, v in config.sample.items()
                                                 if k in splits.SAMPLING_FIELDS}}
    path = evaluate.write_results(FLAGS.workdir, step, metrics, samples, prefix=prefix, settings=settings)
    print(json.dumps({"step": step, **settings, **metrics}, indent=2))
    print(f"{evaluate.summary_line(metrics)}\nwrote {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
