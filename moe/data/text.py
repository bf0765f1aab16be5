"""Byte-level language-model data: the Python standard library's own source, or user text.

The built-in corpus is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``
(tests and site-packages skipped), read in sorted path order up to a byte budget,
so the same Python version always gives the same bytes and nothing is downloaded.
The corpus is cut into fixed-size blocks; a seeded choice of blocks forms the
validation split, the rest the training split (disjoint byte ranges).

Tokens are the bytes themselves (``ByteTokenizer`` ids 0..255).

Legend: L = ``seq_len`` (tokens per sequence).
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from parallel.rng import data_rng

from parallel.checks import check_int, check_number

__all__ = [
    "TextCorpus",
    "LMDataset",
    "stdlib_files",
    "stdlib_text",
    "read_text_files",
    "split_corpus",
    "load_corpus",
]

PathLike = Union[str, os.PathLike]

# Directories under the stdlib that are not ordinary library source.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_FILE_SEPARATOR = b"\n\n"


def _concat(chunks: Iterable[bytes], max_bytes: Optional[int]) -> bytes:
    out = bytearray()
    for chunk in chunks:
        if not chunk:
            continue
        if out:
            out += _FILE_SEPARATOR
        out += chunk
        if max_bytes is not None and len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes] if max_bytes is not None else out)


def stdlib_files(stdlib_dir: Optional[PathLike] = None) -> list[Path]:
    """Sorted list of the stdlib's ``.py`` source files (tests and site-packages skipped)."""
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {str(root)!r} does not exist")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_text(max_bytes: Optional[int] = 2_000_000, stdlib_dir: Optional[PathLike] = None) -> bytes:
    """The first ``max_bytes`` bytes of the stdlib's source files, in sorted path order.

    Files are joined with a blank line; ``max_bytes=None`` reads them all (~30 MB).
    """
    check_int("max_bytes", max_bytes, minimum=1, allow_none=True)
    files = stdlib_files(stdlib_dir)
    data = _concat((f.read_bytes() for f in files), max_bytes)  # lazy: stops at the budget
    if not data:
        raise ValueError(f"no Python source found under {str(stdlib_dir or sysconfig.get_paths()['stdlib'])!r}")
    return data


def read_text_files(paths: Union[PathLike, Sequence[PathLike]], max_bytes: Optional[int] = None) -> bytes:
    """Read user text: one file, a list of files, or a folder (its ``*.txt`` files, recursively, sorted).

    Files are joined with a blank line and cut at ``max_bytes``.
    Raises FileNotFoundError for a missing path, ValueError for an empty file or a
    folder without ``.txt`` files.
    """
    check_int("max_bytes", max_bytes, minimum=1, allow_none=True)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise ValueError("paths is empty; give at least one text file or folder")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted((f for f in p.rglob("*.txt") if f.is_file()), key=lambda f: f.as_posix())
            if not found:
                raise ValueError(f"folder {str(p)!r} contains no .txt files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"text file or folder {str(p)!r} does not exist")
    chunks = []
    for f in files:
        data = f.read_bytes()
        if not data.strip():
            raise ValueError(f"text file {str(f)!r} is empty")
        chunks.append(data)
    return _concat(chunks, max_bytes)


@dataclass(frozen=True)
class TextCorpus:
    """Train / validation bytes as ``torch.uint8`` tensors ``train[N_train]``, ``val[N_val]``."""

    train: torch.Tensor
    val: torch.Tensor


def split_corpus(data: bytes, val_fraction: float = 0.05, block_size: int = 8192, seed: int = 0) -> TextCorpus:
    """Cut ``data`` into ``block_size`` blocks and send a seeded ``val_fraction`` of them to validation.

    The two splits hold disjoint byte ranges; blocks keep their original order in
    each split. At least one block goes to each split when ``0 < val_fraction``.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    check_int("block_size", block_size, minimum=1)
    check_number("val_fraction", val_fraction, minimum=0, maximum=1, max_open=True)
    n_blocks = (len(data) + block_size - 1) // block_size
    if val_fraction > 0 and n_blocks < 2:
        raise ValueError(
            f"corpus of {len(data)} bytes has only {n_blocks} block(s) of block_size={block_size}; "
            "need at least 2 to split off validation (lower block_size or add text)"
        )
    n_val = 0 if val_fraction == 0 else min(n_blocks - 1, max(1, round(val_fraction * n_blocks)))
    rng = data_rng(seed, 104729)
    val_blocks = set(rng.choice(n_blocks, size=n_val, replace=False).tolist()) if n_val else set()
    arr = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    train_parts: list[torch.Tensor] = []
    val_parts: list[torch.Tensor] = []
    for b in range(n_blocks):
        (val_parts if b in val_blocks else train_parts).append(arr[b * block_size : (b + 1) * block_size])
    empty = torch.zeros(0, dtype=torch.uint8)
    return TextCorpus(
        train=torch.cat(train_parts) if train_parts else empty,
        val=torch.cat(val_parts) if val_parts else empty.clone(),
    )


def load_corpus(
    source: Union[str, PathLike, Sequence[PathLike]] = "stdlib",
    *,
    max_bytes: Optional[int] = 2_000_000,
    val_fraction: float = 0.05,
    block_size: int = 8192,
    seed: int = 0,
) -> TextCorpus:
    """``source="stdlib"`` for the built-in corpus, else a text file, folder or list of them."""
    if isinstance(source, str) and source == "stdlib":
        data = stdlib_text(max_bytes)
    else:
        data = read_text_files(source, max_bytes)
    return split_corpus(data, val_fraction=val_fraction, block_size=block_size, seed=seed)


class LMDataset(Dataset):
    """Random windows of a byte corpus for next-token prediction.

    ``dataset[i]`` is LongTensor[L + 1] (ids 0..255): inputs are ``[:-1]``,
    targets ``[1:]``. The window start is fixed by ``(seed, i)``, whatever order
    items are read in. ``size`` is the number of windows per epoch.
    """

    def __init__(self, tokens: Union[torch.Tensor, bytes], seq_len: int, size: int = 10_000, seed: int = 0) -> None:
        if isinstance(tokens, (bytes, bytearray)):
            tokens = torch.frombuffer(bytearray(tokens), dtype=torch.uint8) if tokens else torch.zeros(0)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise TypeError("tokens must be bytes or a 1-D tensor of byte ids")
        for name, value in (("seq_len", seq_len), ("size", size)):
            check_int(name, value, minimum=1)
        if tokens.numel() < seq_len + 1:
            raise ValueError(
                f"corpus has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter seq_len or more text"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for LMDataset of size {self.size}")
        index %= self.size
        n_starts = self.tokens.numel() - self.seq_len
        start = int(data_rng(self.seed, index).integers(n_starts))
        return self.tokens[start : start + self.seq_len + 1].to(torch.long)
