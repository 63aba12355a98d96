"""A word-level tokenizer built from the dataset's own instructions: no vocabulary download."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text``."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Maps instructions to fixed-length id sequences; id 0 pads, id 1 is an unknown word.

    Args:
        vocab: The vocabulary, ``[PAD, UNK, word, ...]``.
        max_len: Every encoding is padded or cut to this many ids.

    Example:
        >>> tok = WordTokenizer.build(["open the drawer", "close the drawer"])
        >>> tok.encode(["open the window"]).tolist()
        [[2, 3, 1, 0, 0, 0, 0, 0]]
    """

    def __init__(self, vocab: Sequence[str], max_len: int = 8) -> None:
        if list(vocab[:2]) != [PAD, UNK]:
            raise ValueError(f"WordTokenizer: vocab must start with {PAD!r}, {UNK!r}")
        if max_len < 1:
            raise ValueError(f"WordTokenizer: max_len must be >= 1, got {max_len}")
        self.vocab = list(vocab)
        self.max_len = max_len
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: Iterable[str], max_len: int = 8) -> WordTokenizer:
        """A vocabulary of every word in ``texts``, in order of first appearance."""
        seen: dict[str, None] = {}
        for text in texts:
            seen.update(dict.fromkeys(words(text)))
        return cls([PAD, UNK, *seen], max_len)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), max_len)`` int64 ids, padded with 0."""
        out = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.index.get(w, 1) for w in words(text)][: self.max_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def to_dict(self) -> dict[str, object]:
        return {"vocab": self.vocab, "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> WordTokenizer:
        return cls(list(d["vocab"]), int(d["max_len"]))  # type: ignore[arg-type]
