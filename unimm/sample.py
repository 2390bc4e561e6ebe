"""Text -> image with a trained model: one jitted MAR sampling program per prompt batch.

    python -m unimm.sample --workdir=DIR --prompt="a red circle" --prompt="two blue squares" \
        --out=grid.png [--num_per_prompt=4 --cfg=3.0 --num_iter=16 --temperature=1.0 --seed=0]
        [--final_sampling_steps=5]   # DiSA: diffusion steps annealed down to 5 at the last iteration
    python -m unimm.sample --workdir=DIR --prompt_file=prompts.txt   # UTF-8, one prompt per line
    python -m unimm.sample --workdir=DIR --image=a.png --image=b.jpg  # RecA's image variation

With ``--image`` each image is the prompt: the model redraws it from its own understanding
embeddings (RecA's reconstruction prompt); each grid row is the image, then its redraws.

Prompts are checked before the model is loaded: an empty or non-UTF-8 prompt is an error;
one longer than the LLM's context leaves beside the image tokens (with the chat template)
is truncated at its end, with a warning; shorter ones are never cut (as Harmon's sampler).
"""
import os

from absl import app, flags, logging

from unimm import cli, inference
from unimm.data import images as images_lib
from unimm.data import text

flags.DEFINE_string("workdir", None, "training workdir (checkpoints + config.json)")
flags.DEFINE_string("config", None, "configs/<model>.py:<variant> (default: the run's config.json)")
flags.DEFINE_multi_string("prompt", None, "prompt(s) to draw")
flags.DEFINE_string("prompt_file", None, "UTF-8 text file, one prompt per line (after any --prompt)")
flags.DEFINE_multi_string("image", None, "image(s) to redraw from their own understanding embeddings "
                          "(RecA's image variation; instead of prompts)")
flags.DEFINE_string("out", "samples.png", "output PNG grid (one row per prompt)")
flags.DEFINE_integer("num_per_prompt", 4, "images per prompt")
flags.DEFINE_float("cfg", None, "guidance scale (default: config.sample.cfg)")
flags.DEFINE_integer("num_iter", None, "MAR iterations (default: config.sample.num_iter)")
flags.DEFINE_float("temperature", None, "diffusion temperature (default: config.sample.temperature)")
flags.DEFINE_integer("final_sampling_steps", None, "DiSA: diffusion steps of the last MAR iteration, "
                     "annealed from the first's (default: config.sample.final_sampling_steps; 0 = off)")
flags.DEFINE_boolean("plan", None, "have the LLM describe each prompt's scene first and draw from "
                     "that (default: config.sample.plan); the descriptions are printed")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """The ``--prompt`` values then the ``--prompt_file`` lines, each checked (UTF-8, not empty)."""
    named = [(f"--prompt #{i}", p) for i, p in enumerate(prompts or [], 1)]
    if prompt_file:
        named += [(f"{prompt_file}:{i}", p) for i, p in enumerate(text.read_lines(prompt_file), 1)]
    if not named:
        raise ValueError("no prompt: give --prompt=TEXT (repeatable) or --prompt_file=FILE")
    return [text.check_text(p, what) for what, p in named]


def read_images(paths: list[str]):
    """The ``--image`` files as uint8 RGB arrays (a missing or unreadable file is one error)."""
    return [images_lib.load_image(p) for p in paths]


def warn_long_prompts(prompts: list[str], tok, config) -> None:
    limit = text.sampling_prompt_limit(config)
    for i, p in enumerate(prompts, 1):
        n = text.t2i_length(tok, p)
        if n > limit:
            logging.warning("prompt #%d (%r...) has %d tokens with the chat template, more than the "
                            "%d that model.llm.max_position_embeddings=%d leaves beside %d image tokens: "
                            "truncated, its end is dropped", i, p[:40], n, limit,
                            config.model.llm.max_position_embeddings, config.data.num_image_tokens)


def check_out(path: str) -> None:
    """The output image: a format PIL writes, in an existing writable folder (checked first,
    not after sampling)."""
    from PIL import Image

    Image.init()
    ext = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise ValueError(f"--out={path}: unknown image format {ext or '(no extension)'!r}; "
                         "expected e.g. a .png file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise PermissionError(f"--out={path}: the folder {folder} does not exist or is not writable")


def main(argv):
    del argv
    with cli.user_errors():
        cli.check_positive(num_per_prompt=FLAGS.num_per_prompt, num_iter=FLAGS.num_iter)
        check_out(FLAGS.out)
        if FLAGS.image and (FLAGS.prompt or FLAGS.prompt_file):
            raise ValueError("give prompts (--prompt / --prompt_file) or --image, not both")
        sources = read_images(FLAGS.image) if FLAGS.image else None
        prompts = None if sources else read_prompts(FLAGS.prompt, FLAGS.prompt_file)
        config = inference.load_config(FLAGS.workdir, FLAGS.config)
        inference.apply_sample_overrides(config, {
            name: getattr(FLAGS, name) for name in ("cfg", "num_iter", "temperature", "final_sampling_steps", "plan")})
        config, tok = inference.prepare(config)
        if prompts:
            warn_long_prompts(prompts, tok, config)
        model, step = inference.load_model(config, FLAGS.workdir, tok=tok)

    import jax
    import numpy as np
    from PIL import Image

    from unimm.eval.shapes_bench import image_grid

    k = FLAGS.num_per_prompt
    if sources:
        drawn = model.reconstruct([s for s in sources for _ in range(k)], jax.random.key(FLAGS.seed))
        size = drawn.shape[1]
        shown = [images_lib.square_and_resize(s, size) for s in sources]
        rows = [np.concatenate([shown[i][None], drawn[i * k:(i + 1) * k]]) for i in range(len(sources))]
        grid, cols, what = np.concatenate(rows), k + 1, "redrawn images"
    else:
        grid, drawn_from = model.generate_with_plans([p for p in prompts for _ in range(k)],
                                                     jax.random.key(FLAGS.seed))
        cols, what = k, "images"
        if config.sample.plan:   # what each image was drawn from: the model's own description
            for i, p in enumerate(prompts):
                print(p)
                for j, d in enumerate(drawn_from[i * k:(i + 1) * k]):
                    print(f"  plan {j}: {d}")
    Image.fromarray(image_grid(np.asarray(grid), cols=cols)).save(FLAGS.out)
    print(f"wrote {len(sources or prompts) * k} {what} (checkpoint step {step}) to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
