"""Stacked expert MLPs computed with a grouped GEMM, and their readable loop twin.

Legend: E_l experts held here (``El`` in shape suffixes; E_l = E without expert
parallelism), N rows (expert-major), D model width, F expert width.
Weights: w1_ElDF [E_l, D, F] (SwiGLU: [E_l, D, 2F], gate then up), w2_ElFD [E_l, F, D].
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch's CPU grouped_mm supports fp32/bf16/fp16 with 16-byte aligned row strides.
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return False
    item = a.element_size()
    return (a.shape[1] * item) % 16 == 0 and (b.shape[2] * item) % 16 == 0


def grouped_matmul(a_ND: torch.Tensor, b_ElDF: torch.Tensor, counts_El: torch.Tensor) -> torch.Tensor:
    """out[rows of expert e] = a[rows of expert e] @ b[e]; rows are expert-major by ``counts``."""
    if _grouped_mm_ok(a_ND, b_ElDF):
        offs = torch.cumsum(counts_El, 0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(a_ND.contiguous(), b_ElDF, offs=offs))
    return loop_matmul(a_ND, b_ElDF, counts_El)


def loop_matmul(a_ND: torch.Tensor, b_ElDF: torch.Tensor, counts_El: torch.Tensor) -> torch.Tensor:
    """The readable twin of ``grouped_matmul``: one matmul per expert."""
    chunks = torch.split(a_ND, counts_El.tolist())
    return torch.cat([chunk @ b_ElDF[e] for e, chunk in enumerate(chunks)] + [a_ND.new_zeros(0, b_ElDF.shape[2])])


class Experts(nn.Module):
    """``num_local`` expert MLPs; global expert index = ``first_expert + local index``."""

    def __init__(self, num_local: int, d_model: int, d_ffn: int, activation: str = "gelu", *,
                 first_expert: int = 0, bias: bool = False, init_std: float = 0.02,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.num_local, self.d_model, self.d_ffn = num_local, d_model, d_ffn
        self.activation, self.first_expert = activation, first_expert
        width = 2 * d_ffn if activation == "swiglu" else d_ffn
        kw = dict(dtype=dtype, device=device)
        self.w1 = nn.Parameter(torch.empty(num_local, d_model, width, **kw))
        self.w2 = nn.Parameter(torch.empty(num_local, d_ffn, d_model, **kw))
        self.b1 = nn.Parameter(torch.zeros(num_local, width, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_local, d_model, **kw)) if bias else None
        self.init_std = init_std
        # False: ``forward`` runs one matmul per expert (the readable twin; for benchmarks).
        self.grouped_gemm = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator_for: Optional[Callable[[str, int], torch.Generator]] = None) -> None:
        """The one expert initialisation: w1 ~ N(0, init_std), w2 ~ N(0, init_std / sqrt 2), biases 0.

        ``generator_for(param_name, global_expert)``: a generator per expert and weight
        (``moe.models.init_weights`` seeds it from the parameter name and the GLOBAL
        expert index, so an expert gets the same weights on whichever rank holds it);
        None draws from torch's global RNG.
        """
        # Output projection scaled down with width, as in GPT-2 style inits.
        stds = {"w1": self.init_std, "w2": self.init_std / math.sqrt(2.0)}
        for name, std in stds.items():
            w = getattr(self, name)
            if generator_for is None:
                nn.init.normal_(w, std=std)
                continue
            for e in range(self.num_local):
                g = generator_for(name, self.first_expert + e)
                w[e].copy_(torch.randn(w[e].shape, generator=g, dtype=torch.float32).mul_(std).to(w.dtype))
        for b in (self.b1, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return _ACTIVATIONS[self.activation](h)

    def _bias(self, h: torch.Tensor, b: Optional[torch.Tensor], counts_El: torch.Tensor) -> torch.Tensor:
        if b is None:
            return h
        return h + torch.repeat_interleave(b, counts_El, dim=0, output_size=h.shape[0])

    def forward(self, rows_ND: torch.Tensor, counts_El: torch.Tensor, *,
                padded_capacity: Optional[int] = None) -> torch.Tensor:
        """rows[N, D] expert-major with counts[E_l] rows per local expert -> out[N, D].

        ``padded_capacity=C``: every expert owns exactly C rows (N = E*C, the padded
        layout); one batched matmul then serves all experts with static shapes.
        """
        if padded_capacity is not None:
            E, C = self.num_local, padded_capacity

            def padded_mm(a, b, counts):
                return torch.bmm(a.view(E, C, a.shape[1]), b).view(E * C, b.shape[2])

            return self._compute(rows_ND, counts_El, padded_mm)
        return self._compute(rows_ND, counts_El, grouped_matmul if self.grouped_gemm else loop_matmul)

    def forward_loop(self, rows_ND: torch.Tensor, counts_El: torch.Tensor) -> torch.Tensor:
        """Same as ``forward`` with one matmul per expert (the oracle)."""
        return self._compute(rows_ND, counts_El, loop_matmul)

    def _compute(self, rows_ND, counts_El, mm):
        if not torch.compiler.is_compiling() and rows_ND.shape[0] != int(counts_El.sum()):
            raise ValueError(f"rows has {rows_ND.shape[0]} rows but counts sum to {int(counts_El.sum())}")
        w1, w2 = self.w1.to(rows_ND.dtype), self.w2.to(rows_ND.dtype)
        h = self._act(self._bias(mm(rows_ND, w1, counts_El), self.b1, counts_El))
        return self._bias(mm(h, w2, counts_El), self.b2, counts_El)

    def expert_mlp(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Local expert ``e`` applied to every row of x (dense oracle building block)."""
        h = x_TD @ self.w1[e].to(x_TD.dtype)
        if self.b1 is not None:
            h = h + self.b1[e]
        h = self._act(h) @ self.w2[e].to(x_TD.dtype)
        return h if self.b2 is None else h + self.b2[e]
