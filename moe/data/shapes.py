"""Synthetic image-caption pairs ("coloured shapes") for a LIMoE-style contrastive model.

Each image shows one shape (circle, square, ...) in one saturated colour, at one
size (small / large) and one position (left / right / top / bottom / center), on a
dark background with a little noise. Its caption says the same in words, e.g.
"a large red circle on the left". A fixed set of shape-colour combinations is held
out of training: the ``"zeroshot"`` split shows only those, so a model that learnt
"red" and "circle" separately can name a red circle it never saw.

Everything is rasterised with numpy and fully determined by
``(config.seed, split, index)``, whatever order items are read in. The training
options ``partial_captions`` and ``colour_jitter`` draw from generators of their own,
so at 0 every item is what it was without them.

Legend: B = batch size, S = ``image_size`` (images are RGB, [3, S, S]),
L = text length in tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from parallel.rng import data_rng

from ..config_build import FromDict
from parallel.checks import check_choice, check_int, check_number, fail
from .tokenizer import ByteTokenizer

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "SPLITS",
    "HELDOUT_PICKS",
    "ShapesConfig",
    "caption_vocabulary",
    "ShapesDataset",
    "ImageTextCollator",
    "class_prompts",
    "render_shape",
    "caption_for",
]

# Shapes that can be drawn; the default config uses the first five.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")

# Saturated, well-separated RGB colours in [0, 1]; the default config uses the first five.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.65, 0.15, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.90, 0.90),
    "white": (0.95, 0.95, 0.95),
}

# Shape "radius" as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.17, "large": 0.28}

# Shape centre (x, y) as fractions of the image side; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.30, 0.50),
    "right": (0.70, 0.50),
    "top": (0.50, 0.30),
    "bottom": (0.50, 0.70),
    "center": (0.50, 0.50),
}

# How a position reads in a caption.
_POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# Caption templates. Every template names the colour and the shape.
_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "{colour} {shape}, {size}, {where}",
    "a {colour} {shape}",
    "{size} {colour} {shape} {where}",
    "a photo of a {size} {colour} {shape}",
    "a {colour} {shape} {where}",
)

# Captions that name ONE attribute (used with probability ``ShapesConfig.partial_captions``).
_COLOUR_ONLY_TEMPLATES: tuple[str, ...] = ("a {colour} shape", "something {colour} {where}")
_SHAPE_ONLY_TEMPLATES: tuple[str, ...] = ("a {shape}", "a {size} {shape} {where}")

# Class prompts for zero-shot classification.
_PROMPT = "a photo of a {colour} {shape}"

SPLITS: tuple[str, ...] = ("train", "val", "zeroshot")

# How ``heldout_fraction`` picks the held-out combos (see ShapesConfig.heldout_pick).
HELDOUT_PICKS: tuple[str, ...] = ("diagonals", "random")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}

_SUPERSAMPLE = 2  # sub-pixels per pixel side, for soft (anti-aliased) edges

Combo = tuple[str, str]  # (shape, colour)


# --------------------------------------------------------------------------- config


def _names(path: str, value: Any, allowed: Sequence[str], *, minimum: int) -> tuple[str, ...]:
    """A list of distinct names from ``allowed``, at least ``minimum`` of them."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        fail(path, value, "it must be a list of names", wrong_type=True)
    names = tuple(value)
    for name in names:
        if name not in allowed:
            fail(path, list(names), f"it contains {name!r}; allowed names: {', '.join(map(repr, allowed))}")
    if len(set(names)) != len(names):
        fail(path, list(names), "it has duplicates; each name may appear once")
    if len(names) < minimum:
        fail(path, list(names), f"it needs at least {minimum} names")
    return names


@dataclass(frozen=True)
class ShapesConfig(FromDict):
    """What the synthetic shapes look like and which combinations are held out.

    Fields:
      image_size: side of the square image in pixels (>= 8).
      shapes / colours / sizes / positions: names drawn from ``SHAPES``, ``COLOURS``,
        ``SIZES``, ``POSITIONS`` (at least 2 shapes and 2 colours).
      heldout: explicit held-out ``(shape, colour)`` pairs, or None to pick them
        from ``heldout_fraction`` and ``heldout_seed``.
      heldout_fraction: share of all shape-colour combos held out when ``heldout``
        is None, in [0, 1). When > 0 at least one combo per shape and per colour is
        held out (so the zero-shot split tests every name), while every shape and
        every colour still appears in training.
      heldout_seed: picks which combos are held out (independent of ``seed``).
      heldout_pick: how ``heldout_fraction`` is turned into combos: ``"diagonals"``
        holds out whole seeded "diagonals" of the shape x colour grid (each covers every
        shape and every colour once), so with as many shapes as colours each shape and
        each colour is held out equally often (5 x 5 at 0.4: twice each, 10 combos);
        ``"random"`` (the earlier picker) holds out one diagonal and then seeded random
        combos (at 0.4 a shape or colour may be held out 1 to 4 times). Both give the
        same 5 combos at 0.2 on 5 x 5.
      partial_captions: probability in [0, 1] that a TRAIN caption names only the
        colour ("a red shape") or only the shape ("a circle"), half and half; val and
        zero-shot captions always name both. 0 keeps every item as before.
      seed: seeds the pixels, positions and captions of every item.
      noise: std of the Gaussian pixel noise, in [0, 0.5].
      jitter: random shift of the centre, as a fraction of the image side, in [0, 0.1].
      colour_jitter: augmentation of TRAIN images: each channel of the shape's RGB moves by
        a uniform amount in [-colour_jitter, colour_jitter] (clipped to [0, 1]), in [0, 0.3];
        0 keeps every item as before.
    """

    image_size: int = 32
    shapes: tuple[str, ...] = SHAPES[:5]
    colours: tuple[str, ...] = tuple(COLOURS)[:5]
    sizes: tuple[str, ...] = tuple(SIZES)
    positions: tuple[str, ...] = tuple(POSITIONS)
    heldout: Optional[tuple[Combo, ...]] = None
    heldout_fraction: float = 0.2
    heldout_seed: int = 0
    heldout_pick: str = "diagonals"
    partial_captions: float = 0.0
    seed: int = 0
    noise: float = 0.03
    jitter: float = 0.02
    colour_jitter: float = 0.0
    _heldout: tuple[Combo, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        p = "ShapesConfig"
        set_("image_size", check_int(f"{p}.image_size", self.image_size, minimum=8))
        set_("shapes", _names(f"{p}.shapes", self.shapes, SHAPES, minimum=2))
        set_("colours", _names(f"{p}.colours", self.colours, tuple(COLOURS), minimum=2))
        set_("sizes", _names(f"{p}.sizes", self.sizes, tuple(SIZES), minimum=1))
        set_("positions", _names(f"{p}.positions", self.positions, tuple(POSITIONS), minimum=1))
        set_("heldout_fraction", check_number(f"{p}.heldout_fraction", self.heldout_fraction, minimum=0.0,
                                              maximum=1.0, max_open=True))
        set_("heldout_seed", check_int(f"{p}.heldout_seed", self.heldout_seed, minimum=0))
        set_("heldout_pick", check_choice(f"{p}.heldout_pick", self.heldout_pick, HELDOUT_PICKS))
        set_("partial_captions", check_number(f"{p}.partial_captions", self.partial_captions, minimum=0.0,
                                              maximum=1.0))
        set_("seed", check_int(f"{p}.seed", self.seed, minimum=0))
        set_("noise", check_number(f"{p}.noise", self.noise, minimum=0.0, maximum=0.5))
        set_("jitter", check_number(f"{p}.jitter", self.jitter, minimum=0.0, maximum=0.1))
        set_("colour_jitter", check_number(f"{p}.colour_jitter", self.colour_jitter, minimum=0.0, maximum=0.3))
        if self.heldout is None:
            held = self._pick_heldout()
        else:
            held = self._check_heldout(self.heldout)
            set_("heldout", held)
        set_("_heldout", held)

    # -- held-out combos ------------------------------------------------------

    def _check_heldout(self, heldout: Any) -> tuple[Combo, ...]:
        H = "ShapesConfig.heldout"
        if isinstance(heldout, str) or not isinstance(heldout, (list, tuple)):
            fail(H, heldout, "it must be a list of (shape, colour) pairs or null", wrong_type=True)
        pairs: list[Combo] = []
        for item in heldout:
            if isinstance(item, str) or not isinstance(item, (list, tuple)) or len(item) != 2:
                fail(H, heldout, f"it contains {item!r}; each entry must be a (shape, colour) pair")
            shape, colour = item
            if shape not in self.shapes:
                fail(H, heldout, f"it contains shape {shape!r}, which is not in shapes={list(self.shapes)!r}")
            if colour not in self.colours:
                fail(H, heldout, f"it contains colour {colour!r}, which is not in colours={list(self.colours)!r}")
            if (shape, colour) in pairs:
                fail(H, heldout, f"it lists ({shape!r}, {colour!r}) twice")
            pairs.append((shape, colour))
        held = set(pairs)
        for s in self.shapes:
            if all((s, c) in held for c in self.colours):
                fail(H, heldout, f"it holds out every colour of shape {s!r}; training must see each shape")
        for c in self.colours:
            if all((s, c) in held for s in self.shapes):
                fail(H, heldout, f"it holds out every shape in colour {c!r}; training must see each colour")
        # Keep the canonical (shape-major) order so class indices are stable.
        return tuple(p for p in self.all_combos() if p in held)

    def _pick_heldout(self) -> tuple[Combo, ...]:
        """Deterministically choose ``round(fraction * n_shapes * n_colours)`` combos (at least
        max(n_shapes, n_colours)).

        First a "diagonal" that covers every shape and every colour once
        (shape ``i % n_shapes`` with colour ``(i + offset) % n_colours`` for i < max(n_shapes, n_colours),
        offset 0, on seeded permutations). ``heldout_pick="diagonals"`` then adds whole diagonals
        of other seeded offsets while they fit the target and leave every shape and colour
        at least one training combo; both pickers then add seeded single combos under
        the same rule until the target is reached (or nothing fits).
        """
        if self.heldout_fraction == 0.0:
            return ()
        n_s, n_c = len(self.shapes), len(self.colours)
        rng = data_rng(self.heldout_seed, 7919)
        shapes = [self.shapes[i] for i in rng.permutation(n_s)]
        colours = [self.colours[i] for i in rng.permutation(n_c)]

        def diagonal(offset: int) -> set[Combo]:
            return {(shapes[i % n_s], colours[(i + offset) % n_c]) for i in range(max(n_s, n_c))}

        held = diagonal(0)
        target = max(len(held), round(self.heldout_fraction * n_s * n_c))
        if self.heldout_pick == "diagonals":
            offsets = data_rng(self.heldout_seed, 104723).permutation(np.arange(1, n_c))
            for offset in offsets.tolist():
                more = held | diagonal(offset)
                if len(more) <= target and self._keeps_training_combos(more):
                    held = more
        candidates = [p for p in self.all_combos() if p not in held]
        for k in rng.permutation(len(candidates)):
            if len(held) >= target:
                break
            s, c = candidates[k]
            shape_left = sum((s, c2) not in held for c2 in self.colours)
            colour_left = sum((s2, c) not in held for s2 in self.shapes)
            if shape_left > 1 and colour_left > 1:
                held.add((s, c))
        return tuple(p for p in self.all_combos() if p in held)

    def _keeps_training_combos(self, held: set[Combo]) -> bool:
        """Whether every shape and every colour keeps at least one combo outside ``held``."""
        return (all(any((s, c) not in held for c in self.colours) for s in self.shapes)
                and all(any((s, c) not in held for s in self.shapes) for c in self.colours))

    def all_combos(self) -> tuple[Combo, ...]:
        """Every (shape, colour) pair, shape-major."""
        return tuple((s, c) for s in self.shapes for c in self.colours)

    def heldout_combos(self) -> tuple[Combo, ...]:
        """The (shape, colour) pairs never shown in training (the zero-shot classes)."""
        return self._heldout

    def train_combos(self) -> tuple[Combo, ...]:
        """The (shape, colour) pairs the train and val splits draw from."""
        held = set(self._heldout)
        return tuple(p for p in self.all_combos() if p not in held)

    def combos_for(self, split: str) -> tuple[Combo, ...]:
        """Combos a split draws from: train combos for "train"/"val", held-out for "zeroshot"."""
        check_choice("split", split, SPLITS)
        return self.heldout_combos() if split == "zeroshot" else self.train_combos()

    @classmethod
    def dict_kwargs(cls, kw: dict, path: str) -> dict:
        """``from_dict``'s hook: YAML lists of ``heldout`` pairs as tuples."""
        if isinstance(kw.get("heldout"), (list, tuple)):
            kw = {**kw, "heldout": tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in kw["heldout"])}
        return super().dict_kwargs(kw, path)


# --------------------------------------------------------------------------- drawing


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean inside-test of ``shape`` with "radius" r for offsets (dx, dy) from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.82 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex up, base below the centre
        top, base = -r, 0.85 * r
        half_width = r * (dy - top) / (base - top)
        return (dy >= top) & (dy <= base) & (np.abs(dx) <= half_width)
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    raise ValueError(f"shape={shape!r} is not allowed; choose from {', '.join(map(repr, SHAPES))}")


def render_shape(
    shape: str,
    colour: str,
    size: str,
    position: str,
    *,
    image_size: int = 32,
    rng: Optional[np.random.Generator] = None,
    noise: float = 0.0,
    jitter: float = 0.0,
    colour_shift: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one shape; returns ``(image float32[3, S, S] in [0, 1], coverage float32[S, S] in [0, 1])``.

    ``coverage`` is the share of each pixel inside the shape (soft at the edges).
    ``rng`` drives the background tint, centre jitter and pixel noise; without it the
    drawing is noise-free and exactly centred. ``colour_shift`` (float[3], optional) is
    added to the colour's RGB (then clipped to [0, 1]).
    """
    check_choice("shape", shape, SHAPES)
    check_choice("colour", colour, COLOURS)
    check_choice("size", size, SIZES)
    check_choice("position", position, POSITIONS)
    n = image_size
    cx, cy = POSITIONS[position]
    r = SIZES[size]
    background = np.full(3, 0.06, dtype=np.float32)
    if rng is not None:
        cx += rng.uniform(-jitter, jitter)
        cy += rng.uniform(-jitter, jitter)
        r *= rng.uniform(0.95, 1.05)
        background = background + rng.uniform(0.0, 0.06, size=3).astype(np.float32)
    # Sub-pixel centres in [0, 1] image units, then average sub-pixels per pixel.
    m = n * _SUPERSAMPLE
    coords = (np.arange(m, dtype=np.float32) + 0.5) / m
    dy, dx = np.meshgrid(coords - cy, coords - cx, indexing="ij")
    inside = _mask(shape, dx, dy, r).astype(np.float32)
    coverage = inside.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).mean(axis=(1, 3))
    rgb = np.asarray(COLOURS[colour], dtype=np.float32)
    if colour_shift is not None:  # an augmentation: the shape's RGB moved by up to a few hundredths per channel
        rgb = np.clip(rgb + np.asarray(colour_shift, dtype=np.float32), 0.0, 1.0)
    image = background[:, None, None] * (1.0 - coverage) + rgb[:, None, None] * coverage
    if rng is not None and noise > 0:
        image = image + rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), coverage


def caption_for(shape: str, colour: str, size: str, position: str, template: int = 0) -> str:
    """Caption text for one item, from template number ``template`` (0..5)."""
    check_int("template", template, minimum=0, maximum=len(_TEMPLATES) - 1)
    return _TEMPLATES[template].format(
        shape=shape, colour=colour, size=size, where=_POSITION_PHRASES[position]
    )


def partial_caption_for(shape: str, colour: str, size: str, position: str, template: int = 0) -> str:
    """A caption that names ONE attribute: templates 0-1 only the colour, 2-3 only the shape."""
    partial = _COLOUR_ONLY_TEMPLATES + _SHAPE_ONLY_TEMPLATES
    check_int("template", template, minimum=0, maximum=len(partial) - 1)
    return partial[template].format(shape=shape, colour=colour, size=size, where=_POSITION_PHRASES[position])


def class_prompts(combos: Sequence[Combo]) -> list[str]:
    """One prompt per (shape, colour) class, e.g. "a photo of a red circle"."""
    return [_PROMPT.format(colour=colour, shape=shape) for shape, colour in combos]


def caption_vocabulary() -> tuple[str, ...]:
    """Every word and punctuation mark any shapes caption or class prompt can contain (all shapes,
    colours, sizes and positions, not only a config's), in a fixed order: the vocabulary of
    ``WordTokenizer`` for ``text_tokenizer: words``."""
    texts = [*SHAPES, *COLOURS, *SIZES, *_POSITION_PHRASES.values(), *_TEMPLATES, *_COLOUR_ONLY_TEMPLATES,
             *_SHAPE_ONLY_TEMPLATES, _PROMPT]
    words: dict[str, None] = {}
    for text in texts:
        for piece in re.findall(r"[0-9a-z]+|[^\s0-9a-z{}]", re.sub(r"\{[a-z]+\}", " ", text)):
            words.setdefault(piece, None)
    return tuple(words)


# --------------------------------------------------------------------------- dataset


class ShapesDataset(Dataset):
    """Coloured-shape images with captions, deterministic per ``(config.seed, split, index)``.

    Splits: ``"train"`` and ``"val"`` draw from ``config.train_combos()`` (different
    item streams); ``"zeroshot"`` draws only from ``config.heldout_combos()``.

    Each item is a dict:
      image:   FloatTensor[3, S, S] in [0, 1]
      caption: str (<= 48 UTF-8 bytes), naming colour and shape (only one of them for a
               train item drawn with ``partial_captions``)
      shape:   str, colour: str
      label:   int, index of (shape, colour) in ``self.classes``

    ``self.classes`` is the split's combo list; ``class_prompts(self.classes)`` gives
    one text per class for zero-shot classification.
    """

    def __init__(self, config: Optional[ShapesConfig] = None, split: str = "train", size: int = 10_000) -> None:
        self.config = config if config is not None else ShapesConfig()
        if not isinstance(self.config, ShapesConfig):
            raise TypeError(f"config must be a ShapesConfig, got {type(self.config).__name__}")
        self.classes: tuple[Combo, ...] = self.config.combos_for(split)  # validates split
        self.split = split
        check_int("ShapesDataset.size", size, minimum=1)
        self.size = size
        if not self.classes:
            raise ValueError(
                f"split={split!r} has no shape-colour combos (heldout_fraction={self.config.heldout_fraction}, "
                f"heldout={self.config.heldout!r}); set heldout_fraction > 0 or list heldout combos"
            )

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        return data_rng(self.config.seed, _SPLIT_IDS[self.split], index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.size}")
        index %= self.size
        cfg = self.config
        rng = self._rng(index)
        label = int(rng.integers(len(self.classes)))
        shape, colour = self.classes[label]
        size = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
        position = cfg.positions[int(rng.integers(len(cfg.positions)))]
        template = int(rng.integers(len(_TEMPLATES)))
        shift = None
        if cfg.colour_jitter > 0 and self.split == "train":
            # A generator of its own: with colour_jitter 0 every item is what it was before the setting existed.
            shift = data_rng(cfg.seed, _SPLIT_IDS[self.split], index, 0xC01).uniform(
                -cfg.colour_jitter, cfg.colour_jitter, size=3)
        image, _ = render_shape(
            shape, colour, size, position, image_size=cfg.image_size, rng=rng, noise=cfg.noise, jitter=cfg.jitter,
            colour_shift=shift,
        )
        caption = caption_for(shape, colour, size, position, template)
        if cfg.partial_captions > 0 and self.split == "train":
            # A generator of its own, so the image and the full caption do not depend on this setting.
            prng = data_rng(cfg.seed, _SPLIT_IDS[self.split], index, 0x9A27)
            if prng.random() < cfg.partial_captions:
                caption = partial_caption_for(shape, colour, size, position,
                                              int(prng.integers(len(_COLOUR_ONLY_TEMPLATES) + len(_SHAPE_ONLY_TEMPLATES))))
        return {
            "image": torch.from_numpy(image),
            "caption": caption,
            "shape": shape,
            "colour": colour,
            "label": label,
        }

    def prompts(self) -> list[str]:
        """``class_prompts(self.classes)``: one text per class of this split."""
        return class_prompts(self.classes)


# --------------------------------------------------------------------------- collate


class ImageTextCollator:
    """Stack items (ShapesDataset or user data) into a batch, tokenising captions.

    Output dict:
      image:   FloatTensor[B, 3, S, S]
      tokens:  LongTensor[B, L]  (ByteTokenizer ids, PAD-padded / truncated to L = text_length)
      mask:    BoolTensor[B, L]  (True on real tokens)
      label:   LongTensor[B]     (-1 where the item has no class)
      caption, shape, colour: list[str] of length B
    """

    def __init__(
        self,
        text_length: int = 48,
        *,
        add_bos: bool = False,
        add_eos: bool = True,
        tokenizer: Optional[ByteTokenizer] = None,
    ) -> None:
        check_int("ImageTextCollator.text_length", text_length, minimum=1)
        self.text_length = text_length
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        captions = [it["caption"] for it in items]
        enc = self.tokenizer.encode_batch(captions, self.text_length, add_bos=self.add_bos, add_eos=self.add_eos)
        return {
            "image": torch.stack([it["image"] for it in items]),
            "tokens": enc.ids,
            "mask": enc.mask,
            "label": torch.tensor([int(it.get("label", -1)) for it in items], dtype=torch.long),
            "caption": captions,
            "shape": [it.get("shape", "") for it in items],
            "colour": [it.get("colour", "") for it in items],
        }
