"""The learned router: fp32 logits from token features, then ``moe.route``.

Everything here runs in fp32, also under bf16/fp16 autocast (``parallel.precision.fp32_region``):
the softmax / sigmoid, top-k and the balancing losses of ``moe.route`` see fp32 logits.

Inside a checkpointed region (``moe.recompute``) a layer routes with ``Router.route_on_tape``:
the region's forward records what the routing drew from and decided (``RouteRecord``), its
recompute in the backward routes again from the recorded state and checks the decisions.

Legend: T tokens, D model width, E experts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from parallel.precision import fp32_region

from .config import MoEConfig
from .recompute import Tape
from .routing import rng_device, route
from .routing_types import Routing


@dataclass
class RouteRecord:
    """What one routing inside a checkpointed region needs to be replayed exactly (``Router.route_on_tape``)."""

    layer: str  # the router's (= its MoE layer's) name: the recompute must meet the records in order
    generator_state: Optional[torch.Tensor]  # the state of the generator passed to the router, else None
    cpu_rng_state: torch.Tensor  # torch's global CPU RNG (routing draws there without a generator)
    expert_bias: Optional[torch.Tensor]  # a copy of the bias it routed with (policy expert_bias)
    decisions: Tuple[torch.Tensor, ...] = ()  # experts, dispatched, positions (detached)
    skipped: bool = False

    def check(self, routing: Routing) -> None:
        """The recompute's routing must take the recorded decisions (else its gradient would be wrong)."""
        same = routing.skipped == self.skipped and all(
            a.shape == b.shape and torch.equal(a, b)
            for a, b in zip((routing.experts, routing.dispatched, routing.positions), self.decisions))
        if not same:
            raise RuntimeError(f"{self.layer}: activation checkpointing recomputed a routing that differs from the "
                               "first forward's (experts, GShard's dispatched choices or capacity slots); its "
                               "gradient would be wrong. Is the router input non-deterministic?")


@contextlib.contextmanager
def _state_kept(generator: Optional[torch.Generator]) -> Iterator[None]:
    """Puts ``generator``'s state back on exit (nothing to keep for None: torch's global RNG is not kept)."""
    if generator is None:
        yield
        return
    state = generator.get_state()
    try:
        yield
    finally:
        generator.set_state(state)


class Router(nn.Module):
    """W_r [E, D] (and W_noise for noisy top-k, the expert bias for aux-loss-free balancing)."""

    weight: nn.Parameter
    noise_weight: Optional[nn.Parameter]  # policy noisy_topk only
    expert_bias: torch.Tensor  # a buffer (saved with the model under policy expert_bias only)

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
                generator: Optional[torch.Generator] = None, expert_bias: Optional[torch.Tensor] = None) -> Routing:
        """Route x[T, D]. ``expert_bias``: the bias to route with instead of the ``expert_bias`` buffer
        (a recompute's replay routes with the recorded one; policy ``expert_bias`` only)."""
        rc = self.config.router
        bias = self.expert_bias if expert_bias is None else expert_bias
        with fp32_region(x_TD.device.type):  # the router stays fp32 under bf16/fp16 autocast (parallel.precision)
            noise = x_TD.float() @ self.noise_weight.float().t() if self.noise_weight is not None else None
            return route(self.logits(x_TD, generator), rc, modality=modality, generator=generator,
                         training=self.training, noise_logits=noise,
                         expert_bias=bias if rc.policy == "expert_bias" else None,
                         backend=self.config.backend, name=self.name)

    def route_on_tape(self, tape: Tape, x_TD: torch.Tensor, modality: Optional[torch.Tensor] = None, *,
                      generator: Optional[torch.Generator] = None) -> Routing:
        """``self(x_TD, modality, generator=generator)`` inside a checkpointed region (``moe.recompute``).

        The region's forward routes and writes a ``RouteRecord`` on ``tape``: the generator and
        CPU RNG states it drew from, a copy of the expert bias, and its decisions. Its recompute
        reads the record back, routes again from those states and that bias (the caller's
        generator is put back afterwards; the buffer is not touched) and raises ``RuntimeError``
        if the decisions differ: the gradient would be wrong.
        """
        if not tape.replaying:
            record = RouteRecord(
                layer=self.name, generator_state=None if generator is None else generator.get_state(),
                cpu_rng_state=torch.get_rng_state(),
                expert_bias=self.expert_bias.detach().clone() if self.config.router.policy == "expert_bias" else None)
            routing = self(x_TD, modality, generator=generator)
            record.decisions = (routing.experts.detach(), routing.dispatched.detach(), routing.positions.detach())
            record.skipped = routing.skipped
            tape.add(record)
            return routing
        record = tape.next(self.name)
        with _state_kept(generator):
            if generator is not None:
                if record.generator_state is None:
                    raise RuntimeError(f"{self.name}: activation checkpointing recomputes a routing with a "
                                       "generator that the first forward did not route with")
                generator.set_state(record.generator_state)
            torch.set_rng_state(record.cpu_rng_state)
            routing = self(x_TD, modality, generator=generator, expert_bias=record.expert_bias)
        record.check(routing)
        return routing

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor) -> None:
        """DeepSeek-V3 update, outside autograd: b_i += rate * sign(mean_load - load_i).

        ``load_E`` is the number of assignments each expert received (summed over every
        rank that shares this router, so all replicas apply the same update).
        """
        load = load_E.float()
        self.expert_bias += self.config.router.expert_bias_rate * torch.sign(load.mean() - load)
