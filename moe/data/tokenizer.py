"""Tokenizers: byte-level (shared by the LM and the image-text data) and word-level (captions).

``ByteTokenizer``: ids 0..255 are the raw UTF-8 bytes; three special ids follow them:
``PAD = 256``, ``BOS = 257``, ``EOS = 258`` (``vocab_size = 259``).

``WordTokenizer(words)``: one id per word of a fixed vocabulary (ids 0..n-1, in the
given order), then ``pad_id = n``, ``bos_id = n + 1``, ``eos_id = n + 2``,
``unk_id = n + 3`` (``vocab_size = n + 4``). Text is lower-cased and cut into runs of
letters/digits and single punctuation marks; a piece outside the vocabulary is UNK.
For captions with a small closed vocabulary (the built-in shapes data) it makes
"red" and "circle" single tokens instead of byte sequences.

Legend: B = batch size, L = fixed text length in tokens.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Sequence

import torch

from parallel.checks import check_int

__all__ = ["ByteTokenizer", "WordTokenizer", "EncodedBatch", "PAD", "BOS", "EOS", "VOCAB_SIZE"]

PAD = 256
BOS = 257
EOS = 258
VOCAB_SIZE = 259


class EncodedBatch(NamedTuple):
    """A padded batch of token ids.

    ``ids``: LongTensor[B, L], padded with ``PAD`` on the right.
    ``mask``: BoolTensor[B, L], True where ``ids`` holds a real token (incl. BOS/EOS).
    """

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """LongTensor[B]: number of real (non-pad) tokens per row."""
        return self.mask.sum(dim=1)


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus PAD / BOS / EOS.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("héllo", add_bos=True, add_eos=True))
    'héllo'
    """

    pad_id: int = PAD
    bos_id: int = BOS
    eos_id: int = EOS
    vocab_size: int = VOCAB_SIZE

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encode ``text`` as UTF-8 byte ids, optionally framed by BOS / EOS."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, BOS)
        if add_eos:
            ids.append(EOS)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Decode ids back to text; special ids are skipped, bad UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i in (PAD, BOS, EOS):
                continue
            else:
                raise ValueError(f"token id {i} is out of range; allowed ids are 0..{VOCAB_SIZE - 1}")
        return out.decode("utf-8", errors="replace")

    def encode_batch(
        self,
        texts: Sequence[str],
        length: int,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> EncodedBatch:
        """Encode ``texts`` to a fixed ``length``: right-padded with PAD, truncated if longer.

        Truncation keeps the first ``length`` tokens (an EOS may be cut off).
        Returns ``EncodedBatch(ids=LongTensor[B, length], mask=BoolTensor[B, length])``.
        """
        check_int("length", length, minimum=1)
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, not a single str")
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.bool)
        for row, text in enumerate(texts):
            toks = self.encode(text, add_bos=add_bos, add_eos=add_eos)[:length]
            if toks:
                ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
                mask[row, : len(toks)] = True
        return EncodedBatch(ids, mask)

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        """Decode LongTensor[B, L] row by row (PAD/BOS/EOS skipped)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be 2-D [B, L], got shape {tuple(ids.shape)}")
        return [self.decode(row) for row in ids]


_WORD_PIECES = re.compile(r"[0-9a-z]+|[^\s0-9a-z]")


class WordTokenizer(ByteTokenizer):
    """Whole words of a fixed vocabulary as tokens, plus PAD / BOS / EOS / UNK (see the module docstring).

    >>> tok = WordTokenizer(["a", "red", "circle"])
    >>> tok.encode("A red circle!"), tok.decode(tok.encode("a red circle"))
    ([0, 1, 2, 6], 'a red circle')
    """

    def __init__(self, words: Sequence[str]) -> None:
        if isinstance(words, str) or not isinstance(words, (list, tuple)) or not words:
            raise ValueError(f"words must be a non-empty list of vocabulary words, got {words!r}")
        self.words: tuple[str, ...] = tuple(words)
        for w in self.words:
            if not isinstance(w, str) or _WORD_PIECES.fullmatch(w) is None:
                raise ValueError(f"vocabulary word {w!r} is not one lower-case word or one punctuation mark")
        if len(set(self.words)) != len(self.words):
            raise ValueError("words has duplicates; each vocabulary word may appear once")
        self._ids = {w: i for i, w in enumerate(self.words)}
        n = len(self.words)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = n, n + 1, n + 2, n + 3
        self.vocab_size = n + 4

    def split(self, text: str) -> list[str]:
        """The pieces ``text`` is cut into (lower-cased words and punctuation marks)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return _WORD_PIECES.findall(text.lower())

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encode ``text`` as word ids (UNK for words outside the vocabulary), optionally framed by BOS / EOS."""
        ids = [self._ids.get(w, self.unk_id) for w in self.split(text)]
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Words joined by spaces; PAD/BOS/EOS skipped, UNK shown as ``<unk>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = []
        for i in ids:
            i = int(i)
            if 0 <= i < len(self.words):
                out.append(self.words[i])
            elif i == self.unk_id:
                out.append("<unk>")
            elif i not in (self.pad_id, self.bos_id, self.eos_id):
                raise ValueError(f"token id {i} is out of range; allowed ids are 0..{self.vocab_size - 1}")
        return " ".join(out)
