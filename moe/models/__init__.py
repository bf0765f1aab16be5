"""Models built on ``moe.MoELayer``: the MoE transformer, a byte-level LM and LIMoE.

- ``TransformerConfig`` / ``Transformer`` / ``Block``: pre-LN blocks whose FFN is a
  dense MLP or an MoE layer (a ``moe.MoEConfig``) every ``moe_every`` blocks;
  ``compile_blocks`` applies ``torch.compile`` to each block.
- ``LMConfig`` / ``LanguageModel``: decoder-only LM over ``moe.data`` bytes.
- ``LIMoEConfig`` / ``LIMoEModel``: one shared tower for images and text, trained
  with a CLIP loss; ``zero_shot_accuracy``.
- ``presets``: named configs (``switch``, ``gshard``, ``tiny_limoe``, each with a
  ``*_dense`` equal-active-FLOPs twin); ``active_ffn_flops_per_token``.
- ``flops``: the FLOPs formulas each config answers with (``TransformerConfig.block_flops_per_token``,
  ``LMConfig`` / ``LIMoEConfig.flops_per_sample``).
- ``apply_activation_checkpointing``: turns ``moe.recompute`` on in a model's blocks or MoE layers.
"""
from .activation_checkpointing import apply_activation_checkpointing
from .limoe import IMAGE, TEXT, LIMoEConfig, LIMoEModel, contrastive_loss, zero_shot_accuracy
from .lm import LanguageModel, LMConfig, lm_loss
from .presets import PRESETS, preset, preset_names, resolve_model_config
from .transformer import (
    MLP,
    Attention,
    Block,
    Transformer,
    TransformerConfig,
    active_ffn_flops_per_token,
    attention_mask,
    compile_blocks,
    dense_equivalent,
    init_weights,
)

__all__ = [
    "IMAGE", "TEXT", "LIMoEConfig", "LIMoEModel", "contrastive_loss", "zero_shot_accuracy",
    "LanguageModel", "LMConfig", "lm_loss", "PRESETS", "preset", "preset_names", "resolve_model_config",
    "MLP", "Attention", "Block", "Transformer", "TransformerConfig", "compile_blocks",
    "active_ffn_flops_per_token", "attention_mask", "dense_equivalent", "init_weights",
    "apply_activation_checkpointing",
]
