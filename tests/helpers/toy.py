"""A tiny toy task for trainer tests: per-token regression through one MoE layer.

Two modalities (even/odd token positions), so every part of the loop (aux losses,
routing telemetry by modality, plots, EP all-to-all) runs in a fraction of a second
per step. Configs name it as ``task: tests.helpers.toy:build_toy_task``.
"""
from __future__ import annotations

import torch
from torch import nn

import moe
from moe.trainer.config import from_dict
from moe.trainer.loop import Trainer

D_IN, D, SEQ = 8, 16, 6


class ToyModel(nn.Module):
    def __init__(self, moe_cfg: moe.MoEConfig, ep_group):
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.moe = moe.MoELayer(moe_cfg, ep_group=ep_group)
        self.out = nn.Linear(D, 1)

    def forward(self, x, modality):
        h = torch.tanh(self.inp(x))
        y, aux = self.moe(h, modality)
        return self.out(h + y).squeeze(-1), aux


class ToyTask:
    """Per-token regression y = sin(x . w) (sign flipped on odd positions)."""

    def __init__(self, model_cfg, data_cfg, groups=None, device="cpu"):
        E = int(model_cfg.get("num_experts", 4))
        cf = model_cfg.get("capacity_factor", 1.25)
        self.fail_at = data_cfg.get("fail_at_step")
        cfg = moe.MoEConfig(d_model=D, d_ffn=32, num_experts=E, num_modalities=2,
                            router=moe.RouterConfig(top_k=2, capacity_factor=cf, eval_capacity_factor=None),
                            aux_losses={"load_balancing": 0.01, "z_loss": 1e-3})
        ep_group = groups.ep_group if groups is not None and groups.dims.ep > 1 else None
        self.model = ToyModel(cfg, ep_group).to(device)
        self.w_true = torch.linspace(-1, 1, D_IN)
        self.device = device
        self.calls = 0

    def _batch(self, g: torch.Generator, n: int):
        x = torch.randn(n, SEQ, D_IN, generator=g)
        modality = (torch.arange(SEQ) % 2).expand(n, SEQ).contiguous()
        y = torch.sin(2 * x @ self.w_true) * (1 - 2 * modality)
        return {"x": x, "modality": modality, "y": y}

    def micro_batch(self, step, start, count, *, seed):
        """Samples start..start+count-1 of step's global batch; sample j depends on (seed, step, j) only."""
        parts = [self._batch(torch.Generator().manual_seed(seed * 100_003 + step * 1009 + j), 1)
                 for j in range(start, start + count)]
        return {**{k: torch.cat([p[k] for p in parts]) for k in parts[0]}, "step": step}

    def loss(self, batch):
        if self.fail_at is not None and batch["step"] == self.fail_at:
            raise RuntimeError(f"toy failure at step {self.fail_at}")
        pred, aux = self.model(batch["x"], batch["modality"])
        mse = ((pred - batch["y"]) ** 2).mean()
        total = mse + sum(aux.values())
        return total, {"mse": float(mse.detach()), **{k: float(v.detach()) for k, v in aux.items()}}

    def evaluate(self, *, max_batches=None):
        batch = self._batch(torch.Generator().manual_seed(4242), 16)
        pred, _ = self.model(batch["x"], batch["modality"])
        mse = float(((pred - batch["y"]) ** 2).mean())
        return {"val_loss": mse, "zero_shot_accuracy": 1.0 / (1.0 + mse)}

    def moe_layers(self):
        return [self.model.moe]


def build_toy_task(name, model_cfg, data_cfg, *, groups=None, device="cpu"):
    """Task builder with the ``moe.tasks.build_task`` signature (used as ``module:function``)."""
    return ToyTask(model_cfg, data_cfg, groups=groups, device=device)


TOY = "tests.helpers.toy:build_toy_task"


def toy_config(out_dir, **sections):
    raw = {
        "task": TOY,
        "model": {"num_experts": 4},
        "parallel": {"ep": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine", "grad_clip": 1.0},
        "train": {"steps": 6, "global_batch_size": 4, "seed": 3, "log_every": 2, "eval_every": 3,
                  "checkpoint_every": 3, "out_dir": str(out_dir)},
        "telemetry": {"tensorboard": False, "plots": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


def trainer_in_group(cfg):
    """A Trainer on the live process group (tests.helpers.distributed started it)."""
    from parallel.launch import build_groups

    groups = build_groups(cfg.parallel.ep)
    return Trainer(cfg, groups=groups, device="cpu", log=lambda m: None)
