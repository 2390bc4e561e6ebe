"""Both tokenizers: the built-in word vocabulary and a local tokenizer.json."""
import pytest

from unimm.data import tokenizer as tk

WORDS = ["a large red circle at the top left, a small blue square at the center.",
         "how many circles are there?", "two", "Generate an image: two red circles"]


def test_word_tokenizer_round_trip_and_specials():
    tok = tk.WordTokenizer.from_words(WORDS)
    assert tok.vocab[: len(tk.SPECIAL_TOKENS)] == list(tk.SPECIAL_TOKENS)
    text = "a large red circle at the top left, a small blue square at the center."
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    prompt = tk.chat_prompt("<image>\nhow many circles are there?")
    ids = tok.encode(prompt)
    assert ids[0] == tok.im_start_id and tok.image_id in ids and tok.eos_id in ids
    assert tok.decode(ids, skip_special=False) == prompt
    assert tok.decode(ids) == "user\n\nhow many circles are there?\nassistant\n"


def test_word_tokenizer_unknown_words_and_bad_ids():
    tok = tk.WordTokenizer.from_words(WORDS)
    assert tok.encode("a purple hexagon") == [tok._ids["a"], tok.unk_id, tok.unk_id]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="lacks the special tokens"):
        tk.WordTokenizer(["a", "b"])


def test_hf_tokenizer_from_local_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant",
                                         "two", "red", "circles", "[UNK]"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    t.save(str(tmp_path / "tokenizer.json"))

    tok = tk.HFTokenizer(str(tmp_path))
    assert tok.eos_id == vocab["<|im_end|>"] and tok.pad_id == vocab["<|endoftext|>"]
    assert tok.image_id == len(vocab)           # <image> added past the base vocabulary
    ids = tok.encode("<image> two red circles <|im_end|>")
    assert ids == [tok.image_id, vocab["two"], vocab["red"], vocab["circles"], tok.eos_id]
    assert tok.decode(ids) == "two red circles"
