"""Models: configs, shapes, masking, padding, the LIMoE token set, contrastive loss, FLOPs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moe
from moe.data.tokenizer import PAD, VOCAB_SIZE
from moe.experts import Experts
from moe.models import (
    LIMoEConfig,
    LIMoEModel,
    LMConfig,
    LanguageModel,
    PRESETS,
    TransformerConfig,
    active_ffn_flops_per_token,
    contrastive_loss,
    init_weights,
    preset,
    resolve_model_config,
    zero_shot_accuracy,
)
from parallel.pipeline import StageRole
from parallel.shards import partial_grad_group
from parallel.stages import StagePlan

torch.set_num_threads(1)

DROPLESS = {"policy": "topk", "top_k": 2, "capacity_factor": None}


def small_lm(router=DROPLESS, **kw) -> LanguageModel:
    cfg = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 32, "max_seq_len": 16, "moe_every": 2,
           "moe": {"num_experts": 4, "router": router}}
    cfg.update(kw)
    return LanguageModel(LMConfig.from_dict(cfg))


def small_limoe(router=DROPLESS, **kw) -> LIMoEModel:
    cfg = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 32, "moe_every": 1,
           "moe": {"num_experts": 4, "router": router,
                   "aux_losses": {"load_balancing": 0.01, "limoe_local": 0.1, "limoe_global": 0.1},
                   "limoe_min_experts": 2.0},
           "image_size": 16, "patch_size": 8, "text_length": 12, "embed_dim": 16}
    cfg.update(kw)
    return LIMoEModel(LIMoEConfig.from_dict(cfg))


def text_batch(B=3, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, L, 6, 1, 9][:B])
    ids = torch.randint(0, 256, (B, L), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, PAD), mask


# ------------------------------------------------------------------ configs

@pytest.mark.parametrize("kw, message", [
    ({"n_heads": 3}, "config key 'TransformerConfig.n_heads': got 3; it must divide d_model=16"),
    ({"moe_every": 1, "moe": None}, "config key 'TransformerConfig.moe': got None; moe_every=1 needs a 'moe' section"),
    ({"activation": "tanh"}, "config key 'TransformerConfig.activation': got 'tanh'; allowed values: 'gelu'"),
    ({"d_model": 0}, "config key 'TransformerConfig.d_model': got 0; it must be >= 1"),
    ({"dropout": 1.5}, "config key 'TransformerConfig.dropout': got 1.5; it must be in [0.0, 1.0)"),
    ({"moe_every": 9}, "config key 'TransformerConfig.moe_every': got 9; it must be in [0, 4]"),
])
def test_transformer_config_errors_name_field_value_and_allowed(kw, message):
    with pytest.raises(ValueError) as err:
        TransformerConfig(**{"d_model": 16, "n_layers": 4, "n_heads": 2, **kw})
    assert str(err.value).startswith(message)


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match=r"config key 'model.d_modle' is not known; allowed keys at 'model': .*d_model"):
        LMConfig.from_dict({"d_modle": 32})
    with pytest.raises(ValueError, match=r"config key 'model.moe.experts' is not known; .*num_experts"):
        LMConfig.from_dict({"moe_every": 2, "moe": {"experts": 4}})
    with pytest.raises(ValueError, match=r"config key 'model.moe.router.k' is not known; .*top_k"):
        LIMoEConfig.from_dict({"moe_every": 2, "moe": {"router": {"k": 1}}})
    with pytest.raises(ValueError, match="config key 'model.patch_size': got 5; it must divide image_size=32"):
        LIMoEConfig.from_dict({"image_size": 32, "patch_size": 5})
    with pytest.raises(ValueError, match="config key 'net.moe.router.policy': got 'bogus'"):
        LMConfig.from_dict({"moe_every": 2, "moe": {"num_experts": 2, "router": {"policy": "bogus"}}}, "net")
    # fields the transformer owns are not keys of model.moe
    for owned in ("d_model", "activation", "num_modalities"):
        with pytest.raises(ValueError, match=f"config key 'model.moe.{owned}' is not known"):
            LMConfig.from_dict({"moe_every": 2, "moe": {"num_experts": 2, owned: 16}})


@pytest.mark.parametrize("moe_section, path, message", [
    ({"router": {"top_k": 0}}, "model.moe.router.top_k", "got 0; it must be >= 1"),
    ({}, "model.moe.num_experts", "is required but missing"),
    ({"num_experts": "abc"}, "model.moe.num_experts", "got 'abc'; it must be an integer"),
    ({"router": {"top_k": 5}}, "model.moe.router.top_k", "got 5; it must be in [1, num_experts=4]"),
    ({"shared_expert_ffn": -1}, "model.moe.shared_expert_ffn", "got -1; it must be >= 0"),
    ({"residual_moe": "yes"}, "model.moe.residual_moe", "got 'yes'; it must be true or false"),
    ({"dispatcher": "ring"}, "model.moe.dispatcher", "got 'ring'; allowed values: 'flat', 'hierarchical'"),
    ({"dispatcher": "hierarchical"}, "model.moe.node_size", "got None; set it"),
    ({"node_size": 2}, "model.moe.node_size", "got 2; set it"),
    ({"overlap_chunks": 0}, "model.moe.overlap_chunks", "got 0; it must be >= 1"),
    ({"aux_losses": {"z_loss": -1}}, "model.moe.aux_losses.z_loss", "got -1; it must be >= 0"),
])
def test_moe_section_errors_name_the_yaml_key_path(moe_section, path, message):
    section = {"num_experts": 4, **moe_section} if moe_section else {}
    with pytest.raises(ValueError) as err:
        LMConfig.from_dict({"d_model": 16, "n_layers": 2, "n_heads": 2, "moe_every": 2, "moe": section})
    sep = " " if message.startswith("is ") else ": "
    assert str(err.value).startswith(f"config key '{path}'{sep}{message}")


def test_moe_section_is_a_moe_config_with_the_transformer_fields():
    cfg = LIMoEConfig.from_dict({"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ffn": 24, "activation": "silu",
                                 "init_std": 0.05, "moe_every": 2,
                                 "moe": {"num_experts": 4, "shared_expert_ffn": 8, "residual_moe": True,
                                         "bias": True, "pad_to_capacity": True, "overlap_chunks": 3}})
    m = cfg.transformer.moe
    assert isinstance(m, moe.MoEConfig)
    assert (m.d_model, m.d_ffn, m.activation, m.num_modalities, m.init_std) == (16, 24, "silu", 2, 0.05)
    assert (m.shared_expert_ffn, m.residual_moe, m.bias, m.pad_to_capacity, m.overlap_chunks) == (8, True, True,
                                                                                                  True, 3)
    assert LIMoEConfig.from_dict(cfg.to_dict()) == cfg  # to_dict is what from_dict reads
    # a MoEConfig built in Python takes the transformer's own fields
    t = TransformerConfig(d_model=16, n_layers=2, n_heads=2, moe_every=1, num_modalities=2,
                          moe=moe.MoEConfig(d_model=99, d_ffn=8, num_experts=2))
    assert (t.moe.d_model, t.moe.num_modalities) == (16, 2)


def test_shared_expert_residual_and_bias_from_yaml_build_those_layers():
    model = small_lm(moe={"num_experts": 4, "router": DROPLESS, "shared_expert_ffn": 8, "residual_moe": True,
                          "bias": True})
    layer = model.moe_layers()[0]
    assert layer.shared is not None and layer.shared.d_ffn == 8
    assert layer.residual_coef is not None and layer.experts.b1 is not None and layer.shared.b1 is not None
    x = torch.randn(5, 32)
    y, _ = layer(x)
    h = layer.experts
    # the residual mix: y = a(x) moe(x) + b(x) dense(x), [a, b] = softmax(x W_c)
    coef = torch.softmax(layer.residual_coef(x), -1)
    dense = layer.shared.expert_mlp(0, x)
    r = layer.last_routing
    sparse = torch.zeros_like(x)
    for t in range(5):
        for j in range(r.experts.shape[1]):
            if r.kept[t, j]:
                sparse[t] += r.weights[t, j] * h.expert_mlp(int(r.experts[t, j]), x[t:t + 1])[0]
    torch.testing.assert_close(y, coef[:, :1] * sparse + coef[:, 1:] * dense, rtol=1e-5, atol=1e-6)


def test_presets_build_and_overrides_merge():
    cfg = resolve_model_config({"preset": "tiny_limoe", "n_layers": 2, "moe": {"router": {"capacity_factor": 2.0}}})
    assert cfg["n_layers"] == 2 and cfg["moe"]["router"]["capacity_factor"] == 2.0
    assert cfg["moe"]["router"]["drop_policy"] == "bpr"  # merged, not replaced
    cfg = resolve_model_config({"preset": "tiny_limoe", "moe": {"aux_losses": {"z_loss": 0.1}}})
    assert cfg["moe"]["aux_losses"] == {"z_loss": 0.1}  # a loss set replaces the preset's
    with pytest.raises(ValueError, match="config key 'model.preset': got 'nope'; allowed values: .*'tiny_limoe'"):
        resolve_model_config({"preset": "nope"})
    with pytest.raises(ValueError, match="'model.preset': got 'tiny_switch'; it is a 'lm' preset, not allowed for task 'limoe'"):
        resolve_model_config({"preset": "tiny_switch"}, task="limoe")
    assert PRESETS["switch"]["moe"]["router"] == {"policy": "switch", "top_k": 1, "capacity_factor": 1.25,
                                                  "drop_policy": "position"}
    assert PRESETS["gshard"]["moe"]["router"]["policy"] == "gshard"
    assert PRESETS["gshard"]["moe"]["router"]["capacity_factor"] == 2.0


# ------------------------------------------------------------------ FLOPs of the dense twins

@pytest.mark.parametrize("name", sorted(n for n in PRESETS if not n.endswith("_dense")))
def test_dense_baseline_has_equal_active_ffn_flops(name):
    cls = LIMoEConfig if PRESETS[name]["task"] == "limoe" else LMConfig
    sparse = cls.from_dict(preset(name))
    twin = cls.from_dict(preset(name + "_dense"))
    assert active_ffn_flops_per_token(sparse) == active_ffn_flops_per_token(twin)
    assert active_ffn_flops_per_token(sparse.dense_baseline()) == active_ffn_flops_per_token(sparse)
    t = sparse.transformer
    k, f = t.moe.router.top_k, t.moe.d_ffn
    per_layer = [2 * 2 * t.d_model * (k * f if t.is_moe_layer(i) else t.d_ffn) for i in range(t.n_layers)]
    assert active_ffn_flops_per_token(sparse) == sum(per_layer)  # 2 matmuls, 2 FLOPs per MAC
    assert twin.transformer.moe.num_experts == 1 and twin.transformer.ffn_width(1) == k * f
    assert not any(twin.transformer.is_moe_layer(i) for i in range(t.n_layers))


def test_dense_twin_model_has_no_moe_layers_and_same_shapes():
    sparse_cfg = LMConfig.from_dict({"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ffn": 8, "max_seq_len": 8,
                                     "moe_every": 1, "moe": {"num_experts": 4, "router": {"top_k": 2}}})
    dense = LanguageModel(sparse_cfg.dense_baseline())
    assert dense.moe_layers() == []
    assert dense.blocks[0].mlp.w_in.out_features == 16
    logits, aux = dense(torch.zeros(2, 8, dtype=torch.long))
    assert logits.shape == (2, 8, VOCAB_SIZE) and aux == {}


# ------------------------------------------------------------------ LM

def test_lm_shapes_dtypes_names_and_aux():
    model = small_lm(router={"policy": "switch", "top_k": 1, "capacity_factor": 1.25})
    ids = torch.randint(0, VOCAB_SIZE, (3, 16))
    logits, aux = model(ids)
    assert logits.shape == (3, 16, VOCAB_SIZE) and logits.dtype == torch.float32
    assert set(aux) == {"load_balancing"} and aux["load_balancing"].dim() == 0
    assert [m.name for m in model.moe_layers()] == ["blocks.1.moe"]
    names = dict(model.named_modules())
    assert names["transformer.blocks.1.moe"] is model.moe_layers()[0]
    assert isinstance(names["transformer.blocks.0.mlp"], torch.nn.Module)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("router", [DROPLESS, {"policy": "switch", "top_k": 1, "capacity_factor": None}])
def test_lm_is_causal(router):
    # Dropless routing: with a capacity, a future token can take a past token's slot.
    model = small_lm(router=router).eval()
    ids = torch.randint(0, 256, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(0, 256, (2, 6))
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_lm_sequence_level_aux_sees_whole_sequences():
    model = small_lm(moe={"num_experts": 4, "router": DROPLESS, "aux_losses": {"sequence_aux": 1.0}})
    ids = torch.randint(0, 256, (3, 16))
    _, aux = model(ids)
    r = model.moe_layers()[0].last_routing
    per_seq = [moe.losses.load_balancing_loss(r.probs[i * 16:(i + 1) * 16], r.experts[i * 16:(i + 1) * 16], 4)
               for i in range(3)]
    torch.testing.assert_close(aux["sequence_aux"].detach(), torch.stack(per_seq).mean().detach())


def test_tied_lm_pipeline_stages_hold_their_embedding_copies():
    """Tied embeddings over pp=3: the first and the last stage hold the token embedding (marked as
    the tied pair, "pp_ends"); a middle stage holds neither it nor a head (and builds)."""
    cfg = LMConfig.from_dict({"d_model": 32, "n_layers": 3, "n_heads": 2, "d_ffn": 32, "max_seq_len": 16})
    plan = StagePlan(pp=3, virtual_stages=1, chunks=((0,), (1,), (2,)))
    first, middle, last = (LanguageModel(cfg, pipe=StageRole(plan=plan, rank=r)) for r in range(3))
    assert middle.tok_embed is None and middle.head is None and middle.pos_embed is None
    assert middle.blocks.indices() == [1]
    for stage in (first, last):
        assert stage.head is None and partial_grad_group(stage.tok_embed.weight) == "pp_ends"
    with pytest.raises(RuntimeError, match="no embeddings"):
        middle.pipe_embed(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="built without its pp group"):  # builds, but cannot run the pipeline
        middle.eval().pipe.relay(middle, (torch.zeros(1, 4, dtype=torch.long),))


def test_init_depends_only_on_seed_and_global_expert_index():
    a, b = small_lm(init_seed=3), small_lm(init_seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = small_lm(init_seed=4)
    assert not torch.equal(a.tok_embed.weight, c.tok_embed.weight)

    class Holder(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.experts = experts

    full = Holder(Experts(4, 8, 16))
    half = Holder(Experts(2, 8, 16, first_expert=2))  # what rank 1 of EP=2 holds
    init_weights(full, 7)
    init_weights(half, 7)
    assert torch.equal(full.experts.w1[2:], half.experts.w1)
    assert torch.equal(full.experts.w2[2:], half.experts.w2)


# ------------------------------------------------------------------ LIMoE

def test_limoe_shapes_norms_and_scale():
    model = small_limoe()
    images = torch.rand(3, 3, 16, 16)
    ids, mask = text_batch()
    u, v, aux = model(images, ids, mask)
    assert u.shape == v.shape == (3, 16) and u.dtype == v.dtype == torch.float32
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    assert set(aux) == {"load_balancing", "limoe_local", "limoe_global"}
    assert math.isclose(float(model.scale().detach()), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert math.isclose(float(model.scale().detach()), 100.0, rel_tol=1e-5)  # clamped
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, 16, 16\]"):
        model(torch.rand(3, 3, 8, 8), ids, mask)


def test_limoe_moe_layers_see_both_modalities_and_no_padding():
    model = small_limoe()
    seen = []
    for layer in model.moe_layers():
        layer.register_forward_pre_hook(lambda mod, args: seen.append((args[0].shape[0], args[1].clone())))
    images = torch.rand(3, 3, 16, 16)
    ids, mask = text_batch()
    model(images, ids, mask)
    assert len(seen) == 2
    n_img = 3 * 4  # 3 images x 4 patches
    for rows, modality in seen:
        assert rows == n_img + int(mask.sum())  # every real text token, no padding
        assert modality.shape == (rows,)
        assert int((modality == 0).sum()) == n_img and int((modality == 1).sum()) == int(mask.sum())
    stats = model.moe_layers()[0].last_stats["tokens_per_expert_by_modality"]
    assert stats.shape == (2, 4) and int(stats[1].sum()) == 2 * int(mask.sum())  # top-2, dropless


@pytest.mark.parametrize("router", [DROPLESS, {"policy": "topk", "top_k": 1, "capacity_factor": 1.0,
                                              "drop_policy": "bpr"}])
def test_text_embedding_is_padding_invariant(router):
    # Padding never reaches the MoE: same routing, capacity and output whatever the padding.
    model = small_limoe(router=router)
    ids, mask = text_batch(B=5)
    rows = [0, 2, 3, 4]  # lengths 3, 6, 1, 9: all fit in 9 positions
    ids, mask = ids[rows], mask[rows]
    short = 9
    v_full = model.encode_text(ids, mask)
    v_short = model.encode_text(ids[:, :short], mask[:, :short])
    torch.testing.assert_close(v_full, v_short, rtol=1e-5, atol=1e-6)
    noisy = ids.masked_fill(~mask, 65)  # whatever sits in padded slots is ignored
    torch.testing.assert_close(model.encode_text(noisy, mask), v_full, rtol=1e-5, atol=1e-6)


def test_contrastive_loss_matches_hand_loop():
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    v = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = 7.5
    total = 0.0
    for i in range(5):
        row = [scale * float(u[i] @ v[j]) for j in range(5)]
        col = [scale * float(v[i] @ u[j]) for j in range(5)]
        total += -row[i] + math.log(sum(math.exp(x) for x in row))
        total += -col[i] + math.log(sum(math.exp(x) for x in col))
    expected = total / (2 * 5)
    assert math.isclose(float(contrastive_loss(u, v, scale)), expected, rel_tol=1e-5)
    model = small_limoe()
    assert math.isclose(float(model.contrastive_loss(u, v).detach()), float(contrastive_loss(u, v, 1 / 0.07)), rel_tol=1e-5)


def test_zero_shot_accuracy_matches_manual_argmax():
    model = small_limoe().eval()
    prompts = ["a red circle", "a blue square", "a green cross"]
    images = torch.rand(7, 3, 16, 16)
    ids, mask = model.tokenize(prompts)
    with torch.no_grad():
        pred = (model.encode_image(images) @ model.encode_text(ids, mask).t()).argmax(-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    expected = float((pred == labels).float().mean())
    model.train()
    assert zero_shot_accuracy(model, images, labels, prompts, batch_size=3) == pytest.approx(expected)
    assert model.training  # mode restored
    assert zero_shot_accuracy(model, images, pred, prompts) == 1.0


def test_limoe_dense_twin_and_tiny_preset_build():
    cfg = LIMoEConfig.from_dict(preset("tiny_limoe"))
    assert cfg.transformer.num_modalities == 2 and not cfg.transformer.causal
    assert cfg.transformer.moe.router.drop_policy == "bpr" and cfg.transformer.moe.router.capacity_factor == 1.0
    dense = LIMoEModel(LIMoEConfig.from_dict(preset("tiny_limoe_dense")))
    assert dense.moe_layers() == []
    ids, mask = text_batch(L=48)
    u, v, aux = dense(torch.rand(3, 3, 32, 32), ids, mask)
    assert u.shape == (3, 64) and aux == {}


def test_joint_load_balancing_is_logged_and_matches_the_loss_function():
    model = small_limoe(joint_load_balancing=0.5)
    ids, mask = text_batch()
    _, _, aux = model(torch.rand(3, 3, 16, 16), ids, mask)
    expected = 0.0
    for layer in model.moe_layers():
        r = layer.last_routing
        expected += 0.5 * float(moe.losses.load_balancing_loss(r.probs, r.experts, 4).detach())
    assert math.isclose(float(aux["load_balancing_joint"].detach()), expected, rel_tol=1e-5)


# ------------------------------------------------------------------ features reachable from YAML

def test_pad_to_capacity_from_yaml_gives_the_compact_layout_output():
    router = {"policy": "topk", "top_k": 2, "capacity_factor": 0.75}  # some assignments dropped
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    compact, padded = small_lm(router), small_lm(router, moe={"num_experts": 4, "router": router,
                                                              "pad_to_capacity": True})
    assert padded.config.transformer.moe.pad_to_capacity and not compact.config.transformer.moe.pad_to_capacity
    y0, aux0 = compact(ids)
    y1, aux1 = padded(ids)
    layer = padded.moe_layers()[0]
    assert layer.last_routing.capacity is not None and layer.last_routing.dropped_fraction() > 0
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux1["load_balancing"], aux0["load_balancing"])
    # and it really runs the padded layout: E * C rows reach the experts
    seen = []
    layer.experts.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    padded(ids)
    assert seen == [4 * layer.last_routing.capacity]


def test_compile_blocks_from_yaml_matches_eager():
    from moe.models import compile_blocks

    router = {"policy": "topk", "top_k": 2, "capacity_factor": 1.0}  # a capacity: static shapes
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    eager = small_lm(router)
    compiled = compile_blocks(small_lm(router))
    assert all(hasattr(b.attend, "_torchdynamo_orig_callable") or "compile" in type(b.attend).__module__
               for b in compiled.blocks)
    y0, aux0 = eager(ids)
    y1, aux1 = compiled(ids)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux1["load_balancing"], aux0["load_balancing"], rtol=1e-4, atol=1e-6)
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def _dispatchers_from_yaml(rank, world):
    import torch.distributed as dist

    from moe.dispatch import AllToAllDispatcher, HierarchicalAllToAllDispatcher

    base = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ffn": 16, "max_seq_len": 8, "moe_every": 1}
    router = {"policy": "topk", "top_k": 2}
    out = {}
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(rank))
    for name, extra in [("flat", {}), ("chunks", {"overlap_chunks": 3}),
                        ("hier", {"dispatcher": "hierarchical", "node_size": 1, "overlap_chunks": 2})]:
        cfg = LMConfig.from_dict({**base, "moe": {"num_experts": 4, "router": router, **extra}})
        model = LanguageModel(cfg, ep_group=dist.group.WORLD)
        ds = [layer.dispatcher for layer in model.moe_layers()]
        out[name] = {"types": [type(d).__name__ for d in ds], "chunks": [d.num_chunks for d in ds],
                     "logits": model(ids)[0].detach()}
        if name == "hier":
            assert all(isinstance(d, HierarchicalAllToAllDispatcher) and d.ranks_per_node == 1 for d in ds)
            assert ds[0].inter_group is ds[1].inter_group  # node groups made once per model
        else:
            assert all(type(d) is AllToAllDispatcher for d in ds)
    return out


def test_dispatcher_flavour_from_yaml_builds_that_dispatcher():
    from tests.helpers.distributed import run_distributed

    results = run_distributed(_dispatchers_from_yaml, 2, timeout=120)
    for r in results:
        assert r["flat"]["types"] == ["AllToAllDispatcher"] * 2 and r["flat"]["chunks"] == [1, 1]
        assert r["chunks"]["chunks"] == [3, 3]
        assert r["hier"]["types"] == ["HierarchicalAllToAllDispatcher"] * 2 and r["hier"]["chunks"] == [2, 2]
        # every exchange gives the same model output
        torch.testing.assert_close(r["chunks"]["logits"], r["flat"]["logits"])
        torch.testing.assert_close(r["hier"]["logits"], r["flat"]["logits"])


def test_sharding_plan_lists_the_fsdp2_units_in_module_order():
    """moe.models.sharding: what FSDP2 shards as units, in ``modules()`` order: every expert-parallel Experts
    (not a shared expert), every router, every block (none for LIMoE, which runs its blocks piecewise), and the
    methods the tasks enter the model through."""
    from moe.layer import MoELayer
    from moe.models.sharding import sharding_plan
    from moe.models.transformer import Block
    from moe.router import Router

    for model, blocks, entries in (
            (small_lm(), True, ("run_pieces",)),
            (small_limoe(), False, ("run_pieces", "encode_tokens", "encode_image", "encode_text"))):
        plan = sharding_plan(model)
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        assert layers and list(plan.experts) == [layer.experts for layer in layers]
        assert list(plan.fp32_units) == [m for m in model.modules() if isinstance(m, Router)] == \
            [layer.router for layer in layers]
        assert list(plan.blocks) == ([m for m in model.modules() if isinstance(m, Block)] if blocks else [])
        assert len(plan.blocks) == (model.config.transformer.n_layers if blocks else 0)
        assert plan.entry_methods == entries
