"""LIMoE image-text contrastive task (built-in coloured shapes, or user JSONL captions).

Legend: B batch size, S image side (``image_size``), L text length.

data section (all optional)::

    source: shapes            # or a JSONL file of {"image": ..., "caption": ...} lines
    shapes: {}                # ShapesConfig fields (image_size must match the model)
    image_root: null          # JSONL: folder the image paths are relative to
    val_jsonl: null           # JSONL: validation captions (zero-shot needs labels or shape/colour)
    prompts: null             # JSONL: a list of captions, one per class label, for zero-shot
    zeroshot_size: 500        # evaluation images of held-out combos
    val_size: 256             # validation pairs for the contrastive loss
    eval_batch_size: 128

A batch is ``{"image": FloatTensor[B, 3, S, S], "tokens": LongTensor[B, L],
"mask": BoolTensor[B, L]}``.

Zero-shot evaluation on shapes: images of the HELD-OUT shape-colour combos (never
seen in training), classified among the held-out classes' prompts
(``ShapesDataset("zeroshot").prompts()``, e.g. "a photo of a red circle"); that is
``zero_shot_accuracy``. ``zero_shot_accuracy_all`` classifies the same images among
ALL shape-colour prompts (train and held-out classes), a harder test: it fails if
the model names a seen combo instead; ``zero_shot_colour_accuracy_all``,
``zero_shot_shape_accuracy_all`` and ``zero_shot_seen_rate_all`` say where its errors lie
(right colour, right shape, a seen combo named); ``val_accuracy_all`` classifies the
validation images (seen combos) among all prompts. ``zero_shot_classes`` is the candidate count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from parallel.dims import ProcessGroups
from parallel.rng import sample_rng
from parallel.stages import StagePlan

from parallel.checks import check_int, check_mapping, check_str, fail
from ..data.shapes import ImageTextCollator, ShapesConfig, ShapesDataset, class_prompts
from ..data.user import ImageCaptionDataset
from ..modes import eval_mode
from ..models.limoe import (LIMoEConfig, LIMoEModel, contrastive_loss, make_tokenizer, zero_shot_accuracy,
                            zero_shot_predictions)
from .base import DataConfig, ModelTask

__all__ = ["LIMoEDataConfig", "LIMoETask"]

_SALT = 0x4C494D  # keeps LIMoE batch streams apart from other tasks' streams with the same seed
_TRAIN_SIZE = 2 ** 31 - 1  # shapes train items are drawn from this many (all distinct, rendered on demand)


@dataclass(frozen=True)
class LIMoEDataConfig(DataConfig):
    """The ``data`` section of a LIMoE job (see the module docstring)."""

    source: str = "shapes"
    shapes: Optional[Mapping[str, Any]] = None
    image_root: Optional[str] = None
    val_jsonl: Optional[str] = None
    prompts: Optional[List[str]] = None
    zeroshot_size: int = 500
    val_size: int = 256
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        p = "LIMoEDataConfig"
        check_str(f"{p}.source", self.source, what="'shapes' or a JSONL path")
        for name in ("zeroshot_size", "val_size", "eval_batch_size"):
            check_int(f"{p}.{name}", getattr(self, name), minimum=1)
        for name in ("image_root", "val_jsonl"):
            check_str(f"{p}.{name}", getattr(self, name), allow_none=True, what="a path")
        if self.prompts is not None:
            if isinstance(self.prompts, str) or not isinstance(self.prompts, (list, tuple)) or not self.prompts:
                fail(f"{p}.prompts", self.prompts, "it must be a non-empty list of captions (one per class) or null")
            for i, text in enumerate(self.prompts):
                check_str(f"{p}.prompts[{i}]", text, what="a caption")
        if self.source == "shapes":
            for name in ("image_root", "val_jsonl", "prompts"):
                if getattr(self, name) is not None:
                    fail(f"{p}.{name}", getattr(self, name), "it is only allowed with a JSONL data.source")
            ShapesConfig.from_dict(check_mapping(f"{p}.shapes", self.shapes or {}), f"{p}.shapes")
        elif self.shapes:
            fail(f"{p}.shapes", self.shapes, "it is only allowed with data.source='shapes'")


class LIMoETask(ModelTask):
    """Contrastive image-text training of a ``LIMoEModel``; see ``moe.tasks.base.Task``."""

    name, config_cls, data_config_cls, model_cls = "limoe", LIMoEConfig, LIMoEDataConfig, LIMoEModel
    shapes_config: Optional[ShapesConfig]  # the synthetic data's config (data.source 'shapes'), else None
    train_set: Union[ShapesDataset, ImageCaptionDataset]

    def __init__(self, model_config: LIMoEConfig, data_config: LIMoEDataConfig, *,
                 groups: Optional[ProcessGroups] = None, device="cpu", pipeline: Optional[StagePlan] = None):
        self.check_configs(model_config, data_config)
        super().__init__(model_config, data_config, groups=groups, device=device, pipeline=pipeline)
        self.collate = ImageTextCollator(model_config.text_length, tokenizer=make_tokenizer(model_config.text_tokenizer))
        self._eval_cache: Optional[dict] = None
        if data_config.source == "shapes":
            shapes = ShapesConfig.from_dict(dict(data_config.shapes or {}), "data.shapes")
            self.shapes_config = shapes
            self.train_set = ShapesDataset(shapes, "train", size=_TRAIN_SIZE)
        else:
            self.shapes_config = None
            self.train_set = ImageCaptionDataset(data_config.source, data_config.image_root,
                                                 image_size=model_config.image_size)

    @classmethod
    def check_configs(cls, model_config: LIMoEConfig, data_config: LIMoEDataConfig) -> None:
        if data_config.source == "shapes":
            size = ShapesConfig.from_dict(dict(data_config.shapes or {}), "data.shapes").image_size
            if size != model_config.image_size:
                fail("data.shapes.image_size", size, f"it must equal model.image_size={model_config.image_size}")

    # ------------------------------------------------------------------ data
    def _to_device(self, batch: dict) -> Dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device) for k in ("image", "tokens", "mask")}

    def make_batch(self, step: int, indices: range, *, seed: int) -> Dict[str, torch.Tensor]:
        """Training pairs of samples ``indices`` of step ``step``: a random item of the train set each."""
        n = len(self.train_set)
        items = [self.train_set[int(sample_rng(seed, step, j, _SALT).integers(0, n))] for j in indices]
        return self._to_device(self.collate(items))

    def model_inputs(self, batch: dict) -> tuple:
        return batch["image"], batch["tokens"], batch["mask"]

    def output_loss(self, outputs: tuple, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The contrastive loss of (u, v) (negatives gathered over the data-parallel group) and the temperature."""
        u, v, scale = outputs
        return self.model.contrastive_loss(u, v), {"logit_scale": float(scale.detach())}

    # ------------------------------------------------------------------ evaluation
    def _eval_sets(self) -> dict:
        """Rendered once: zero-shot images/labels/prompts and validation pairs."""
        if self._eval_cache is not None:
            return self._eval_cache
        dc = self.data_config
        out: dict = {}
        if self.shapes_config is not None:
            zs = ShapesDataset(self.shapes_config, "zeroshot", size=dc.zeroshot_size)
            items = [zs[i] for i in range(len(zs))]
            out["zs_images"] = torch.stack([it["image"] for it in items])
            out["zs_labels"] = torch.tensor([it["label"] for it in items])
            out["zs_prompts"] = zs.prompts()
            all_combos = list(self.shapes_config.all_combos())
            out["zs_labels_all"] = torch.tensor([all_combos.index((it["shape"], it["colour"])) for it in items])
            out["zs_prompts_all"] = class_prompts(all_combos)
            val = ShapesDataset(self.shapes_config, "val", size=dc.val_size)
            out["val"] = [val[i] for i in range(len(val))]
        else:
            if dc.val_jsonl is None:
                out["val"] = []
            else:
                user_val = ImageCaptionDataset(dc.val_jsonl, dc.image_root, image_size=self.model_config.image_size)
                out["val"] = [user_val[i] for i in range(min(len(user_val), dc.val_size))]
            items = out["val"]
            if dc.prompts is not None and items and all(0 <= it["label"] < len(dc.prompts) for it in items):
                out["zs_prompts"] = list(dc.prompts)
                out["zs_labels"] = torch.tensor([it["label"] for it in items])
            elif items and all(it["shape"] and it["colour"] for it in items):
                classes = sorted({(it["shape"], it["colour"]) for it in items})
                out["zs_prompts"] = class_prompts(classes)
                out["zs_labels"] = torch.tensor([classes.index((it["shape"], it["colour"])) for it in items])
            if "zs_labels" in out:
                out["zs_images"] = torch.stack([it["image"] for it in items])
        self._eval_cache = out
        return out

    def _all_class_scores(self, shapes: ShapesConfig, images: torch.Tensor, labels: torch.Tensor,
                          bs: int) -> Dict[str, float]:
        """The held-out images classified among ALL shape-colour prompts of ``shapes``, and where the errors lie.

        ``zero_shot_accuracy_all``: share named exactly; ``zero_shot_colour_accuracy_all`` /
        ``zero_shot_shape_accuracy_all``: share whose predicted class has the right colour / shape;
        ``zero_shot_seen_rate_all``: share predicted as a combo seen in training.
        """
        combos = list(shapes.all_combos())
        held = set(shapes.heldout_combos())
        pred = zero_shot_predictions(self.model, images, class_prompts(combos), batch_size=bs).tolist()
        true = labels.tolist()
        n = max(1, len(true))
        return {
            "zero_shot_accuracy_all": sum(p == t for p, t in zip(pred, true)) / n,
            "zero_shot_colour_accuracy_all": sum(combos[p][1] == combos[t][1] for p, t in zip(pred, true)) / n,
            "zero_shot_shape_accuracy_all": sum(combos[p][0] == combos[t][0] for p, t in zip(pred, true)) / n,
            "zero_shot_seen_rate_all": sum(combos[p] not in held for p in pred) / n,
        }

    @torch.no_grad()
    def evaluate(self, *, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Zero-shot accuracy on held-out combos and the validation contrastive loss (eval mode)."""
        check_int("max_batches", max_batches, minimum=1, allow_none=True)
        sets = self._eval_sets()
        bs = self.data_config.eval_batch_size
        limit = None if max_batches is None else max_batches * bs
        out: Dict[str, float] = {}
        with eval_mode(self.model):
            if "zs_images" in sets:
                images, labels = sets["zs_images"][:limit], sets["zs_labels"][:limit]
                out["zero_shot_accuracy"] = zero_shot_accuracy(self.model, images, labels, sets["zs_prompts"],
                                                               batch_size=bs)
                out["zero_shot_classes"] = float(len(sets["zs_prompts"]))
                shapes = self.shapes_config
                if "zs_labels_all" in sets and shapes is not None:  # the shapes source: all its combos known
                    out.update(self._all_class_scores(shapes, images, sets["zs_labels_all"][:limit], bs))
                    # Seen combos (val images) among all prompts: what the model learnt of its training combos.
                    val_items = sets["val"][:limit]
                    if val_items:
                        combos = list(shapes.all_combos())
                        val_labels = torch.tensor([combos.index((it["shape"], it["colour"])) for it in val_items])
                        out["val_accuracy_all"] = zero_shot_accuracy(
                            self.model, torch.stack([it["image"] for it in val_items]), val_labels,
                            sets["zs_prompts_all"], batch_size=bs)
            else:
                out["zero_shot_accuracy"] = float("nan")
            items = sets["val"][:limit]
            losses, weights = [], []
            for start in range(0, len(items), bs):
                b = self._to_device(self.collate(items[start:start + bs]))
                (u, v, scale), _ = self.model.run_pieces(b["image"], b["tokens"], b["mask"])
                losses.append(float(contrastive_loss(u, v, scale)))
                weights.append(b["image"].shape[0])
            out["val_contrastive_loss"] = (sum(loss * w for loss, w in zip(losses, weights)) / sum(weights)
                                           if weights else float("nan"))
        return out
