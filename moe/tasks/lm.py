"""Byte-level language modelling task (stdlib source corpus or user text files).

Legend: B batch size, L sequence length.

data section (all optional)::

    source: stdlib            # or a .txt file, a folder of .txt files, or a list of them
    max_bytes: 2000000        # corpus budget (None: everything)
    val_fraction: 0.05        # share of 8 KiB blocks held out for validation
    block_size: 8192
    split_seed: 0             # which blocks are validation
    seq_len: null             # default: the model's max_seq_len
    eval_batch_size: 16
    eval_batches: 16          # default cap on evaluation batches

A batch is ``{"tokens": LongTensor[B, L], "targets": LongTensor[B, L]}``: random
windows of the training bytes, targets shifted by one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from parallel.dims import ProcessGroups
from parallel.rng import sample_rng
from parallel.stages import StagePlan

from parallel.checks import check_int, check_number, check_str, fail
from ..data.text import load_corpus
from ..modes import eval_mode
from ..models.lm import LanguageModel, LMConfig
from .base import DataConfig, ModelTask

__all__ = ["LMDataConfig", "LMTask"]

_SALT = 0x4C4D  # keeps LM batch streams apart from other tasks' streams with the same seed


@dataclass(frozen=True)
class LMDataConfig(DataConfig):
    """The ``data`` section of an LM job (see the module docstring)."""

    source: Union[str, list] = "stdlib"
    max_bytes: Optional[int] = 2_000_000
    val_fraction: float = 0.05
    block_size: int = 8192
    split_seed: int = 0
    seq_len: Optional[int] = None
    eval_batch_size: int = 16
    eval_batches: int = 16

    def __post_init__(self) -> None:
        p = "LMDataConfig"
        source = self.source
        if isinstance(source, (list, tuple)):
            if not source:
                fail(f"{p}.source", source, "a list of paths must not be empty")
            for i, item in enumerate(source):
                check_str(f"{p}.source[{i}]", item, what="a path")
        else:
            check_str(f"{p}.source", source, what="'stdlib', a path or a list of paths")
        for name, lo in (("block_size", 1), ("split_seed", 0), ("eval_batch_size", 1), ("eval_batches", 1)):
            check_int(f"{p}.{name}", getattr(self, name), minimum=lo)
        for name in ("max_bytes", "seq_len"):
            check_int(f"{p}.{name}", getattr(self, name), minimum=1, allow_none=True)
        check_number(f"{p}.val_fraction", self.val_fraction, minimum=0, maximum=1, min_open=True, max_open=True)


class LMTask(ModelTask):
    """Next-byte prediction with an MoE (or dense) decoder; see ``moe.tasks.base.Task``."""

    name, config_cls, data_config_cls, model_cls = "lm", LMConfig, LMDataConfig, LanguageModel

    def __init__(self, model_config: LMConfig, data_config: LMDataConfig, *,
                 groups: Optional[ProcessGroups] = None, device="cpu", pipeline: Optional[StagePlan] = None):
        self.check_configs(model_config, data_config)
        super().__init__(model_config, data_config, groups=groups, device=device, pipeline=pipeline)
        self.seq_len = data_config.seq_len or model_config.max_seq_len
        source = data_config.source
        self.corpus = load_corpus(source if isinstance(source, str) else list(source),
                                  max_bytes=data_config.max_bytes, val_fraction=data_config.val_fraction,
                                  block_size=data_config.block_size, seed=data_config.split_seed)
        for split in ("train", "val"):
            n = getattr(self.corpus, split).numel()
            if n < self.seq_len + 1:
                raise ValueError(f"the {split} split has {n} bytes, fewer than seq_len + 1 = {self.seq_len + 1}; "
                                 "add text, lower data.seq_len or change data.val_fraction")

    @classmethod
    def check_configs(cls, model_config: LMConfig, data_config: LMDataConfig) -> None:
        if data_config.seq_len is not None and data_config.seq_len > model_config.max_seq_len:
            fail("data.seq_len", data_config.seq_len, f"it must be <= model.max_seq_len={model_config.max_seq_len}")

    # ------------------------------------------------------------------ data
    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> Dict[str, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        win = tokens[idx].long()
        return {"tokens": win[:, :-1].to(self.device), "targets": win[:, 1:].to(self.device)}

    def make_batch(self, step: int, indices: range, *, seed: int) -> Dict[str, torch.Tensor]:
        """Training windows of samples ``indices`` of step ``step``: a random start for each."""
        n_starts = self.corpus.train.numel() - self.seq_len
        starts = torch.tensor([int(sample_rng(seed, step, j, _SALT).integers(0, n_starts)) for j in indices],
                              dtype=torch.long)
        return self._windows(self.corpus.train, starts)

    # ------------------------------------------------------------------ loss / eval
    def flops_per_sample(self) -> int:
        """Forward model FLOPs of one training sequence, at its ``seq_len`` (``LMConfig.flops_per_sample``)."""
        return self.model_config.flops_per_sample(self.seq_len)

    def model_inputs(self, batch: dict) -> tuple:
        return (batch["tokens"],)

    def output_loss(self, outputs: tuple, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Mean next-byte cross entropy of the logits."""
        return self.model.loss(outputs[0], batch["targets"]), {}

    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The mean cross entropy of a batch. Under pipelining it is computed on the last stage and
        only the number is broadcast (not the logits)."""
        pipe = self.model.pipe
        if pipe is None:
            return self.fp32_output_loss(self.model.run_pieces(batch["tokens"])[0], batch)[0]
        return pipe.relay(self.model, (batch["tokens"],), then=lambda out: self.fp32_output_loss(out, batch)[0])[0]

    @torch.no_grad()
    def evaluate(self, *, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Mean next-byte loss over fixed, non-overlapping validation windows (eval mode)."""
        dc = self.data_config
        check_int("max_batches", max_batches, minimum=1, allow_none=True)
        n_batches = dc.eval_batches if max_batches is None else max_batches
        val = self.corpus.val
        starts = torch.arange(0, val.numel() - self.seq_len, self.seq_len)
        total, count = 0.0, 0
        with eval_mode(self.model):
            for b in range(n_batches):
                chunk = starts[b * dc.eval_batch_size:(b + 1) * dc.eval_batch_size]
                if chunk.numel() == 0:
                    break
                batch = self._windows(val, chunk)
                total += float(self.eval_loss(batch)) * batch["targets"].numel()
                count += batch["targets"].numel()
        val_loss = total / count
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0)),
                "val_bits_per_byte": val_loss / math.log(2)}
