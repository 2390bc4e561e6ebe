"""Data path: images, sequence assembly, shapes vocabulary, grain pipelines, sources."""
import collections
import json
import logging

import jax
import numpy as np
import pytest
from PIL import Image

from unimm import sharding
from unimm.config_utils import load_config
from unimm.data import images, pipeline, shapes, text
from unimm.data.tokenizer import chat_prompt


@pytest.fixture(scope="module")
def tok():
    return text.shapes_tokenizer()


def tiny_config(**data):
    c = load_config("configs/harmon.py:tiny")
    c.data.t2i_batch_size = 8          # the shapes below assume 8 + 8 examples per step
    c.data.plan_batch_size = 0         # understanding and generation only (planning: its own test)
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "RGB"])
def test_load_image_modes(tmp_path, mode):
    path = str(tmp_path / f"x_{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    Image.new(mode, (12, 10)).save(path)
    img = images.load_image(path)
    assert img.shape == (10, 12, 3) and img.dtype == np.uint8


def test_square_and_resize():
    img = np.full((10, 20, 3), 255, np.uint8)   # wide: padded top and bottom
    sq = images.square_and_resize(img, 20)
    assert sq.shape == (20, 20, 3)
    np.testing.assert_array_equal(sq[:5], 127)
    np.testing.assert_array_equal(sq[15:], 127)
    np.testing.assert_array_equal(sq[5:15], 255)
    small = images.square_and_resize(img, 16)
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8
    assert small[0, 8, 0] == 127 and small[8, 8, 0] == 255
    same = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(images.square_and_resize(same, 16), same)
    x = images.to_model(np.array([[[0, 255, 127]]], np.uint8))
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0


# ----------------------------------------------------------------------------- text

def test_i2t_example_alignment(tok):
    ex = text.i2t_example(tok, "how many objects are there?", "two", 68, 100)
    tokens, targets, mask = ex["tokens"], ex["targets"], ex["mask"]
    assert all(v.dtype == np.int32 and v.shape == (100,) for v in ex.values())
    assert (tokens == tok.image_id).sum() == 68
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any() and (tokens[n:] == tok.pad_id).all()
    pos = np.nonzero(targets >= 0)[0]
    # The answer and the closing <|im_end|> are predicted, each from the previous position.
    assert list(targets[pos]) == tok.encode("two") + [tok.eos_id]
    np.testing.assert_array_equal(targets[pos], tokens[pos + 1])
    assert pos[-1] == n - 2 and tokens[n - 1] == tok.eos_id
    prompt = tok.encode(chat_prompt("<image>\nhow many objects are there?"))
    assert pos[0] == len(prompt) - 1 + 67
    with pytest.raises(ValueError, match="exceeds max_len 70"):
        text.i2t_example(tok, "how many objects are there?", "two", 68, 70)


def test_t2i_example(tok, caplog):
    ex = text.t2i_example(tok, "a red circle", 32, drop=False)
    ids = tok.encode(chat_prompt(text.GEN_TEMPLATE.format(prompt="a red circle")))
    assert list(ex["tokens"][:len(ids)]) == ids and ex["mask"].sum() == len(ids)
    assert (ex["tokens"][len(ids):] == tok.pad_id).all()
    drop = text.t2i_example(tok, "a red circle", 32, drop=True)
    uncond = tok.encode(chat_prompt(text.UNCOND_PROMPT))
    assert list(drop["tokens"][:drop["mask"].sum()]) == uncond
    with caplog.at_level(logging.WARNING):
        long = text.t2i_example(tok, "a red circle " * 20, 16, drop=False)
    assert "truncated" in caplog.text
    tail = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    assert long["mask"].all() and list(long["tokens"][-len(tail):]) == tail


def test_examples_with_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from unimm.data.tokenizer import HFTokenizer
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "two", "red",
             "circles", "describe", "the", "image", ".", "[UNK]"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(words[:3])
    t.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path))
    ex = text.i2t_example(hf, "describe the image.", "two red circles", 5, 32)
    assert (ex["tokens"] == hf.image_id).sum() == 5
    assert list(ex["targets"][ex["targets"] >= 0]) == hf.encode("two red circles") + [hf.eos_id]
    gen = text.t2i_example(hf, "two red circles", 32, drop=False)
    assert gen["tokens"][gen["mask"].sum() - 1] == hf.encode("assistant")[0]


def test_shapes_vocabulary(tok):
    again = text.shapes_tokenizer()
    assert again.vocab == tok.vocab and tok.vocab[6:] == sorted(tok.vocab[6:])   # specials, then sorted
    fixed = [chat_prompt(text.GEN_TEMPLATE.format(prompt="a photo")), text.UNCOND_PROMPT, text.SHORT_CAPTION_Q,
             text.LONG_CAPTION_Q,
             text.CAPTION_Q]
    for s in fixed + [t for i in range(2000) for t in text.shapes_texts(12345, i)]:
        assert tok.unk_id not in tok.encode(s), s


# ----------------------------------------------------------------------------- shapes pipeline

def test_shapes_items_rotate_and_render():
    kinds = [pipeline.shapes_t2i_item(0, i, 32)["kind"] for i in range(3)]
    assert sorted(kinds) == sorted(pipeline.GEN_KINDS)
    g = next(pipeline.shapes_t2i_item(0, i, 32) for i in range(3)
             if pipeline.GEN_KINDS[i % 3] == "geneval")
    assert shapes.check_geneval(g["spec"], shapes.detect(g["image"]))
    u = [pipeline.shapes_i2t_item(0, i, 32) for i in range(3)]
    assert {x["kind"] for x in u} == set(pipeline.I2T_KINDS)
    qa = u[[x["kind"] for x in u].index("qa")]
    assert (qa["question"], qa["answer"]) in qa["qa"]


@pytest.mark.parametrize("kinds", [("long_caption", "geneval"), pipeline.GEN_KINDS,
                                   ("geneval", "long_caption", "geneval")])
def test_every_geneval_category_is_trained_equally_often(kinds):
    """Whatever the rotation of prompt kinds (the tiny config's two, the default three), the
    GenEval-style training prompts cover all six categories equally, each with a scene that
    passes its check (numbered by item index, two kinds trained only 3 of the 6)."""
    items = [pipeline.shapes_t2i_item(0, i, 24, kinds) for i in range(36 * len(kinds))]
    gen = [it for it in items if it["kind"] == "geneval"]
    counts = collections.Counter(it["spec"]["category"] for it in gen)
    assert set(counts) == set(shapes.GENEVAL_CATEGORIES) and len(set(counts.values())) == 1, counts
    assert len({it["prompt"] for it in gen}) > len(gen) // 3    # not the same few prompts again
    assert all(shapes.check_geneval(it["spec"], it["scene"]) for it in gen)


def test_batches_shapes_and_determinism(tok):
    c = tiny_config()
    a, b = take(pipeline.make_train_iterator(c, tok), 3), take(pipeline.make_train_iterator(c, tok), 3)
    assert_batches_equal(a, b)
    batch, d = a[0], c.data
    s = d.image_size
    want = {"i2t_images": (8, s, s, 3), "t2i_images": (8, s, s, 3),
            "i2t_tokens": (8, d.i2t_seq_len), "i2t_targets": (8, d.i2t_seq_len),
            "i2t_mask": (8, d.i2t_seq_len), "t2i_tokens": (8, d.max_t2i_len), "t2i_mask": (8, d.max_t2i_len)}
    assert {k: v.shape for k, v in batch.items()} == want
    assert batch["i2t_images"].dtype == np.float32 and batch["i2t_tokens"].dtype == np.int32
    assert -1 <= batch["t2i_images"].min() and batch["t2i_images"].max() <= 1
    assert ((batch["i2t_tokens"] == tok.image_id).sum(1) == d.num_image_tokens).all()
    assert not np.array_equal(a[0]["i2t_tokens"], a[1]["i2t_tokens"])


def test_read_threads_change_nothing_but_speed(tok):
    c = tiny_config()
    threaded = take(pipeline.make_train_iterator(c, tok), 3)
    c.data.read_threads, c.data.prefetch_batches = 0, 0     # in the calling thread
    assert_batches_equal(take(pipeline.make_train_iterator(c, tok), 3), threaded)
    c.data.read_threads = -1
    with pytest.raises(ValueError, match="data.read_threads"):
        pipeline.make_train_iterator(c, tok)


def test_cfg_dropout_rate(tok):
    c = tiny_config(i2t_batch_size=0, t2i_batch_size=50, cfg_drop_prob=0.5)
    uncond = text.t2i_example(tok, "", c.data.max_t2i_len, drop=True)["tokens"]
    b = next(pipeline.make_train_iterator(c, tok))
    assert "i2t_tokens" not in b
    frac = (b["t2i_tokens"] == uncond).all(1).mean()
    assert 0.25 < frac < 0.75


def test_process_sharding(tok):
    c = tiny_config()
    full = take(pipeline.make_train_iterator(c, tok, process_index=0, process_count=1), 2)
    halves = [take(pipeline.make_train_iterator(c, tok, process_index=p, process_count=2), 2)
              for p in range(2)]
    for step in range(2):
        for k, v in full[step].items():
            assert halves[0][step][k].shape[0] == 4
            # Process p holds the p-th contiguous block of the same global batch.
            np.testing.assert_array_equal(halves[0][step][k], v[:4])
            np.testing.assert_array_equal(halves[1][step][k], v[4:])
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_train_iterator(c, tok, process_index=0, process_count=3)


def test_iterator_state_restore(tok):
    c = tiny_config()
    it = pipeline.make_train_iterator(c, tok)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))   # must survive a JSON round trip
    expected = take(it, 2)
    fresh = pipeline.make_train_iterator(c, tok)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 2), expected)


def test_global_batch(tok):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    local = next(pipeline.make_train_iterator(tiny_config(), tok))
    g = pipeline.global_batch(local, mesh)
    for k, v in g.items():
        assert isinstance(v, jax.Array) and v.shape == local[k].shape
        assert v.sharding.spec[0] == ("data", "fsdp")
        assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(v), local[k])


def test_eval_examples_held_out(tok):
    c = tiny_config()
    ev = pipeline.eval_examples(c, tok, 3, "i2t")
    assert ev[0]["scene"] == shapes.sample_scene(c.data.seed, c.data.eval_offset)
    assert ev[0]["image"].dtype == np.uint8 and "example" in ev[0]
    gen = pipeline.eval_examples(c, tok, 6, "geneval")
    assert {g["category"] for g in gen} == set(shapes.GENEVAL_CATEGORIES)
    assert len(pipeline.eval_examples(c, tok, 2, "t2i")) == 2


# ----------------------------------------------------------------------------- JSONL

def _write_jsonl(folder, lines):
    path = folder / "data.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_jsonl_source(tmp_path, tok):
    (tmp_path / "img").mkdir()
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 20), color).save(tmp_path / "img" / f"{i}.png")
    path = _write_jsonl(tmp_path, [
        {"image": "img/0.png", "caption": "a red square"},
        {"image": "img/1.png", "prompt": "a blue square"},
        {"image": "img/2.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the square?"},
            {"from": "gpt", "value": "green"}]},
    ])
    recs = pipeline.read_jsonl(path)
    # A caption's question is chosen per example by data.caption_questions.
    assert recs[0]["i2t"] == (None, "a red square") and recs[0]["t2i"] == "a red square"
    assert recs[1]["i2t"] is None and recs[1]["t2i"] == "a blue square"
    assert recs[2]["i2t"] == ("what color is the square?", "green") and recs[2]["t2i"] is None
    c = tiny_config(source="jsonl", jsonl_path=path, i2t_batch_size=2, t2i_batch_size=2)
    assert pipeline.task_source(c.data, "i2t")[0] == 2 and pipeline.task_source(c.data, "t2i")[0] == 2
    batches = take(pipeline.make_train_iterator(c, tok), 3)
    b = batches[0]
    n = c.data.image_size
    assert b["i2t_images"].shape == (2, n, n, 3) and b["t2i_tokens"].shape == (2, c.data.max_t2i_len)
    # Wide images are gray-padded top and bottom.
    np.testing.assert_allclose(b["t2i_images"][:, 0, 16], 127 / 127.5 - 1)
    answers = {tok.decode(row[row >= 0]) for x in batches for row in x["i2t_targets"]}
    assert answers == {"a red square", "green"}


def _wide_image_jsonl(tmp_path, n):
    """n records of a 72x24 image whose columns count up (a crop's offset is readable)."""
    (tmp_path / "img").mkdir()
    wide = np.repeat(np.repeat(np.arange(72, dtype=np.uint8)[None, :, None] * 3, 24, 0), 3, 2)
    Image.fromarray(wide).save(tmp_path / "img" / "w.png")
    return _write_jsonl(tmp_path, [{"image": "img/w.png", "caption": f"caption {i}"} for i in range(n)])


def test_harmon_data_modes_random_crop_and_dense_caption_questions(tmp_path, tok):
    """Harmon's data handling (the official presets' defaults): text-to-image images are
    random square crops (crop2square), held-out ones centred; caption records ask one of
    the 13 dense-caption prompts at random, held-out ones "Describe the image in detail."."""
    path = _wide_image_jsonl(tmp_path, 16)
    c = tiny_config(source="jsonl", jsonl_path=path, i2t_batch_size=8, t2i_batch_size=8,
                    t2i_square="random_crop", caption_questions="harmon")
    batches = take(pipeline.make_train_iterator(c, tok), 2)
    # A 24x24 crop of the 72x24 image at an offset k: its first column holds 3k.
    offsets = {int(round((b[0, 0, 0] + 1) * 127.5)) // 3 for x in batches for b in x["t2i_images"]}
    assert len(offsets) > 4 and offsets <= set(range(49))
    # Same stream position, same crop: resuming replays it.
    again = take(pipeline.make_train_iterator(c, tok), 2)
    assert_batches_equal(again, batches)
    questions = {tok.decode(row[(row != tok.pad_id) & (row != tok.image_id)])
                 for x in batches for row in x["i2t_tokens"]}
    assert len(questions) > 3
    held_out = pipeline.eval_examples(c, tok, 2, "t2i")[0]["image"]
    np.testing.assert_array_equal(held_out[:, 0, 0], np.full(24, 72))   # centred: offset 24
    assert pipeline.eval_examples(c, tok, 1, "i2t")[0]["question"] == text.LONG_CAPTION_Q
    c.data.t2i_square = "squash"
    with pytest.raises(ValueError, match=r"data.t2i_square='squash': expected one of"):
        pipeline.make_train_iterator(c, tok)


# ----------------------------------------------------------------------------- TFDS

def test_tfds_source(tok):
    tfds = pytest.importorskip("tensorflow_datasets")

    class UnimmToyCaptions(tfds.core.GeneratorBasedBuilder):
        """Registered under "unimm_toy_captions"; mock_data fills it with random records."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(24, 40, 3)), "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield 0, {"image": np.zeros((24, 40, 3), np.uint8), "caption": "x"}

    c = tiny_config(source="tfds", tfds_name="unimm_toy_captions", i2t_batch_size=2, t2i_batch_size=2)
    with tfds.testing.mock_data(num_examples=5):
        assert pipeline.task_source(c.data, "i2t")[0] == 5
        it = pipeline.make_train_iterator(c, tok)
        b = next(it)
        state = it.get_state()
        nxt = next(it)
        it2 = pipeline.make_train_iterator(c, tok)
        it2.set_state(state)
        assert_batches_equal([next(it2)], [nxt])
    n = c.data.image_size
    assert b["i2t_images"].shape == (2, n, n, 3) and b["t2i_mask"].shape == (2, c.data.max_t2i_len)
    np.testing.assert_allclose(b["i2t_images"][:, 0, 16], 127 / 127.5 - 1)   # 24x40: padded


def test_t2i_prompt_kinds_long_captions_only(tok):
    """UAE's long-caption decoder pretraining (configs/uae_decoder.py): every prompt is the
    scene's long caption."""
    c = load_config("configs/uae_decoder.py:tiny")
    n, item = pipeline.task_source(c.data, "t2i")
    for i in range(6):
        x = item(i)
        assert x["kind"] == "long_caption" and shapes.parse_long_caption(x["prompt"]) == x["scene"]
    c.data.t2i_prompt_kinds = ("long_caption", "poems")
    with pytest.raises(ValueError, match=r"data.t2i_prompt_kinds=\('long_caption', 'poems'\): choose"):
        pipeline.task_source(c.data, "t2i")


def test_planning_examples_describe_a_scene_that_fits_the_prompt(tok):
    """The planning task (sample.plan): a generation prompt -> the long caption of a scene that
    satisfies it (a long caption plans to itself); text only, the loss on the description."""
    c = tiny_config(plan_batch_size=8, plan_seq_len=88, plan_prompt_kinds=("long_caption", "geneval"))
    for order in ("cell", "shuffled"):
        c.data.caption_order = order
        _, item = pipeline.task_source(c.data, "plan")
        items = [item(i) for i in range(120)]
        assert {x["kind"] for x in items} == {"long_caption", "geneval"}
        for x in items:
            scene = shapes.parse_long_caption(x["answer"])
            assert scene == x["scene"]
            if x["kind"] == "geneval":
                assert shapes.check_geneval(x["spec"], scene)
                if order == "cell":
                    assert x["answer"] == shapes.long_caption(scene)
                elif x["spec"]["category"] != "counting":   # one object per named shape
                    said = [p.split(" at ")[0].split()[-1] for p in x["answer"].split(", ")]
                    assert said == [o["shape"] for o in x["spec"]["objects"]], x
            else:
                assert x["answer"] == x["prompt"]
        # The generation prompts' long captions: cell order, or any order of the same scene.
        _, t2i = pipeline.task_source(c.data, "t2i")
        caps = [x for x in map(t2i, range(60)) if x["kind"] == "long_caption"]
        assert all(shapes.parse_long_caption(x["prompt"]) == x["scene"] for x in caps)
        in_cell_order = [x["prompt"] == shapes.long_caption(x["scene"]) for x in caps]
        assert all(in_cell_order) == (order == "cell")
    batch = next(pipeline.make_train_iterator(c, tok))
    assert {k: batch[k].shape for k in ("plan_tokens", "plan_targets", "plan_mask")} == {
        "plan_tokens": (8, 88), "plan_targets": (8, 88), "plan_mask": (8, 88)}
    assert not (batch["plan_tokens"] == tok.image_id).any()
    ex = text.plan_example(tok, "a photo of a circle", "a small red circle at the top.", 40)
    prompt = tok.encode(chat_prompt(text.PLAN_TEMPLATE.format(prompt="a photo of a circle")))
    pos = np.nonzero(ex["targets"] >= 0)[0]
    assert list(ex["tokens"][:len(prompt)]) == prompt and pos[0] == len(prompt) - 1
    assert list(ex["targets"][pos]) == tok.encode("a small red circle at the top.") + [tok.eos_id]
    with pytest.raises(ValueError, match="raise data.plan_seq_len"):
        text.plan_example(tok, "a photo of a circle", "a small red circle at the top.", 20)
    c.data.source = "jsonl"
    with pytest.raises(ValueError, match="data.plan_batch_size > 0 needs data.source='shapes'"):
        pipeline.task_source(c.data, "plan")


# ----------------------------------------------------------------------------- benchmark splits
def test_validation_split_has_its_own_items_seed_and_files(tok):
    """`unimm.evaluate --split=validation`: sampling settings are chosen on items of their own
    (data.val_offset) with their own sampling seed, never on the held-out test items."""
    from unimm.eval import splits
    test_cfg, val_cfg = tiny_config(), tiny_config()
    assert splits.select(test_cfg, "test") == (0, "")
    assert splits.select(val_cfg, "validation", ["sample.num_iter=3", "sample.cfg=3.5"]) == (1, "validation_")
    assert (val_cfg.sample.num_iter, val_cfg.sample.cfg) == (3, 3.5)
    assert test_cfg.sample.num_iter == tiny_config().sample.num_iter != 3   # --set applies to its config only
    for task in ("geneval", "i2t"):
        test_items = pipeline.eval_examples(test_cfg, tok, 12, task)
        val_items = pipeline.eval_examples(val_cfg, tok, 12, task)
        key = "prompt" if task == "geneval" else "long_caption"
        assert [it[key] for it in test_items] != [it[key] for it in val_items], task
        if task == "geneval":
            assert [it["index"] for it in val_items] == list(range(2_000_000_000, 2_000_000_012))
            assert test_items[0]["index"] == test_cfg.data.eval_offset == 1_000_000_000
    with pytest.raises(ValueError, match=r"--set=model.llm.num_layers=1: only sample.\* fields"):
        splits.select(tiny_config(), "test", ["model.llm.num_layers=1"])
    with pytest.raises(ValueError, match="sample.nope is not a config field"):
        splits.select(tiny_config(), "test", ["sample.nope=1"])
    with pytest.raises(ValueError, match="split 'train'"):
        splits.select(tiny_config(), "train")
