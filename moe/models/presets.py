"""Named model presets (plain dicts, as a YAML ``model:`` section would hold them).

Every preset ``X`` has a dense twin ``X_dense`` with the same ACTIVE FFN FLOPs per
token: each MoE block becomes a dense MLP of width ``top_k * F_expert`` (one
expert; a top-2 preset's twin MLP is twice an expert's width), so
``active_ffn_flops_per_token`` of the two configs is equal (router FLOPs aside).

- ``switch`` / ``tiny_switch``: Switch Transformer LM: top-1 ``switch`` policy,
  capacity factor 1.25, load-balancing loss 0.01.
- ``gshard`` / ``tiny_gshard``: GShard LM: top-2 ``gshard`` policy (random 2nd
  expert), capacity factor 2.0, load-balancing loss 0.01.
- ``tiny_limoe``: LIMoE one-tower image-text model for the built-in shapes data
  (32x32 images, patch 8, captions <= 48 bytes): d_model 64, 4 layers, MoE every
  2nd layer with 8 experts, GShard top-2 routing with BPR at capacity factor 1.0,
  LIMoE local / thresholded global entropy losses per modality plus a Switch
  load-balancing loss over both modalities together.

Measured (tiny_limoe, built-in shapes data with default ShapesConfig, AdamW lr 1e-3,
wd 0.05, betas (0.9, 0.98), warmup 50, cosine to 1000 steps, global batch 64, clip 1.0;
see ``TINY_LIMOE_TRAINING``):

- one process, 2 threads: 1000 steps in ~90 s; zero-shot accuracy on the 5
  held-out shape-colour combos 99.6% at step 250 (22 s), 100% at step 1000;
  seeds 0-3 all end at 100% (among ALL 25 class prompts: 73-89%).
  Train-mode drop rate at cf 1.0 over the last 100 steps <= 0.16% per layer
  (<= 0.27% when the router sees only 16 image-text pairs, as an EP rank does).
- 4 processes (EP 2, DP 4, 16 pairs per rank, negatives gathered over DP) on 2
  cores: 1000 steps in ~150 s; zero-shot 93% at step 250 (38 s), 100% from step
  500; drops 0.0% / 0.4%.
- Expert specialisation (tokens of the last 100 steps; image tokens are ~36% of
  all): in each MoE layer some experts are mostly image (69-86% image tokens) and
  others mostly text (88-96% text).
- The equal-FLOPs dense twin ``tiny_limoe_dense`` (seeds 0 and 2, 1000 steps) also
  reaches 100% held-out zero-shot (all-class 70% / 84%), but its validation
  contrastive loss is 1.29 vs 0.90-0.96 for the MoE.

The demo config (``examples/configs/tiny_limoe.yaml``) runs this preset with word
tokens (``text_tokenizer: words``, ``text_length: 16``) on the hard split (6 shapes x
8 colours, 40% of the combos held out, colour jitter 0.15) for 1500 steps; its
numbers over 3 seeds, the dense twin and the LIMoE ablations are in docs/quality.md
(``tools/quality_table.py``).

Tiny LM presets on the stdlib corpus (ONE seed each; not yet measured over seeds) (seq 128, batch 32, Adam lr 2e-3, cosine, 1000
steps, 1 thread), validation loss in nats/byte, MoE vs its equal-FLOPs dense twin:
``tiny_gshard`` 1.949 vs 2.057, ``tiny_switch`` 2.065 vs 2.079 (400 steps: 2.417 vs
2.453 and 2.440 vs 2.459).

``resolve_model_config(d)`` expands ``{"preset": name, **overrides}`` (nested
``moe`` / ``router`` sections are merged key by key; an ``aux_losses`` override
replaces the preset's whole loss set).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

from parallel.checks import check_mapping, fail

__all__ = ["PRESETS", "TINY_LIMOE_TRAINING", "preset", "resolve_model_config", "preset_names", "dense_twin"]


def _lm(d_model, n_layers, n_heads, d_ffn, max_seq_len, moe) -> Dict[str, Any]:
    return {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "d_ffn": d_ffn,
            "max_seq_len": max_seq_len, "moe_every": 2, "moe": moe}


_SWITCH_MOE = lambda E, F: {  # noqa: E731
    "num_experts": E, "d_ffn": F,
    "router": {"policy": "switch", "top_k": 1, "capacity_factor": 1.25, "drop_policy": "position"},
    "aux_losses": {"load_balancing": 0.01},
}
_GSHARD_MOE = lambda E, F: {  # noqa: E731
    "num_experts": E, "d_ffn": F,
    "router": {"policy": "gshard", "top_k": 2, "capacity_factor": 2.0, "drop_policy": "position"},
    "aux_losses": {"load_balancing": 0.01},
}

TINY_LIMOE: Dict[str, Any] = {
    "task": "limoe",
    "d_model": 64,
    "n_layers": 4,
    "n_heads": 4,
    "d_ffn": 128,
    "moe_every": 2,
    "moe": {
        "num_experts": 8,
        "d_ffn": 128,
        # GShard top-2 (2nd expert dispatched with probability 2 * g2), BPR, capacity 2T/E
        # (cf 1.0); eval capacity T (cf 4 = E/k): dropless.
        "router": {"policy": "gshard", "top_k": 2, "capacity_factor": 1.0, "eval_capacity_factor": 4.0,
                   "drop_policy": "bpr"},
        # Per modality: confident routing (local entropy) and >= ~4 experts per modality
        # (thresholded global entropy). The per-modality Switch loss is off: it would spread
        # EACH modality over all experts and forbid image / text experts.
        "aux_losses": {"limoe_local": 0.1, "limoe_global": 0.2},
        "limoe_min_experts": 4.0,
    },
    # Switch loss over image + text tokens together: balances the total load.
    "joint_load_balancing": 2.0,
    "image_size": 32,
    "patch_size": 8,
    "text_length": 48,
    "embed_dim": 64,
}
"""Tiny LIMoE, tuned on 2 CPU cores (measured numbers in the module docstring)."""

# Training settings the tiny LIMoE preset was tuned with (single process).
TINY_LIMOE_TRAINING: Dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 0.05, "warmup_steps": 50,
    "schedule": "cosine", "steps": 1000, "global_batch_size": 64, "grad_clip": 1.0,
}

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny_switch": {"task": "lm", **_lm(64, 4, 4, 256, 128, _SWITCH_MOE(8, 256))},
    "tiny_gshard": {"task": "lm", **_lm(64, 4, 4, 256, 128, _GSHARD_MOE(8, 256))},
    "switch": {"task": "lm", **_lm(512, 8, 8, 2048, 512, _SWITCH_MOE(16, 2048))},
    "gshard": {"task": "lm", **_lm(512, 8, 8, 2048, 512, _GSHARD_MOE(16, 2048))},
    "tiny_limoe": TINY_LIMOE,
}


def dense_twin(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The equal-active-FLOPs dense version of a preset dict (one expert of width k * F)."""
    out = copy.deepcopy(dict(cfg))
    moe = out.get("moe")
    if not moe:
        return out
    k = moe.get("router", {}).get("top_k", 2)
    width = k * moe.get("d_ffn", out.get("d_ffn", 512))
    out["moe"] = {"num_experts": 1, "d_ffn": width, "router": {"policy": "topk", "top_k": 1}, "aux_losses": {}}
    if "joint_load_balancing" in out:
        out["joint_load_balancing"] = 0.0
    return out


for _name in list(PRESETS):
    PRESETS[f"{_name}_dense"] = dense_twin(PRESETS[_name])


def preset_names() -> list:
    return sorted(PRESETS)


def preset(name: str) -> Dict[str, Any]:
    """A deep copy of preset ``name`` (without its ``task`` key)."""
    if not isinstance(name, str) or name not in PRESETS:
        fail("model.preset", name, f"allowed values: {', '.join(map(repr, preset_names()))}")
    out = copy.deepcopy(PRESETS[name])
    out.pop("task", None)
    return out


# Sections replaced as a whole by an override (a loss left out of an override is off).
_REPLACED = ("aux_losses",)


def _merge(base: Dict[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), Mapping) and k not in _REPLACED:
            base[k] = _merge(dict(base[k]), v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def resolve_model_config(d: Mapping[str, Any], *, task: str | None = None) -> Dict[str, Any]:
    """Expand ``{"preset": name, ...overrides}`` into a full model dict; plain dicts pass through.

    ``task``: when given, a preset made for another task is rejected.
    """
    d = dict(check_mapping("model", d))
    name = d.pop("preset", None)
    if name is None:
        return copy.deepcopy(d)
    if task is not None and name in PRESETS and PRESETS[name].get("task") != task:
        fail("model.preset", name, f"it is a {PRESETS[name].get('task')!r} preset, not allowed for task {task!r}; "
             f"allowed values: {', '.join(repr(n) for n in preset_names() if PRESETS[n].get('task') == task)}")
    return _merge(preset(name), d)
