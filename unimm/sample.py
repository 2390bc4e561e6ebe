"""Text -> image with a trained model: one jitted MAR sampling program per prompt batch.

    python -m unimm.sample --workdir=DIR --prompt="a red circle" --prompt="two blue squares" \
        --out=grid.png [--num_per_prompt=4 --cfg=3.0 --num_iter=16 --temperature=1.0 --seed=0]
"""
import jax
import numpy as np
from absl import app, flags
from PIL import Image

from unimm import inference
from unimm.eval.shapes_bench import image_grid

flags.DEFINE_string("workdir", None, "training workdir (checkpoints + config.json)")
flags.DEFINE_string("config", None, "configs/<model>.py:<variant> (default: the run's config.json)")
flags.DEFINE_multi_string("prompt", None, "prompt(s) to draw")
flags.DEFINE_string("out", "samples.png", "output PNG grid (one row per prompt)")
flags.DEFINE_integer("num_per_prompt", 4, "images per prompt")
flags.DEFINE_float("cfg", None, "guidance scale (default: config.sample.cfg)")
flags.DEFINE_integer("num_iter", None, "MAR iterations (default: config.sample.num_iter)")
flags.DEFINE_float("temperature", None, "diffusion temperature (default: config.sample.temperature)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.mark_flags_as_required(["workdir", "prompt"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    _, model, step = inference.load_or_exit(FLAGS.workdir, FLAGS.config, {
        name: getattr(FLAGS, name) for name in ("cfg", "num_iter", "temperature")})
    prompts = [p for p in FLAGS.prompt for _ in range(FLAGS.num_per_prompt)]
    images = model.generate(prompts, jax.random.key(FLAGS.seed))
    Image.fromarray(image_grid(np.asarray(images), cols=FLAGS.num_per_prompt)).save(FLAGS.out)
    print(f"wrote {len(images)} images (checkpoint step {step}) to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
