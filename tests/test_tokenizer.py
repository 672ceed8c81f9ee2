"""kandlab.tokenizer: the word-level shapes tokenizer, the transformers adapter, the offline path."""

from __future__ import annotations

import time

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from kandlab.tokenizer import EOS_ID, PAD_ID, UNK_ID, HFTokenizerAdapter, ShapesTokenizer, load_t5_tokenizer

VOCAB = ["a", "two", "red", "blue", "purple", "circle", "circles", "square", "above", "left", "of"]


@pytest.fixture()
def tok() -> ShapesTokenizer:
    return ShapesTokenizer(VOCAB, max_length=8)


def word_id(word: str) -> int:
    return 3 + VOCAB.index(word)


def test_ids_follow_t5_conventions(tok):
    out = tok("A red circle above two blue squares")
    assert set(out) == {"input_ids", "attention_mask"}
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (1, 8)
    # "squares" is not in VOCAB → <unk>; </s> after the last word; <pad> fills the rest
    expected = [word_id("a"), word_id("red"), word_id("circle"), word_id("above"), word_id("two"),
                word_id("blue"), UNK_ID, EOS_ID]
    assert ids[0].tolist() == expected
    assert mask[0].tolist() == [1] * 8
    assert tok.vocab_size == len(VOCAB) + 3
    assert (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)


def test_batch_padding_case_and_punctuation(tok):
    out = tok(["Red CIRCLE.", "two purple circles, left of a square!"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == [word_id("red"), word_id("circle"), EOS_ID] + [PAD_ID] * 5
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ids[1].tolist() == [word_id(w) for w in "two purple circles left of a square".split()] + [EOS_ID]
    assert mask[1].sum() == 8


def test_truncation_keeps_end_of_sequence():
    tok = ShapesTokenizer(VOCAB, max_length=4)
    ids = tok("a red circle above a blue square")["input_ids"][0].tolist()
    assert ids == [word_id("a"), word_id("red"), word_id("circle"), EOS_ID]


def test_decode_round_trip(tok):
    texts = ["a red circle", "two blue circles left of a square"]
    ids = tok(texts)["input_ids"]
    assert tok.decode(ids) == texts
    assert tok.decode(ids[0]) == "a red circle"
    assert tok.decode([word_id("blue"), EOS_ID, PAD_ID]) == "blue"
    with pytest.raises(ValueError, match="0..13"):
        tok.decode([99])


def test_unknown_words_and_suggestions(tok):
    assert tok.unknown_words("A purpel circel above the red square") == ["purpel", "circel", "the"]
    assert tok.unknown_words("a red circle.") == []
    assert tok.suggest("purpel")[0] == "purple"
    assert tok.suggest("circel", n=2) == ["circle", "circles"]
    assert tok.suggest("zzzz") == []


def test_strict_mode_names_the_nearest_words():
    strict = ShapesTokenizer(VOCAB, max_length=8, strict=True)
    with pytest.raises(ValueError, match=r"unknown word 'purpel' — did you mean: purple\? Known words: a, two, red"):
        strict("a purpel circle")
    with pytest.raises(ValueError, match=r"unknown word 'zzz' \(no similar known word\)"):
        strict(["a red circle", "zzz"])
    with pytest.raises(ValueError, match=r"9 tokens, more than max_length=8.*max_length=9"):
        strict("a red circle above a blue circle left")
    assert strict("a red circle")["input_ids"].shape == (1, 8)  # fine prompts still pass


@pytest.mark.parametrize("bad, error, message", [
    ("", ValueError, "has no words"),
    ("   ...  ", ValueError, "has no words"),
    ([], ValueError, "non-empty list"),
    ([3], TypeError, "prompt 0 must be a str"),
])
def test_bad_prompts(tok, bad, error, message):
    with pytest.raises(error, match=message):
        tok(bad)


def test_bad_vocabularies():
    with pytest.raises(ValueError, match="lowercase word"):
        ShapesTokenizer(["Red"])
    with pytest.raises(ValueError, match="lowercase word"):
        ShapesTokenizer(["left of"])
    with pytest.raises(ValueError, match="duplicate"):
        ShapesTokenizer(["red", "red"])
    with pytest.raises(ValueError, match="max_length"):
        ShapesTokenizer(["red"], max_length=1)


def test_feeds_the_tiny_t5_encoder(tok):
    from kandlab.t5 import T5Config, T5Encoder

    encoder = T5Encoder(T5Config.tiny(vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        out = encoder(**tok(["a red circle", "two blue squares above a purple circle"]))
    assert out.shape == (2, 8, encoder.config.d_model)


def test_from_shapes_vocabulary():
    shapes = pytest.importorskip("kandlab.shapes")
    if not hasattr(shapes, "VOCABULARY"):
        pytest.skip("kandlab.shapes has no VOCABULARY yet")
    tok = ShapesTokenizer.from_shapes(max_length=16, strict=True)
    assert tok.vocab_size == len(shapes.VOCABULARY) + 3
    assert tok.decode(tok(" ".join(shapes.VOCABULARY[:10]))["input_ids"][0]) == " ".join(shapes.VOCABULARY[:10])


# ---------------------------------------------------------------------------
# transformers tokenizers behind the same interface


def test_adapter_gives_the_same_tensors_as_the_shapes_tokenizer(tok):
    texts = ["A red circle.", "two purple circles left of a blue square above"]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, pad_token="<pad>", eos_token="</s>",
                                 unk_token="<unk>")
    adapter = HFTokenizerAdapter(hf, max_length=8)
    ours, theirs = tok(texts), adapter(texts)
    assert theirs["input_ids"].dtype == theirs["attention_mask"].dtype == torch.long
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert adapter.vocab_size == tok.vocab_size
    assert adapter.decode(theirs["input_ids"]) == tok.decode(ours["input_ids"])
    assert adapter.unknown_words("a purpel circle") == ["purpel"]


def test_adapter_pads_and_truncates_a_plain_tokenizer():
    backend = Tokenizer(WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    adapter = HFTokenizerAdapter(hf, max_length=5)
    out = adapter(["hello", "hello world hello world hello world"])
    assert out["input_ids"].tolist() == [[3, 0, 0, 0, 0], [3, 4, 3, 4, 3]]
    assert out["attention_mask"].tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="empty"):
        adapter(["hello", " "])


# ---------------------------------------------------------------------------
# The real T5 tokenizer, offline


@pytest.mark.parametrize("hub_offline_env", ["1", None])
def test_load_t5_tokenizer_offline_is_clear_and_quick(monkeypatch, tmp_path, hub_offline_env):
    # conftest blocks sockets; with HF_HUB_OFFLINE unset the 2 s reachability probe must fail fast
    if hub_offline_env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", hub_offline_env)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        load_t5_tokenizer("google/flan-t5-small", cache_dir=tmp_path)  # empty cache: nothing to find locally
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert "offline" in message
    assert "download google/flan-t5-small" in message
    assert "tiny" in message
