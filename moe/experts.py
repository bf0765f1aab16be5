"""Stacked expert MLPs computed with a grouped GEMM, and their readable loop twin.

Legend: E_l experts held here (``El`` in shape suffixes; E_l = E without expert
parallelism), N rows (expert-major), D model width, F expert width (global),
P the expert-tensor-parallel (etp) size, F_l = F / P the width held here.
Weights: w1_ElDF [E_l, D, F_l] (SwiGLU: [E_l, D, 2 F_l], unit-major: columns 2f and
2f+1 are the gate and the up projection of hidden unit f), w2_ElFD [E_l, F_l, D],
b1 [E_l, F_l] (SwiGLU: [E_l, 2 F_l]), b2 [E_l, D].

Expert tensor parallelism (``etp_size`` P > 1): this rank holds piece ``etp_rank`` of
every expert's hidden units (w1 columns, w2 rows, b1; marked with
``parallel.shards.mark_shard(group="etp")``), so its output for a row is a PARTIAL sum
over its units; ``moe.dispatch.etp_compute`` sums the pieces over the etp group and
adds b2 once (``forward(..., output_bias=False)`` leaves b2 out here). b2 is replicated
and its gradient is partial per etp rank (``parallel.shards.mark_partial_grad``).
The unit-major SwiGLU layout makes a contiguous piece of w1 hold whole units.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from parallel.precision import compute_dtype
from parallel.shards import TensorShard, mark_partial_grad, mark_shard, take_piece

from .ops import get_backend
from .ops.registry import FusedExpertOps, TokenExpertOps, has_fused_expert_mlp, has_token_expert_mlp

_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


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
    """``num_local`` expert MLPs; global expert index = ``first_expert + local index``.

    ``d_ffn`` is the global expert width F; with ``etp_size`` P > 1 this module holds
    the hidden units ``[etp_rank * F / P, (etp_rank + 1) * F / P)`` of every expert
    (F divisible by P). ``last_rows``: rows the last ``forward`` computed (padding rows
    included; 0 before the first call).
    """

    w1: nn.Parameter
    w2: nn.Parameter
    b1: Optional[nn.Parameter]  # None without bias
    b2: Optional[nn.Parameter]

    def __init__(self, num_local: int, d_model: int, d_ffn: int, activation: str = "gelu", *,
                 first_expert: int = 0, bias: bool = False, init_std: float = 0.02,
                 etp_rank: int = 0, etp_size: int = 1,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if etp_size < 1 or not 0 <= etp_rank < etp_size:
            raise ValueError(f"Experts: etp_rank={etp_rank} must be in [0, etp_size={etp_size})")
        if d_ffn % etp_size:
            raise ValueError(f"Experts: d_ffn={d_ffn} is not divisible by the expert-tensor-parallel "
                             f"size etp={etp_size}; it must be a multiple of it")
        self.num_local, self.d_model, self.d_ffn = num_local, d_model, d_ffn
        self.activation, self.first_expert = activation, first_expert
        self.etp_rank, self.etp_size = etp_rank, etp_size
        self.d_ffn_local = d_ffn // etp_size
        units = 2 if activation == "swiglu" else 1  # w1 columns per hidden unit
        kw = dict(dtype=dtype, device=device)
        self.w1 = nn.Parameter(torch.empty(num_local, d_model, units * self.d_ffn_local, **kw))
        self.w2 = nn.Parameter(torch.empty(num_local, self.d_ffn_local, d_model, **kw))
        self.b1 = nn.Parameter(torch.zeros(num_local, units * self.d_ffn_local, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_local, d_model, **kw)) if bias else None
        if etp_size > 1:
            mark_shard(self.w1, dim=2, rank=etp_rank, size=etp_size, group="etp")
            mark_shard(self.w2, dim=1, rank=etp_rank, size=etp_size, group="etp")
            if self.b1 is not None and self.b2 is not None:  # bias
                mark_shard(self.b1, dim=1, rank=etp_rank, size=etp_size, group="etp")
                mark_partial_grad(self.b2, "etp")
        self.init_std = init_std
        # False: ``forward`` runs one matmul per expert (the readable twin; for benchmarks).
        self.grouped_gemm = True
        # The op backend (``moe.ops.get_backend``) whose fused ``expert_mlp`` ``forward`` uses
        # when it has one for the inputs (cpp on CPU); "torch" keeps the grouped_mm path.
        self.backend = "auto"
        self.last_rows = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator_for: Optional[Callable[[str, int], torch.Generator]] = None) -> None:
        """The one expert initialisation: w1 ~ N(0, init_std), w2 ~ N(0, init_std / sqrt 2), biases 0.

        ``generator_for(param_name, global_expert)``: a generator per expert and weight
        (``moe.models.init_weights`` seeds it from the parameter name and the GLOBAL
        expert index, so an expert gets the same weights on whichever rank holds it);
        None draws from torch's global RNG. Under expert tensor parallelism each
        expert's FULL global weight is drawn from its generator and this rank keeps its
        piece, so every etp layout starts from the weights of the one-process model.
        """
        # Output projection scaled down with width, as in GPT-2 style inits.
        stds = {"w1": self.init_std, "w2": self.init_std / math.sqrt(2.0)}
        for name, std in stds.items():
            w = getattr(self, name)
            if generator_for is None:
                nn.init.normal_(w, std=std)
                continue
            shard = getattr(w, "tensor_shard", None)
            # The shard of one expert's slice w[e]: the expert dimension is gone.
            piece = None if shard is None else TensorShard(shard.dim - 1, shard.rank, shard.size,
                                                           shard.group, shard.global_len)
            full_shape = w.shape[1:] if piece is None else piece.global_shape(w.shape[1:])
            for e in range(self.num_local):
                g = generator_for(name, self.first_expert + e)
                full = torch.randn(full_shape, generator=g, dtype=torch.float32).mul_(std)
                w[e].copy_(take_piece(full, piece).to(w.dtype))
        for b in (self.b1, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":  # unit-major: (unit, {gate, up})
            pairs = h.unflatten(-1, (h.shape[-1] // 2, 2))
            return F.silu(pairs[..., 0]) * pairs[..., 1]
        return _ACTIVATIONS[self.activation](h)

    def _bias(self, h: torch.Tensor, b: Optional[torch.Tensor], counts_El: torch.Tensor) -> torch.Tensor:
        if b is None:
            return h
        return h + torch.repeat_interleave(b.to(h.dtype), counts_El, dim=0, output_size=h.shape[0])

    def forward(self, rows_ND: torch.Tensor, counts_El: torch.Tensor, *,
                padded_capacity: Optional[int] = None, output_bias: bool = True) -> torch.Tensor:
        """rows[N, D] expert-major with counts[E_l] rows per local expert -> out[N, D].

        ``padded_capacity=C``: every expert owns exactly C rows (N = E*C, the padded
        layout); one batched matmul then serves all experts with static shapes.
        ``output_bias=False``: leave b2 out (the etp path adds it once, after summing
        the partial outputs; ``add_output_bias``).
        """
        if padded_capacity is not None:
            E, C = self.num_local, padded_capacity

            def padded_mm(a, b, counts):
                return torch.bmm(a.view(E, C, a.shape[1]), b).view(E * C, b.shape[2])

            return self._compute(rows_ND, counts_El, padded_mm, output_bias)
        rows = rows_ND.to(compute_dtype(rows_ND))  # mixed precision: the autocast dtype (fp32: no-op)
        fused = self._fused_ops(rows)
        if fused is not None:
            return self._compute_fused(fused, rows, counts_El, output_bias).to(rows_ND.dtype)
        return self._compute(rows_ND, counts_El, grouped_matmul if self.grouped_gemm else loop_matmul, output_bias)

    def _fused_ops(self, rows_ND: torch.Tensor) -> Optional[FusedExpertOps]:
        """The op set whose fused ``expert_mlp`` runs this call, or None (torch path): eager
        only, grouped GEMM on, and a backend with kernels for these inputs."""
        if torch.compiler.is_compiling() or not self.grouped_gemm:
            return None
        ops = get_backend(self.backend, rows_ND.device).ops
        # zero-size probes of the weights in the rows' dtype (the call casts them): no copy of the weights here
        w1, w2 = (w.detach()[:0].to(rows_ND.dtype) for w in (self.w1, self.w2))
        if not has_fused_expert_mlp(ops) or not ops.expert_mlp_supported(rows_ND, w1, w2):
            return None
        return ops

    def _compute_fused(self, ops: FusedExpertOps, rows_ND: torch.Tensor, counts_El: torch.Tensor,
                       output_bias: bool) -> torch.Tensor:
        if rows_ND.shape[0] != int(counts_El.sum()):
            raise ValueError(f"rows has {rows_ND.shape[0]} rows but counts sum to {int(counts_El.sum())}")
        self.last_rows = rows_ND.shape[0]
        dtype = rows_ND.dtype
        b1 = None if self.b1 is None else self.b1.to(dtype)
        b2 = None if self.b2 is None or not output_bias else self.b2.to(dtype)
        return ops.expert_mlp(rows_ND, counts_El, self.w1.to(dtype), b1, self.w2.to(dtype), b2, self.activation)

    def token_ops(self, x_TD: torch.Tensor) -> Optional[TokenExpertOps]:
        """The op set whose token-level fused expert MLP (``expert_mlp_tokens``: rows gathered from x
        in place, outputs combined with the routing weights inside the op) runs x, or None."""
        probe = x_TD.detach()[:0].to(compute_dtype(x_TD))  # the rows' dtype under autocast, without a copy of x
        ops = self._fused_ops(probe)
        return ops if ops is not None and has_token_expert_mlp(ops) else None

    def forward_tokens(self, ops: TokenExpertOps, x_TD: torch.Tensor, dest_TK: torch.Tensor, weights_TK: torch.Tensor,
                       counts_El: torch.Tensor) -> torch.Tensor:
        """y[t] = sum_j weights[t, j] * (expert owning row dest[t, j])(x[t]): permute -> ``forward`` ->
        unpermute in one op (``ops`` from ``token_ops``), without the permuted [N, D] copies.

        dest[T, k]: the unpadded plan (``moe.permute.make_plan``; -1 where dropped), rows
        expert-major by counts[E_l]. Returns y[T, D] in x's dtype.
        """
        x = x_TD.to(compute_dtype(x_TD))  # mixed precision: the autocast dtype (fp32: no-op)
        self.last_rows = int(counts_El.sum())
        dtype = x.dtype
        b1 = None if self.b1 is None else self.b1.to(dtype)
        b2 = None if self.b2 is None else self.b2.to(dtype)
        y = ops.expert_mlp_tokens(x, dest_TK, weights_TK, counts_El, self.w1.to(dtype), b1, self.w2.to(dtype), b2,
                                  self.activation)
        return y.to(x_TD.dtype)

    def forward_loop(self, rows_ND: torch.Tensor, counts_El: torch.Tensor) -> torch.Tensor:
        """Same as ``forward`` with one matmul per expert (the oracle)."""
        return self._compute(rows_ND, counts_El, loop_matmul, True)

    def add_output_bias(self, out_ND: torch.Tensor, counts_El: torch.Tensor) -> torch.Tensor:
        """out + b2 of each row's expert (rows expert-major by ``counts``); out unchanged without bias."""
        return self._bias(out_ND, self.b2, counts_El)

    def _compute(self, rows_ND, counts_El, mm, output_bias):
        if not torch.compiler.is_compiling():
            if rows_ND.shape[0] != int(counts_El.sum()):
                raise ValueError(f"rows has {rows_ND.shape[0]} rows but counts sum to {int(counts_El.sum())}")
            self.last_rows = rows_ND.shape[0]
        # mixed precision: grouped_mm is outside autocast's op list, so cast to its dtype here (fp32: no-op)
        dtype = compute_dtype(rows_ND)
        rows = rows_ND.to(dtype)
        w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
        h = self._act(self._bias(mm(rows, w1, counts_El), self.b1, counts_El))
        out = mm(h, w2, counts_El)
        out = self._bias(out, self.b2, counts_El) if output_bias else out
        return out.to(rows_ND.dtype)

    def expert_mlp(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Local expert ``e`` applied to every row of x (dense oracle building block;
        under etp: this rank's partial output plus b2)."""
        h = x_TD @ self.w1[e].to(x_TD.dtype)
        if self.b1 is not None:
            h = h + self.b1[e]
        h = self._act(h) @ self.w2[e].to(x_TD.dtype)
        return h if self.b2 is None else h + self.b2[e]
