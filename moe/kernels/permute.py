"""Triton permute (tokens -> rows) and unpermute (weighted combine), with backward kernels.

Legend: T tokens, k choices per token (the constexpr ``K``), N rows, D width. A
destination of -1 (or out of [0, N)) is skipped. 16-bit rows accumulate in fp32, fp64
rows in fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# Scalars loaded from memory are widened to BLOCK_D vectors before they meet a vector
# mask: Triton 3.9's interpreter mis-types `vector_mask & scalar_mask`.


@triton.jit
def _permute_fwd(x_ptr, dest_ptr, rows_ptr, N, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)  # flat assignment t*K + j
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d = tl.load(dest_ptr + a) + tl.zeros([BLOCK_D], dtype=tl.int64)  # widened, see above
    mask = (offs < D) & (d >= 0) & (d < N)
    v = tl.load(x_ptr + (a // K) * D + offs, mask=mask)
    tl.store(rows_ptr + d * D + offs, v, mask=mask)


@triton.jit
def _gather_sum(src_ptr, dest_ptr, w_ptr, out_ptr, N, D, K: tl.constexpr, WEIGHTED: tl.constexpr,
                ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j (w[t,j] *) src[dest[t,j]]: permute backward and unpermute forward."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for j in tl.static_range(K):
        d = tl.load(dest_ptr + t * K + j) + tl.zeros([BLOCK_D], dtype=tl.int64)
        mask = (offs < D) & (d >= 0) & (d < N)
        v = tl.load(src_ptr + d * D + offs, mask=mask, other=0.0).to(ACC)
        if WEIGHTED:
            v = v * tl.load(w_ptr + t * K + j).to(ACC)
        acc += v
    tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < D)


@triton.jit
def _unpermute_bwd(gy_ptr, rows_ptr, dest_ptr, w_ptr, grad_rows_ptr, grad_w_ptr, N, D, K: tl.constexpr,
                   NEED_ROWS: tl.constexpr, NEED_W: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_rows[dest[a]] = w[a] * gy[t]; grad_w[a] = <gy[t], rows[dest[a]]> (0 when dest < 0)."""
    a = tl.program_id(0).to(tl.int64)
    t = a // K
    d = tl.load(dest_ptr + a) + tl.zeros([BLOCK_D], dtype=tl.int64)
    valid = (d >= 0) & (d < N)
    w = tl.load(w_ptr + a).to(ACC)
    dot = tl.zeros([BLOCK_D], dtype=ACC)
    for start in range(0, D, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        mask = (offs < D) & valid
        gy = tl.load(gy_ptr + t * D + offs, mask=mask, other=0.0).to(ACC)
        if NEED_ROWS:
            tl.store(grad_rows_ptr + d * D + offs, (w * gy).to(grad_rows_ptr.dtype.element_ty), mask=mask)
        if NEED_W:
            dot += gy * tl.load(rows_ptr + d * D + offs, mask=mask, other=0.0).to(ACC)
    if NEED_W:
        tl.store(grad_w_ptr + a, tl.sum(dot, 0))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), 1024)


def permute_rows(x: torch.Tensor, dest: torch.Tensor, num_rows: int) -> torch.Tensor:
    """rows[num_rows, D] with rows[dest[t,j]] = x[t]; untouched rows zero."""
    x, dest = x.contiguous(), dest.contiguous()
    T, D = x.shape
    k = dest.shape[1]
    rows = torch.zeros((num_rows, D), dtype=x.dtype, device=x.device)
    if T * k == 0 or D == 0:
        return rows
    block = _block_d(D)
    _permute_fwd[(T * k, triton.cdiv(D, block))](x, dest, rows, num_rows, D, K=k, BLOCK_D=block)
    return rows


def permute_rows_backward(grad_rows: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """grad_x[T, D] = sum_j grad_rows[dest[t,j]]."""
    grad_rows, dest = grad_rows.contiguous(), dest.contiguous()
    T, k = dest.shape
    N, D = grad_rows.shape
    out = torch.empty((T, D), dtype=grad_rows.dtype, device=grad_rows.device)
    if T == 0 or D == 0:
        return out
    block = _block_d(D)
    _gather_sum[(T, triton.cdiv(D, block))](grad_rows, dest, grad_rows, out, N, D, K=k, WEIGHTED=False,
                                             ACC=_acc(grad_rows.dtype), BLOCK_D=block)
    return out


def unpermute_rows(rows: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y[T, D] = sum_j w[t,j] * rows[dest[t,j]], weights cast to the rows dtype first."""
    rows, dest = rows.contiguous(), dest.contiguous()
    T, k = dest.shape
    N, D = rows.shape
    w = weights.to(rows.dtype).contiguous()
    out = torch.empty((T, D), dtype=rows.dtype, device=rows.device)
    if T == 0 or D == 0:
        return out.zero_()
    block = _block_d(D)
    _gather_sum[(T, triton.cdiv(D, block))](rows, dest, w, out, N, D, K=k, WEIGHTED=True, ACC=_acc(rows.dtype),
                                             BLOCK_D=block)
    return out


def unpermute_rows_backward(grad_y: torch.Tensor, rows: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor,
                            need_rows: bool, need_weights: bool):
    """(grad_rows[N, D] or None, grad_weights[T, k] or None)."""
    rows, dest = rows.contiguous(), dest.contiguous()
    gy = grad_y.to(rows.dtype).contiguous()
    T, k = dest.shape
    N, D = rows.shape
    w = weights.to(rows.dtype).contiguous()
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    grad_rows = torch.zeros((N, D), dtype=rows.dtype, device=rows.device) if need_rows else None
    grad_w = torch.zeros((T, k), dtype=acc_dtype, device=rows.device) if need_weights else None
    if T * k > 0 and D > 0 and (need_rows or need_weights):
        _unpermute_bwd[(T * k,)](gy, rows, dest, w, rows if grad_rows is None else grad_rows,
                                 w if grad_w is None else grad_w, N, D, K=k, NEED_ROWS=bool(need_rows),
                                 NEED_W=bool(need_weights), ACC=_acc(rows.dtype), BLOCK_D=_block_d(D))
    return grad_rows, (None if grad_w is None else grad_w.to(weights.dtype))
