"""Byte-level tokenizer shared by the LM and the image-text (LIMoE-style) data.

Ids 0..255 are the raw UTF-8 bytes; three special ids follow them:
``PAD = 256``, ``BOS = 257``, ``EOS = 258`` (``vocab_size = 259``).

Legend: B = batch size, L = fixed text length in tokens.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch

from ..checks import check_int

__all__ = ["ByteTokenizer", "EncodedBatch", "PAD", "BOS", "EOS", "VOCAB_SIZE"]

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
        ids = torch.full((len(texts), length), PAD, dtype=torch.long)
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
