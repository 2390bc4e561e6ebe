"""Image -> text with a trained model (KV-cache greedy decoding).

    python -m unimm.caption --workdir=DIR --image=x.png [--question="how many circles are there?"]

Inputs are checked before the model is loaded: a missing, corrupt, too small or undecodable
image and an empty or non-UTF-8 question are errors; a question too long for the model
(``model.llm.max_position_embeddings`` minus ``sample.max_new_tokens``) is truncated at its
end, with a warning.
"""
from absl import app, flags, logging

from unimm import cli, inference
from unimm.data import images as images_lib
from unimm.data import text

flags.DEFINE_string("workdir", None, "training workdir (checkpoints + config.json)")
flags.DEFINE_string("config", None, "configs/<model>.py:<variant> (default: the run's config.json)")
flags.DEFINE_multi_string("image", None, "image file(s)")
flags.DEFINE_string("question", text.LONG_CAPTION_Q, "the question (default: a detailed caption)")
flags.mark_flags_as_required(["workdir", "image"])
FLAGS = flags.FLAGS


def fit_question(question: str, tok, config) -> str:
    """The question, truncated (with a warning) when the prompt would not fit the model."""
    limit = int(config.model.llm.max_position_embeddings) - int(config.sample.max_new_tokens)
    fitted, n = text.fit_question(tok, question, config.data.num_image_tokens, limit)
    if fitted != question:
        logging.warning("--question: the prompt has %d tokens (with %d image tokens), more than the %d "
                        "that model.llm.max_position_embeddings=%d leaves beside sample.max_new_tokens=%d: "
                        "truncated to %r", n, config.data.num_image_tokens, limit,
                        config.model.llm.max_position_embeddings, config.sample.max_new_tokens,
                        fitted[:60] + ("..." if len(fitted) > 60 else ""))
    return fitted


def main(argv):
    del argv
    with cli.user_errors():
        question = text.check_text(FLAGS.question, "--question")
        pictures = [images_lib.load_image(p) for p in FLAGS.image]
        config = inference.load_config(FLAGS.workdir, FLAGS.config)
        config, tok = inference.prepare(config)
        question = fit_question(question, tok, config)
        model, _ = inference.load_model(config, FLAGS.workdir, tok=tok)
    for path, answer in zip(FLAGS.image, model.answer(pictures, [question] * len(pictures))):
        print(f"{path}: {answer}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
