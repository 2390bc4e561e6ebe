"""Image -> text with a trained model (KV-cache greedy decoding).

    python -m unimm.caption --workdir=DIR --image=x.png [--question="how many circles are there?"]
"""
import sys

from absl import app, flags

from unimm import inference
from unimm.data import images as images_lib
from unimm.data import text

flags.DEFINE_string("workdir", None, "training workdir (checkpoints + config.json)")
flags.DEFINE_string("config", None, "configs/<model>.py:<variant> (default: the run's config.json)")
flags.DEFINE_multi_string("image", None, "image file(s)")
flags.DEFINE_string("question", text.LONG_CAPTION_Q, "the question (default: a detailed caption)")
flags.mark_flags_as_required(["workdir", "image"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        pictures = [images_lib.load_image(p) for p in FLAGS.image]
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    _, model, _ = inference.load_or_exit(FLAGS.workdir, FLAGS.config)
    for path, answer in zip(FLAGS.image, model.answer(pictures, [FLAGS.question] * len(pictures))):
        print(f"{path}: {answer}")


if __name__ == "__main__":
    app.run(main)
