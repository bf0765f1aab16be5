"""Built-in data for the training jobs; nothing is ever downloaded.

- ``ByteTokenizer``: UTF-8 bytes + PAD/BOS/EOS (vocab 259), for LM and captions;
  ``WordTokenizer``: whole words of a fixed vocabulary (``caption_vocabulary()`` for shapes).
- ``ShapesDataset``: synthetic coloured-shape images with captions and held-out
  shape-colour combos for zero-shot evaluation (LIMoE-style contrastive model).
- ``load_corpus`` / ``LMDataset``: byte-level LM data from the stdlib's source or user text.
- ``ImageCaptionDataset``: user images + JSONL captions, same item dict as shapes.
"""
from .shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    ImageTextCollator,
    ShapesConfig,
    ShapesDataset,
    caption_for,
    caption_vocabulary,
    class_prompts,
    render_shape,
)
from .text import LMDataset, TextCorpus, load_corpus, read_text_files, split_corpus, stdlib_files, stdlib_text
from .tokenizer import BOS, EOS, PAD, VOCAB_SIZE, ByteTokenizer, EncodedBatch, WordTokenizer
from .user import ImageCaptionDataset, ImageCaptionRecord

__all__ = [
    "BOS",
    "COLOURS",
    "EOS",
    "PAD",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "EncodedBatch",
    "ImageCaptionDataset",
    "ImageCaptionRecord",
    "ImageTextCollator",
    "LMDataset",
    "ShapesConfig",
    "ShapesDataset",
    "TextCorpus",
    "WordTokenizer",
    "caption_for",
    "caption_vocabulary",
    "class_prompts",
    "load_corpus",
    "read_text_files",
    "render_shape",
    "split_corpus",
    "stdlib_files",
    "stdlib_text",
]
