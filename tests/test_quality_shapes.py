"""The hard zero-shot split, the data options of the quality work (issue 15) and the word tokenizer.

Fast checks only: the accuracy targets are measured by tools/quality_table.py and the
demo, never asserted here.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from moe.data.shapes import (
    COLOURS,
    SHAPES,
    ShapesConfig,
    ShapesDataset,
    caption_vocabulary,
    class_prompts,
    partial_caption_for,
)
from moe.data.tokenizer import WordTokenizer
from moe.models.limoe import LIMoEConfig, make_tokenizer
from moe.models.presets import preset
from moe.tasks import build_task
from tests.helpers.fit import fit_batch

# ------------------------------------------------------------------ the hard split


@pytest.mark.parametrize("heldout_seed", [0, 1, 2, 3])
def test_hard_split_holds_out_each_shape_and_colour_twice(heldout_seed):
    cfg = ShapesConfig(heldout_fraction=0.4, heldout_seed=heldout_seed)
    held, train = cfg.heldout_combos(), cfg.train_combos()
    assert len(held) == 10 and len(train) == 15
    assert set(held).isdisjoint(train) and set(held) | set(train) == set(cfg.all_combos())
    assert Counter(s for s, _ in held) == {s: 2 for s in cfg.shapes}
    assert Counter(c for _, c in held) == {c: 2 for c in cfg.colours}
    # Deterministic: the same config (any data seed) holds out the same combos.
    assert ShapesConfig(heldout_fraction=0.4, heldout_seed=heldout_seed, seed=9).heldout_combos() == held


def test_hard_split_depends_on_heldout_seed_and_scales_with_the_fraction():
    splits = {ShapesConfig(heldout_fraction=0.4, heldout_seed=s).heldout_combos() for s in range(4)}
    assert len(splits) > 1
    for fraction, times in ((0.2, 1), (0.6, 3)):
        held = ShapesConfig(heldout_fraction=fraction).heldout_combos()
        assert Counter(s for s, _ in held) == {s: times for s in SHAPES[:5]}
        assert Counter(c for _, c in held) == {c: times for c in tuple(COLOURS)[:5]}


def test_hard_split_datasets_hold_out_what_the_config_says():
    cfg = ShapesConfig(heldout_fraction=0.4)
    held = set(cfg.heldout_combos())
    train = ShapesDataset(cfg, "train", size=300)
    zs = ShapesDataset(cfg, "zeroshot", size=200)
    seen = {(train[i]["shape"], train[i]["colour"]) for i in range(len(train))}
    assert seen == set(cfg.train_combos()) and seen.isdisjoint(held)
    assert {(zs[i]["shape"], zs[i]["colour"]) for i in range(len(zs))} == held
    assert zs.prompts() == class_prompts(cfg.heldout_combos()) and len(zs.prompts()) == 10


def test_old_split_stays_available():
    # 0.2 on 5 x 5: both pickers give the earlier demo's 5 combos.
    assert ShapesConfig().heldout_combos() == ShapesConfig(heldout_pick="random").heldout_combos()
    # The earlier (unbalanced) 0.4 split, by config.
    old = ShapesConfig(heldout_fraction=0.4, heldout_pick="random").heldout_combos()
    assert old == (("circle", "blue"), ("circle", "yellow"), ("square", "red"), ("square", "blue"),
                   ("triangle", "green"), ("triangle", "yellow"), ("cross", "purple"), ("ring", "green"),
                   ("ring", "blue"), ("ring", "yellow"))


def test_diagonals_on_a_non_square_grid_keep_every_name_in_training():
    cfg = ShapesConfig(shapes=SHAPES, colours=tuple(COLOURS), heldout_fraction=0.4)
    held, train = cfg.heldout_combos(), cfg.train_combos()
    assert len(held) == round(0.4 * 48)
    assert {s for s, _ in held} == set(SHAPES) and {c for _, c in held} == set(COLOURS)
    assert {s for s, _ in train} == set(SHAPES) and {c for _, c in train} == set(COLOURS)


@pytest.mark.parametrize("kwargs, match", [
    ({"heldout_pick": "latin"}, "'ShapesConfig.heldout_pick': got 'latin'; allowed values: 'diagonals', 'random'"),
    ({"partial_captions": 1.5}, r"'ShapesConfig.partial_captions': got 1.5; it must be in \[0.0, 1.0\]"),
    ({"colour_jitter": 0.5}, r"'ShapesConfig.colour_jitter': got 0.5; it must be in \[0.0, 0.3\]"),
])
def test_new_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesConfig(**kwargs)


# ------------------------------------------------------------------ determinism of the options


def _item_tuple(it):
    return it["image"], it["caption"], it["shape"], it["colour"], it["label"]


def test_options_at_zero_leave_every_item_unchanged():
    base = ShapesDataset(ShapesConfig(heldout_fraction=0.4), size=20)
    same = ShapesDataset(ShapesConfig(heldout_fraction=0.4, partial_captions=0.0, colour_jitter=0.0), size=20)
    for i in range(20):
        a, b = _item_tuple(base[i]), _item_tuple(same[i])
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_partial_captions_name_one_attribute_in_train_only():
    cfg = ShapesConfig(heldout_fraction=0.4, partial_captions=0.5, seed=3)
    full = ShapesDataset(ShapesConfig(heldout_fraction=0.4, seed=3), size=200)
    ds = ShapesDataset(cfg, size=200)
    n_partial = 0
    for i in range(200):
        it, ref = ds[i], full[i]
        assert torch.equal(it["image"], ref["image"]) and it["label"] == ref["label"]
        words = it["caption"].replace(",", " ").split()
        has_shape, has_colour = it["shape"] in words, it["colour"] in words
        assert has_shape or has_colour
        if not (has_shape and has_colour):
            n_partial += 1
        assert _item_tuple(ds[i])[1] == it["caption"]  # deterministic
    assert 60 < n_partial < 140
    val, zs = ShapesDataset(cfg, "val", size=50), ShapesDataset(cfg, "zeroshot", size=50)
    for split in (val, zs):
        for i in range(50):
            words = split[i]["caption"].replace(",", " ").split()
            assert split[i]["shape"] in words and split[i]["colour"] in words
    assert partial_caption_for("circle", "red", "small", "left", 0) == "a red shape"
    assert partial_caption_for("circle", "red", "small", "left", 2) == "a circle"


def test_colour_jitter_changes_train_images_only_and_deterministically():
    cfg = ShapesConfig(colour_jitter=0.1)
    plain = ShapesConfig()
    a, b = ShapesDataset(cfg, size=5), ShapesDataset(plain, size=5)
    assert all(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(5))
    assert all(torch.equal(a[i]["image"], ShapesDataset(cfg, size=5)[i]["image"]) for i in range(5))
    assert all(a[i]["caption"] == b[i]["caption"] for i in range(5))
    for split in ("val", "zeroshot"):
        x, y = ShapesDataset(cfg, split, size=5), ShapesDataset(plain, split, size=5)
        assert all(torch.equal(x[i]["image"], y[i]["image"]) for i in range(5))


# ------------------------------------------------------------------ word tokens


def test_word_tokenizer_atoms_unknown_words_and_padding():
    tok = WordTokenizer(caption_vocabulary())
    ids = tok.encode("A red circle, on the LEFT", add_eos=True)
    assert len(ids) == 8 and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "a red circle , on the left"
    assert tok.encode("a mauve circle")[1] == tok.unk_id
    enc = tok.encode_batch(["a red circle", "a"], 6, add_eos=True)
    assert enc.lengths.tolist() == [4, 2] and (enc.ids[~enc.mask] == tok.pad_id).all()
    with pytest.raises(ValueError, match="duplicates"):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_every_caption_and_prompt_is_in_the_word_vocabulary():
    tok = make_tokenizer("words")
    cfg = ShapesConfig(shapes=SHAPES, colours=tuple(COLOURS), partial_captions=0.5, heldout_fraction=0.4)
    texts = [ShapesDataset(cfg, size=300)[i]["caption"] for i in range(300)]
    texts += class_prompts(cfg.all_combos())
    for text in texts:
        assert tok.unk_id not in tok.encode(text), text
    assert max(len(tok.encode(t, add_eos=True)) for t in texts) <= 16


def test_text_tokenizer_config_errors():
    with pytest.raises(ValueError, match="'model.text_tokenizer': got 'chars'; allowed values: 'bytes', 'words'"):
        LIMoEConfig.from_dict({"text_tokenizer": "chars"})
    with pytest.raises(ValueError, match=r"'model.vocab_size': got 20; it must be >= 35, the vocabulary of "
                                         r"text_tokenizer='words'"):
        LIMoEConfig.from_dict({"text_tokenizer": "words", "vocab_size": 20})


# ------------------------------------------------------------------ a few steps learn


def test_a_few_steps_on_the_hard_split_reduce_the_loss():
    model = preset("tiny_limoe")
    model.update({"image_size": 16, "n_layers": 2, "d_model": 32, "n_heads": 2, "d_ffn": 32})
    model["moe"] = {**model["moe"], "num_experts": 4, "d_ffn": 32}
    data = {"shapes": {"image_size": 16, "heldout_fraction": 0.4}, "zeroshot_size": 20, "val_size": 16,
            "eval_batch_size": 8}
    torch.manual_seed(0)
    task = build_task("limoe", model, data)
    assert task.shapes_config.heldout_fraction == 0.4 and len(task.shapes_config.heldout_combos()) == 10
    first, last = fit_batch(task, task.micro_batch(0, 0, 8, seed=0), 20)
    assert last < 0.8 * first
    ev = task.evaluate()
    assert ev["zero_shot_classes"] == 10.0
    for key in ("zero_shot_accuracy_all", "zero_shot_colour_accuracy_all", "zero_shot_shape_accuracy_all",
                "zero_shot_seen_rate_all"):
        assert 0.0 <= ev[key] <= 1.0
    assert ev["zero_shot_colour_accuracy_all"] >= ev["zero_shot_accuracy_all"]


# ------------------------------------------------------------------ model options


def _tiny_limoe(**over):
    from moe.models.limoe import LIMoEModel

    cfg = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 32, "image_size": 16, "embed_dim": 16,
           "text_tokenizer": "words", "text_length": 12, **over}
    return LIMoEModel(LIMoEConfig.from_dict(cfg)).eval()


def test_bag_of_words_text_ignores_word_order_and_has_no_positions():
    model = _tiny_limoe(text_encoder="bag_of_words")
    assert not hasattr(model, "text_pos_embed")
    ids, mask = model.tokenize(["a red circle", "circle red a", "a blue circle"])
    v = model.encode_text(ids, mask)
    assert torch.allclose(v[0], v[1], atol=1e-6) and not torch.allclose(v[0], v[2], atol=1e-3)
    seq = _tiny_limoe()
    ids, mask = seq.tokenize(["a red circle", "circle red a"])
    v = seq.encode_text(ids, mask)
    assert not torch.allclose(v[0], v[1], atol=1e-4)


def test_conv_stem_runs_and_is_validated():
    model = _tiny_limoe(image_stem="conv", stem_channels=8)
    assert model.stem[0].weight.shape == (8, 3, 3, 3) and model.patch_embed.weight.shape[1] == 8
    ids, mask = model.tokenize(["a red circle"] * 2)
    u, v, _ = model(torch.rand(2, 3, 16, 16), ids, mask)
    assert u.shape == v.shape == (2, 16)
    with pytest.raises(ValueError, match="'model.image_stem': got 'resnet'; allowed values: 'patch', 'conv'"):
        LIMoEConfig.from_dict({"image_stem": "resnet"})
    with pytest.raises(ValueError, match="'model.text_encoder': got 'bow'; allowed values: 'sequence', "
                                         "'bag_of_words'"):
        LIMoEConfig.from_dict({"text_encoder": "bow"})
