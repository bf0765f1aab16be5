"""Tests for moe.data: tokenizer, synthetic shapes, stdlib/user text corpus, user image captions."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from moe.data import (
    BOS,
    COLOURS,
    EOS,
    PAD,
    ByteTokenizer,
    ImageCaptionDataset,
    ImageTextCollator,
    LMDataset,
    ShapesConfig,
    ShapesDataset,
    caption_for,
    class_prompts,
    load_corpus,
    read_text_files,
    render_shape,
    split_corpus,
    stdlib_text,
)

# ------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🙂\n\ttabs"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == BOS and ids[-1] == EOS
    assert all(0 <= i < 256 for i in ids[1:-1])
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text
    assert tok.vocab_size == 259 and (PAD, BOS, EOS) == (256, 257, 258)


def test_tokenizer_decode_invalid_utf8_and_bad_ids():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, ord("a"), PAD]) == "\ufffda"
    with pytest.raises(ValueError, match="259"):
        tok.decode([259])


def test_tokenizer_encode_batch_pads_and_truncates():
    tok = ByteTokenizer()
    enc = tok.encode_batch(["ab", "", "abcdefgh"], length=5, add_eos=True)
    assert enc.ids.shape == (3, 5) and enc.ids.dtype == torch.long
    assert enc.ids[0].tolist() == [97, 98, EOS, PAD, PAD]
    assert enc.ids[1].tolist() == [EOS, PAD, PAD, PAD, PAD]
    assert enc.ids[2].tolist() == [97, 98, 99, 100, 101]
    assert enc.lengths.tolist() == [3, 1, 5]
    assert (enc.ids[~enc.mask] == PAD).all()
    assert tok.decode_batch(enc.ids) == ["ab", "", "abcde"]
    with pytest.raises(ValueError, match="config key 'length': got 0; it must be >= 1"):
        tok.encode_batch(["a"], length=0)


# ------------------------------------------------------------------ shapes config


def test_default_heldout_covers_every_shape_and_colour_and_leaves_them_in_training():
    cfg = ShapesConfig()
    held, train = set(cfg.heldout_combos()), set(cfg.train_combos())
    assert len(held) == round(0.2 * len(cfg.all_combos()))
    assert held.isdisjoint(train) and held | train == set(cfg.all_combos())
    assert {s for s, _ in held} == set(cfg.shapes) and {c for _, c in held} == set(cfg.colours)
    assert {s for s, _ in train} == set(cfg.shapes) and {c for _, c in train} == set(cfg.colours)
    # Fixed: same choice every time, independent of the data seed.
    assert ShapesConfig(seed=5).heldout_combos() == cfg.heldout_combos()


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_heldout_fraction_other_sizes(fraction):
    cfg = ShapesConfig(shapes=("circle", "square", "cross"), colours=tuple(COLOURS)[:6], heldout_fraction=fraction)
    held, train = cfg.heldout_combos(), cfg.train_combos()
    assert len(held) >= 6  # at least one per colour
    assert {c for _, c in held} == set(cfg.colours) and {s for s, _ in held} == set(cfg.shapes)
    assert {c for _, c in train} == set(cfg.colours) and {s for s, _ in train} == set(cfg.shapes)


def test_explicit_heldout():
    cfg = ShapesConfig(heldout=[("circle", "red"), ["ring", "blue"]])
    assert cfg.heldout_combos() == (("circle", "red"), ("ring", "blue"))
    assert ShapesConfig.from_dict({"heldout": [["circle", "red"]], "seed": 3}).heldout_combos() == (
        ("circle", "red"),
    )


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"image_size": 4}, ValueError, r"config key 'ShapesConfig.image_size': got 4; it must be >= 8"),
        ({"image_size": 32.0}, TypeError, r"'ShapesConfig.image_size': got 32.0; it must be an integer"),
        ({"shapes": ("circle", "hexagon")}, ValueError, "'ShapesConfig.shapes'.*contains 'hexagon'.*allowed"),
        ({"shapes": ("circle",)}, ValueError, "'ShapesConfig.shapes'.*at least 2"),
        ({"colours": ("red", "red", "blue")}, ValueError, "'ShapesConfig.colours'.*duplicates"),
        ({"colours": ("red", "mauve")}, ValueError, "'ShapesConfig.colours'.*contains 'mauve'"),
        ({"colours": "red"}, TypeError, "'ShapesConfig.colours': got 'red'"),
        ({"positions": ("middle",)}, ValueError, "'ShapesConfig.positions'.*contains 'middle'"),
        ({"heldout_fraction": 1.0}, ValueError, r"'ShapesConfig.heldout_fraction': got 1.0; it must be in \[0.0, 1.0\)"),
        ({"noise": -0.1}, ValueError, r"'ShapesConfig.noise': got -0.1; it must be in \[0.0, 0.5\]"),
        ({"heldout": [("circle", "mauve")]}, ValueError, "colour 'mauve'"),
        ({"heldout": [("circle",)]}, ValueError, "pair"),
        ({"heldout": [("circle", c) for c in ("red", "green", "blue", "yellow", "purple")]}, ValueError,
         "every colour of shape 'circle'"),
    ],
)
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ShapesConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="config key 'ShapesConfig.colors' is not known; allowed keys at "
                                         "'ShapesConfig': image_size, shapes, colours"):
        ShapesConfig.from_dict({"colors": ["red"]})
    with pytest.raises(ValueError, match=r"config key 'data.shapes.seed': got -1; it must be >= 0"):
        ShapesConfig.from_dict({"seed": -1}, "data.shapes")


def test_dataset_argument_errors():
    with pytest.raises(ValueError, match="config key 'split': got 'test'; allowed values: 'train', 'val', 'zeroshot'"):
        ShapesDataset(split="test")
    with pytest.raises(ValueError, match="'ShapesDataset.size': got 0"):
        ShapesDataset(size=0)
    with pytest.raises(ValueError, match="no shape-colour combos"):
        ShapesDataset(ShapesConfig(heldout_fraction=0.0), split="zeroshot")
    with pytest.raises(IndexError):
        ShapesDataset(size=3)[3]


# ------------------------------------------------------------------ shapes dataset


def _same(a, b):
    return torch.equal(a["image"], b["image"]) and all(a[k] == b[k] for k in ("caption", "shape", "colour", "label"))


def test_items_deterministic_regardless_of_access_order():
    cfg = ShapesConfig(seed=11)
    ds1, ds2 = ShapesDataset(cfg, size=50), ShapesDataset(ShapesConfig(seed=11), size=50)
    forward = [ds1[i] for i in range(50)]
    backward = [ds2[i] for i in reversed(range(50))][::-1]
    assert all(_same(a, b) for a, b in zip(forward, backward))
    assert _same(ds1[7], ds1[7]) and _same(ds1[-1], forward[-1])
    other = ShapesDataset(ShapesConfig(seed=12), size=50)
    assert sum(_same(forward[i], other[i]) for i in range(50)) < 5
    assert not torch.equal(ShapesDataset(cfg, "val", size=5)[0]["image"], forward[0]["image"])


def test_heldout_only_in_zeroshot_split():
    cfg = ShapesConfig()
    held = set(cfg.heldout_combos())
    train = ShapesDataset(cfg, "train", size=400)
    val = ShapesDataset(cfg, "val", size=100)
    zs = ShapesDataset(cfg, "zeroshot", size=100)
    train_items = [train[i] for i in range(len(train))]
    seen_train = {(it["shape"], it["colour"]) for it in train_items}
    seen_val = {(val[i]["shape"], val[i]["colour"]) for i in range(len(val))}
    seen_zs = {(zs[i]["shape"], zs[i]["colour"]) for i in range(len(zs))}
    assert seen_train.isdisjoint(held) and seen_val.isdisjoint(held)
    assert seen_zs == held
    assert seen_train == set(cfg.train_combos())
    assert {s for s, _ in seen_train} == set(cfg.shapes) and {c for _, c in seen_train} == set(cfg.colours)
    # Labels index the split's own class list; sizes, positions and templates all occur.
    assert all(train.classes[it["label"]] == (it["shape"], it["colour"]) for it in train_items)
    assert all(zs.classes[zs[i]["label"]] == (zs[i]["shape"], zs[i]["colour"]) for i in range(20))
    assert len(Counter(it["caption"].split(" ")[0] for it in train_items)) > 3


def test_captions_name_shape_and_colour_and_are_short():
    ds = ShapesDataset(size=300)
    for i in range(len(ds)):
        it = ds[i]
        words = it["caption"].replace(",", "").split()
        assert it["shape"] in words and it["colour"] in words
        assert len(it["caption"].encode()) <= 48
    # All templates x all options stay short.
    longest = max(
        len(caption_for(s, c, z, p, t).encode())
        for s in ("triangle", "diamond") for c in COLOURS for z in ("small", "large")
        for p in ("bottom", "center") for t in range(6)
    )
    assert longest <= 48
    with pytest.raises(ValueError, match=r"config key 'template': got 6; it must be in \[0, 5\]"):
        caption_for("circle", "red", "small", "center", 6)


def test_class_prompts():
    cfg = ShapesConfig()
    zs = ShapesDataset(cfg, "zeroshot", size=4)
    assert class_prompts([("circle", "red")]) == ["a photo of a red circle"]
    assert zs.prompts() == class_prompts(cfg.heldout_combos())
    assert len(set(zs.prompts())) == len(zs.classes)


def test_image_pixels_have_the_named_colour():
    ds = ShapesDataset(ShapesConfig(seed=3), size=60)
    for i in range(len(ds)):
        it = ds[i]
        img = it["image"]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        bright = img.max(dim=0).values > 0.5  # the shape; background is dark
        frac = float(bright.float().mean())
        assert 0.03 < frac < 0.6, (it["caption"], frac)
        mean_rgb = img[:, bright].median(dim=1).values  # median: robust to soft edges
        target = torch.tensor(COLOURS[it["colour"]])
        assert float((mean_rgb - target).abs().max()) < 0.1, (it["colour"], mean_rgb)
        # Nearest palette colour is the named one.
        nearest = min(COLOURS, key=lambda c: float((torch.tensor(COLOURS[c]) - mean_rgb).norm()))
        assert nearest == it["colour"]
        assert float(img[:, ~bright].mean()) < 0.2


def test_render_shape_geometry():
    """Noise-free renders: sizes differ, positions land where named, shapes differ."""
    cov = {}
    for shape in ("circle", "square", "triangle", "cross", "ring", "diamond"):
        for size in ("small", "large"):
            img, c = render_shape(shape, "red", size, "center")
            assert img.shape == (3, 32, 32) and c.shape == (32, 32)
            cov[shape, size] = c
        assert cov[shape, "large"].sum() > 1.8 * cov[shape, "small"].sum()
    masks = [cov[s, "large"] > 0.5 for s in ("circle", "square", "triangle", "cross", "ring")]
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            assert (masks[a] != masks[b]).sum() > 20
    ys, xs = np.nonzero(render_shape("circle", "blue", "small", "left")[1] > 0.5)
    assert xs.mean() < 13 and abs(ys.mean() - 15.5) < 1.5
    ys, xs = np.nonzero(render_shape("circle", "blue", "small", "bottom")[1] > 0.5)
    assert ys.mean() > 19 and abs(xs.mean() - 15.5) < 1.5
    with pytest.raises(ValueError, match="config key 'shape': got 'blob'; allowed values: 'circle', "):
        render_shape("blob", "red", "small", "left")
    with pytest.raises(ValueError, match="config key 'size': got 'huge'; allowed values: 'small', 'large'"):
        render_shape("circle", "red", "huge", "left")


def test_collator_batches_images_and_tokens():
    ds = ShapesDataset(ShapesConfig(image_size=16), size=8)
    batch = ImageTextCollator(text_length=48)([ds[i] for i in range(8)])
    assert batch["image"].shape == (8, 3, 16, 16)
    assert batch["tokens"].shape == (8, 48) and batch["mask"].shape == (8, 48)
    assert batch["label"].dtype == torch.long and batch["label"].shape == (8,)
    tok = ByteTokenizer()
    assert tok.decode_batch(batch["tokens"]) == batch["caption"]
    assert (batch["tokens"][batch["mask"]] != PAD).all()


def test_dataloader_with_workers_matches_direct_access():
    ds = ShapesDataset(size=12)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ImageTextCollator(), shuffle=False)
    images = torch.cat([b["image"] for b in loader])
    assert torch.equal(images, torch.stack([ds[i]["image"] for i in range(12)]))


# ------------------------------------------------------------------ text corpus


def test_stdlib_corpus_nonempty_deterministic_and_split_disjoint():
    data = stdlib_text(max_bytes=200_000)
    assert len(data) == 200_000 and b"def " in data and b"import " in data
    assert stdlib_text(max_bytes=200_000) == data
    corpus = split_corpus(data, val_fraction=0.1, block_size=4096, seed=0)
    assert corpus.train.numel() + corpus.val.numel() == len(data)
    assert corpus.val.numel() > 0 and corpus.train.numel() > corpus.val.numel()
    # Disjoint byte ranges: each split is a subsequence of whole blocks of the original.
    blocks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    val_bytes = bytes(corpus.val.tolist())
    train_bytes = bytes(corpus.train.tolist())
    val_blocks = [b for b in blocks if b in val_bytes and b not in train_bytes]
    assert sum(map(len, val_blocks)) == len(val_bytes)
    again = split_corpus(data, val_fraction=0.1, block_size=4096, seed=0)
    assert torch.equal(again.val, corpus.val)
    assert not torch.equal(split_corpus(data, val_fraction=0.1, block_size=4096, seed=1).val, corpus.val)


def test_lm_dataset_windows():
    corpus = load_corpus("stdlib", max_bytes=100_000, block_size=4096)
    ds = LMDataset(corpus.train, seq_len=64, size=100, seed=0)
    x = ds[5]
    assert x.shape == (65,) and x.dtype == torch.long and int(x.max()) < 256
    assert torch.equal(ds[5], LMDataset(corpus.train, seq_len=64, size=100, seed=0)[5])
    assert not torch.equal(ds[5], LMDataset(corpus.train, seq_len=64, size=100, seed=1)[5])
    # The window is a contiguous slice of the corpus.
    raw = bytes(corpus.train.tolist())
    assert bytes(x.tolist()) in raw
    with pytest.raises(ValueError, match="fewer than seq_len"):
        LMDataset(b"short", seq_len=10)
    with pytest.raises(ValueError, match="config key 'seq_len': got 0; it must be >= 1"):
        LMDataset(b"short", seq_len=0)
    with pytest.raises(TypeError, match="config key 'size': got 2.5; it must be an integer"):
        LMDataset(b"short", seq_len=2, size=2.5)
    with pytest.raises(ValueError, match=r"config key 'val_fraction': got 1.0; it must be in \[0, 1\)"):
        split_corpus(b"some text", val_fraction=1.0)
    with pytest.raises(ValueError, match="config key 'block_size': got 0; it must be >= 1"):
        split_corpus(b"some text", block_size=0)
    with pytest.raises(TypeError, match="config key 'max_bytes': got '10'; it must be an integer or null"):
        stdlib_text(max_bytes="10")
    with pytest.raises(IndexError):
        ds[100]


def test_user_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("second file " * 50, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("héllo " * 50, encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not read")
    data = read_text_files(tmp_path)
    assert data.startswith(b"second file") and "héllo".encode() in data and b"not read" not in data
    assert read_text_files([tmp_path / "b.txt"], max_bytes=11) == b"second file"
    corpus = load_corpus(tmp_path, max_bytes=None, val_fraction=0.2, block_size=64)
    assert corpus.train.numel() + corpus.val.numel() == len(data)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text_files([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        read_text_files(tmp_path / "empty.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        read_text_files(tmp_path / "nothing")


# ------------------------------------------------------------------ user image captions


def _write_png(path, rgb, size=(20, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).convert(mode).save(path)


def test_user_jsonl_dataset(tmp_path):
    _write_png(tmp_path / "img" / "red.png", (255, 0, 0))
    _write_png(tmp_path / "img" / "grey.png", (128, 128, 128), mode="L")
    lines = [
        {"image": "img/red.png", "caption": "a red box", "shape": "square", "colour": "red", "label": 3},
        {"image": "img/grey.png", "caption": "ein graues Bild ü"},
    ]
    index = tmp_path / "captions.jsonl"
    index.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n", encoding="utf-8")
    ds = ImageCaptionDataset(index, image_size=16)
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert set(a) == set(ShapesDataset(size=1)[0])
    assert a["image"].shape == (3, 16, 16) and a["image"].dtype == torch.float32
    assert torch.allclose(a["image"][:, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(b["image"][:, 0, 0], torch.full((3,), 128 / 255))
    assert (a["caption"], a["shape"], a["colour"], a["label"]) == ("a red box", "square", "red", 3)
    assert (b["caption"], b["shape"], b["colour"], b["label"]) == ("ein graues Bild ü", "", "", -1)
    batch = ImageTextCollator(text_length=24)([a, b])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].tolist() == [3, -1]


@pytest.mark.parametrize(
    "content, exc, match",
    [
        ('{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": }\n', ValueError, r"bad\.jsonl:2.*invalid JSON"),
        ('{"image": "a.png"}\n', ValueError, r"bad\.jsonl:1.*missing key 'caption'"),
        ('\n{"caption": "x"}\n', ValueError, r"bad\.jsonl:2.*missing key 'image'"),
        ('{"image": "nope.png", "caption": "x"}\n', FileNotFoundError, r"bad\.jsonl:1.*nope\.png"),
        ('["a.png", "x"]\n', ValueError, r"bad\.jsonl:1.*JSON object"),
        ('{"image": "a.png", "caption": ""}\n', ValueError,
         r"config key '.*bad\.jsonl:1: caption': got ''; it must be a non-empty string"),
        ('{"image": 7, "caption": "x"}\n', TypeError,
         r"config key '.*bad\.jsonl:1: image': got 7; it must be a non-empty string"),
        ('{"image": "a.png", "caption": "x", "label": "3"}\n', TypeError,
         r"config key '.*bad\.jsonl:1: label': got '3'; it must be an integer"),
        ("\n\n", ValueError, "no records"),
    ],
)
def test_user_jsonl_errors(tmp_path, content, exc, match):
    _write_png(tmp_path / "a.png", (0, 0, 255))
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(exc, match=match):
        ImageCaptionDataset(tmp_path / "bad.jsonl")


def test_user_jsonl_missing_file_and_unreadable_image(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ImageCaptionDataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="config key 'image_size': got 0; it must be >= 1"):
        ImageCaptionDataset(tmp_path / "missing.jsonl", image_size=0)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "c.jsonl").write_text('{"image": "broken.png", "caption": "x"}\n')
    ds = ImageCaptionDataset(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match=r"c\.jsonl:1.*broken\.png"):
        ds[0]
