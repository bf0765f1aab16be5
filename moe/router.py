"""The learned router: fp32 logits from token features, then ``moe.route``.

Everything here runs in fp32, also under bf16/fp16 autocast (``parallel.precision.fp32_region``):
the softmax / sigmoid, top-k and the balancing losses of ``moe.route`` see fp32 logits.

Legend: T tokens, D model width, E experts.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from parallel.precision import fp32_region

from .config import MoEConfig
from .routing import rng_device, route
from .routing_types import Routing


class Router(nn.Module):
    """W_r [E, D] (and W_noise for noisy top-k, the expert bias for aux-loss-free balancing)."""

    def __init__(self, config: MoEConfig, *, name: str = "moe", dtype=None, device=None):
        super().__init__()
        self.config, self.name = config, name
        E, D = config.num_experts, config.d_model
        self.weight = nn.Parameter(torch.empty(E, D, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=config.init_std)
        rc = config.router
        # Shazeer et al. initialise the noise projection to zero (noise std softplus(0) at start).
        self.noise_weight = (nn.Parameter(torch.zeros(E, D, dtype=dtype, device=device))
                             if rc.policy == "noisy_topk" else None)
        # Aux-loss-free balancing bias: checkpointed with the model, never trained by autograd.
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32, device=device),
                             persistent=rc.policy == "expert_bias")

    def logits(self, x_TD: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Router logits[T, E] in fp32 (with Switch input jitter in training)."""
        with fp32_region(x_TD.device.type):
            x = x_TD.float()
            eps = self.config.router.jitter_eps
            if self.training and eps > 0:
                u = torch.rand(x.shape, generator=generator, device=rng_device(generator))
                x = x * (1.0 - eps + 2.0 * eps * u.to(x.device))
            return x @ self.weight.float().t()

    def forward(self, x_TD: torch.Tensor, modality: Optional[torch.Tensor] = None, *,
                generator: Optional[torch.Generator] = None) -> Routing:
        rc = self.config.router
        with fp32_region(x_TD.device.type):  # the router stays fp32 under bf16/fp16 autocast (parallel.precision)
            noise = x_TD.float() @ self.noise_weight.float().t() if self.noise_weight is not None else None
            return route(self.logits(x_TD, generator), rc, modality=modality, generator=generator,
                         training=self.training, noise_logits=noise,
                         expert_bias=self.expert_bias if rc.policy == "expert_bias" else None,
                         backend=self.config.backend, name=self.name)

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor) -> None:
        """DeepSeek-V3 update, outside autograd: b_i += rate * sign(mean_load - load_i).

        ``load_E`` is the number of assignments each expert received (summed over every
        rank that shares this router, so all replicas apply the same update).
        """
        load = load_E.float()
        self.expert_bias += self.config.router.expert_bias_rate * torch.sign(load.mean() - load)
