"""User image-caption data for the contrastive (LIMoE-style) model.

Input: a JSONL file, one object per line,
``{"image": "relative/path.png", "caption": "..."}``, with image paths relative to
``image_root`` (default: the JSONL file's folder). Optional string keys ``shape``
and ``colour`` and an int ``label`` are passed through; otherwise they are ``""``,
``""`` and ``-1``. Items have the same dict shape as ``ShapesDataset`` items, so
``ImageTextCollator`` batches both.

The whole JSONL is checked on construction (bad JSON, missing keys, missing image
files), with errors naming the file and the line number. Images are read lazily
with PIL, converted to RGB and resized to ``image_size`` x ``image_size``.

Legend: S = ``image_size`` (images are RGB, [3, S, S]).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from parallel.checks import check_int, check_str

__all__ = ["ImageCaptionDataset", "ImageCaptionRecord"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ImageCaptionRecord:
    """One checked JSONL line: where the image is and what it says."""

    image_path: Path
    caption: str
    line: int
    shape: str = ""
    colour: str = ""
    label: int = -1


class ImageCaptionDataset(Dataset):
    """Images + captions from a JSONL index.

    ``dataset[i]`` is a dict: image FloatTensor[3, S, S] in [0, 1], caption str,
    shape str, colour str, label int (-1 when absent).
    """

    def __init__(self, jsonl_path: PathLike, image_root: Optional[PathLike] = None, image_size: int = 32) -> None:
        check_int("image_size", image_size, minimum=1)
        self.jsonl_path = Path(jsonl_path)
        if not self.jsonl_path.is_file():
            raise FileNotFoundError(f"caption file {str(self.jsonl_path)!r} does not exist")
        self.image_root = Path(image_root) if image_root is not None else self.jsonl_path.parent
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.image_root)!r} does not exist")
        self.image_size = image_size
        self.records: list[ImageCaptionRecord] = self._read_index()

    def _where(self, line: int) -> str:
        return f"{self.jsonl_path}:{line}"

    def _read_index(self) -> list[ImageCaptionRecord]:
        records: list[ImageCaptionRecord] = []
        with open(self.jsonl_path, encoding="utf-8") as fh:
            for line_no, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self._where(line_no)}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{self._where(line_no)}: expected a JSON object, got {type(obj).__name__}")
                for key in ("image", "caption"):
                    if key not in obj:
                        raise ValueError(f"{self._where(line_no)}: missing key {key!r} (need 'image' and 'caption')")
                    check_str(f"{self._where(line_no)}: {key}", obj[key])
                for key in ("shape", "colour"):
                    if key in obj and not isinstance(obj[key], str):
                        raise ValueError(f"{self._where(line_no)}: {key!r} must be a string, got {obj[key]!r}")
                label = check_int(f"{self._where(line_no)}: label", obj.get("label", -1))
                assert label is not None  # allow_none is off: check_int returned an int or raised
                path = Path(obj["image"])
                if not path.is_absolute():
                    path = self.image_root / path
                if not path.is_file():
                    raise FileNotFoundError(f"{self._where(line_no)}: image {str(path)!r} does not exist")
                records.append(
                    ImageCaptionRecord(
                        image_path=path,
                        caption=obj["caption"],
                        line=line_no,
                        shape=obj.get("shape", ""),
                        colour=obj.get("colour", ""),
                        label=label,
                    )
                )
        if not records:
            raise ValueError(f"caption file {str(self.jsonl_path)!r} has no records")
        return records

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, record: ImageCaptionRecord) -> torch.Tensor:
        """Read, convert to RGB and resize one image -> FloatTensor[3, S, S] in [0, 1]."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(record.image_path) as f:
                im = f.convert("RGB")
                if im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(
                f"{self._where(record.line)}: cannot read image {str(record.image_path)!r} ({e})"
            ) from None
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[int(index)]
        return {
            "image": self.load_image(record),
            "caption": record.caption,
            "shape": record.shape,
            "colour": record.colour,
            "label": record.label,
        }
