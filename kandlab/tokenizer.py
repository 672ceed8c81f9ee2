"""Text → token ids: a word-level tokenizer for the shapes captions, and an adapter for real ones.

The shapes world has a vocabulary of a couple of dozen words, so one id per word
is all the tiny T5 encoder needs. It follows T5's conventions so that the tiny
and the real path look the same to the rest of the course:

- ``<pad>`` = 0, ``</s>`` = 1 (appended to every prompt, like T5), ``<unk>`` = 2;
- fixed-length output: every prompt is padded (or truncated) to ``max_length``;
- ``tok(prompts)`` returns ``{"input_ids", "attention_mask"}``, both ``(B, max_length)``
  ``torch.long``, so ``encoder(**tok(prompts))`` works for either tokenizer.

``HFTokenizerAdapter`` gives a ``transformers`` tokenizer (e.g. Flan-T5's
SentencePiece tokenizer) the same interface, and ``load_t5_tokenizer`` fetches
one — only when asked, and with a clear message when the course is offline.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing

from kandlab.weights import OfflineError, hub_reachable

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2 — T5's pad and eos ids
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def _as_prompt_list(texts: str | Sequence[str]) -> list[str]:
    """One prompt or a list of prompts → a non-empty list of non-empty strings."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not texts:
        raise ValueError("give a prompt (a str) or a non-empty list of prompts, e.g. tok(['a red circle'])")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {i} must be a str, got {type(text).__name__}")
    return list(texts)


# ---------------------------------------------------------------------------
# The word-level tokenizer for the shapes world


class ShapesTokenizer:
    """One id per word, built with the ``tokenizers`` library.

    Pipeline: lowercase → punctuation becomes a space → split into words →
    look each word up (unknown words → ``<unk>``) → append ``</s>`` → pad or
    truncate to ``max_length``. With ``strict=True`` unknown words and prompts
    longer than ``max_length`` raise instead, naming the closest known words.
    """

    def __init__(self, vocab: Sequence[str], max_length: int = 16, strict: bool = False):
        self.words = self._check_vocab(vocab)
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int ≥ 2 (one word + </s>), got {max_length!r}")
        self.max_length = max_length
        self.strict = strict

        word_to_id = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        word_to_id.update({word: i + len(SPECIAL_TOKENS) for i, word in enumerate(self.words)})
        backend = Tokenizer(WordLevel(vocab=word_to_id, unk_token=UNK))
        backend.add_special_tokens(list(SPECIAL_TOKENS))
        backend.normalizer = normalizers.Sequence(
            [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]  # "circle." → "circle "
        )
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.post_processor = TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, EOS_ID)])
        backend.enable_truncation(max_length)  # keeps room for </s>
        backend.enable_padding(length=max_length, pad_id=PAD_ID, pad_token=PAD)
        self.backend = backend  # the `tokenizers.Tokenizer`, e.g. for PreTrainedTokenizerFast

    @classmethod
    def from_shapes(cls, max_length: int = 16, strict: bool = False) -> ShapesTokenizer:
        """The tokenizer for ``kandlab.shapes`` captions (its ``VOCABULARY``)."""
        from kandlab.shapes import VOCABULARY  # imported here: the shapes world is optional

        return cls(VOCABULARY, max_length=max_length, strict=strict)

    @staticmethod
    def _check_vocab(vocab: Sequence[str]) -> list[str]:
        if isinstance(vocab, str) or not isinstance(vocab, Sequence) or not vocab:
            raise ValueError("vocab must be a non-empty list of words, e.g. ['a', 'red', 'circle']")
        words = list(vocab)
        for word in words:
            if not isinstance(word, str) or not re.fullmatch(r"[^\W_]\w*", word) or word != word.lower():
                raise ValueError(
                    f"vocab word {word!r} must be one lowercase word of letters/digits "
                    "(prompts are lowercased and punctuation is dropped, so it could never match)"
                )
        duplicates = sorted({w for w in words if words.count(w) > 1})
        if duplicates:
            raise ValueError(f"vocab has duplicate words: {duplicates}")
        return words

    # -- the interface shared with HFTokenizerAdapter -------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the encoder's ``vocab_size``."""
        return self.backend.get_vocab_size()

    def split(self, text: str) -> list[str]:
        """The words the tokenizer sees: ``"Two red circles."`` → ``['two', 'red', 'circles']``."""
        normalized = self.backend.normalizer.normalize_str(text)
        return [word for word, _ in self.backend.pre_tokenizer.pre_tokenize_str(normalized)]

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompts → ``{"input_ids": (B, max_length), "attention_mask": (B, max_length)}`` (long)."""
        prompts = _as_prompt_list(texts)
        for i, text in enumerate(prompts):
            words = self.split(text)
            if not words:
                raise ValueError(f"prompt {i} ({text!r}) has no words; write a caption such as 'a red circle'")
            if self.strict:
                self._check_strict(i, text, words)
        encodings = self.backend.encode_batch(prompts)
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (B, max_length)
        attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)  # (B, max_length)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _check_strict(self, i: int, text: str, words: list[str]) -> None:
        unknown = [w for w in dict.fromkeys(words) if w not in self.words]
        if unknown:
            lines = []
            for word in unknown:
                close = self.suggest(word)
                lines.append(f"unknown word {word!r} — did you mean: {', '.join(close)}?" if close
                             else f"unknown word {word!r} (no similar known word).")
            raise ValueError(f"prompt {i} ({text!r}): " + " ".join(lines) + f" Known words: {', '.join(self.words)}")
        if len(words) + 1 > self.max_length:
            raise ValueError(
                f"prompt {i} has {len(words)} words + </s> = {len(words) + 1} tokens, more than "
                f"max_length={self.max_length}; shorten it or build the tokenizer with max_length={len(words) + 1}"
            )

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Ids → text without special tokens; a 2-D batch gives a list of strings."""
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.ndim not in (1, 2):
            raise ValueError(f"decode expects integer ids of shape (L,) or (B, L), got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids must lie in 0..{self.vocab_size - 1}; got {int(ids.min())}..{int(ids.max())}")
        if ids.ndim == 2:
            return [self.backend.decode(row.tolist(), skip_special_tokens=True) for row in ids]
        return self.backend.decode(ids.tolist(), skip_special_tokens=True)

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` outside the vocabulary (they would become ``<unk>``), in order, once each."""
        return [w for w in dict.fromkeys(self.split(text)) if w not in self.words]

    def suggest(self, word: str, n: int = 3) -> list[str]:
        """Up to ``n`` known words that look like ``word`` (``difflib`` similarity ≥ 0.6)."""
        return difflib.get_close_matches(word.lower(), self.words, n=n, cutoff=0.6)

    def __repr__(self) -> str:
        return f"ShapesTokenizer({len(self.words)} words + {len(SPECIAL_TOKENS)} special, max_length={self.max_length})"


# ---------------------------------------------------------------------------
# Real tokenizers (Flan-T5, Flan-UL2): same interface


class HFTokenizerAdapter:
    """Wrap a ``transformers`` tokenizer so it returns what ``ShapesTokenizer`` returns."""

    def __init__(self, tokenizer: Any, max_length: int = 128):
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise TypeError(f"expected a transformers tokenizer, got {type(tokenizer).__name__}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int ≥ 2, got {max_length!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; fixed-length batches need one "
                             "(set tokenizer.pad_token = ...)")
        self.tokenizer = tokenizer
        self.max_length = max_length  # Kandinsky 3 pads prompts to 128 tokens

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompts → ``{"input_ids": (B, max_length), "attention_mask": (B, max_length)}`` (long)."""
        prompts = _as_prompt_list(texts)
        for i, text in enumerate(prompts):
            if not text.strip():
                raise ValueError(f"prompt {i} is empty; write a caption such as 'a red circle'")
        out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.ndim not in (1, 2):
            raise ValueError(f"decode expects integer ids of shape (L,) or (B, L), got {ids.dtype} {tuple(ids.shape)}")
        if ids.ndim == 2:
            return [self.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ids]
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    def unknown_words(self, text: str) -> list[str]:
        """Whitespace-separated words that contain an ``<unk>`` piece (rare for SentencePiece)."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return []
        words = dict.fromkeys(text.split())
        return [w for w in words if unk in self.tokenizer(w, add_special_tokens=False)["input_ids"]]

    def __repr__(self) -> str:
        name = type(self.tokenizer).__name__
        return f"HFTokenizerAdapter({name}, vocab_size={self.vocab_size}, max_length={self.max_length})"


def _offline_reason() -> str | None:
    """Why the hub cannot be used right now, or None if it answers (checked in ≤ ~2 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable(timeout=2.0):
        return "huggingface.co did not answer within 2 s"
    return None


def _offline_message(name: str, reason: str) -> str:
    return (
        f"The course is offline ({reason}), so the tokenizer of {name!r} cannot be downloaded. "
        f"On a machine with internet run `hf download {name}` (older huggingface_hub: "
        f"`huggingface-cli download {name}`) and copy the cache (~/.cache/huggingface) here, "
        "or open the lesson in Colab. The lesson continues with the tiny shapes tokenizer: "
        "ShapesTokenizer.from_shapes()."
    )


def load_t5_tokenizer(name: str = "google/flan-t5-small", max_length: int = 128,
                      cache_dir: str | os.PathLike | None = None) -> HFTokenizerAdapter:
    """A real T5 tokenizer from the model hub (or the local cache), wrapped in ``HFTokenizerAdapter``.

    Tries the local cache first (works offline). Otherwise checks within ~2 s
    that huggingface.co answers before downloading, so it never hangs; when it
    cannot, raises ``OfflineError`` (a ``RuntimeError``) saying what to download.
    """
    from transformers import AutoTokenizer  # the real tier only: imported when asked for

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir, local_files_only=True)
        return HFTokenizerAdapter(tokenizer, max_length)
    except (OSError, ValueError):
        pass  # not in the cache
    reason = _offline_reason()
    if reason is not None:
        raise OfflineError(_offline_message(name, reason))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
    except (OSError, ConnectionError, TimeoutError) as error:  # hub errors derive from OSError
        raise OfflineError(_offline_message(name, f"download failed: {type(error).__name__}")) from error
    return HFTokenizerAdapter(tokenizer, max_length)
