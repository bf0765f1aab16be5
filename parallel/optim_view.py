"""A per-parameter Adam view of an optimizer that keeps ``step`` per parameter group (for checkpoints).

Checkpoints save and load AdamW's per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq``
under ``state[p]``). An optimizer that keeps ``step`` per parameter GROUP (apex's FusedAdam,
``moe.trainer.fused``) is saved and loaded through ``AdamView``: a torch AdamW over the same
parameters whose moments are that optimizer's own tensors. ``parallel.engine.EngineBase``
uses it for any optimizer that is not a torch Adam/AdamW.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["AdamView"]


class AdamView:
    """A torch AdamW standing for an optimizer that keeps ``step`` per group (apex FusedAdam) for checkpoints.

    ``view()`` builds the AdamW: the same parameters and groups, ``state[p]`` holding the optimizer's own
    ``exp_avg`` / ``exp_avg_sq`` tensors (so a checkpoint load writes into them in place) and the group's
    step; ``push()`` after a load copies the loaded steps (and moments a fresh optimizer lacked) back.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._adam: Optional[torch.optim.AdamW] = None

    def view(self) -> torch.optim.AdamW:
        groups = [{k: v for k, v in g.items() if k != "step"} for g in self.optimizer.param_groups]
        adam = torch.optim.AdamW(groups)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if st and "exp_avg" in st:
                    adam.state[p] = {"step": torch.tensor(float(group.get("step", 0)), dtype=torch.float32),
                                     "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        self._adam = adam
        return adam

    @torch.no_grad()
    def push(self) -> None:
        adam, self._adam = self._adam, None
        if adam is None:
            raise RuntimeError("AdamView.push: load a checkpoint into view() first")
        for group in self.optimizer.param_groups:
            steps = {float(adam.state[p]["step"]) for p in group["params"] if "step" in adam.state.get(p, {})}
            if len(steps) > 1:
                raise RuntimeError(f"a checkpoint holds different step counts {sorted(steps)} within one group")
            if steps:
                group["step"] = int(steps.pop())
            for p in group["params"]:
                loaded = adam.state.get(p, {})
                if "exp_avg" in loaded:
                    mine = self.optimizer.state.setdefault(p, {})
                    for key in ("exp_avg", "exp_avg_sq"):
                        if mine.get(key) is not loaded[key]:
                            mine[key] = loaded[key].detach().clone()
