"""Peak memory of one forward + backward under ``train.activation_checkpointing`` none / moe / block.

    OMP_NUM_THREADS=1 python tools/bench_memory_recompute.py [--layers 8 --d-model 256 --batch 8 --seq 256 ...]

Builds one ``moe.models.transformer.Transformer`` (pre-LN blocks, every ``--moe-every``-th an
MoE layer: GShard top-2 at capacity factor 1.25, dropout 0.1, so every random draw that the
recompute must replay is there), then, for each mode, the same weights with
``moe.models.activation_checkpointing.apply_activation_checkpointing`` and one forward + backward on the same batch
under the same micro-batch seed. Memory is measured with torch's profiler
(``profile_memory=True``): its ``[memory]`` events record every CPU allocation and free with
its address and size; summing them (a free of memory allocated before profiling is ignored)
gives the bytes held among the tensors the step allocated, i.e. what a step adds on top of
the weights (activations, saved tensors, temporaries and the gradients):

- ``after forward``: held when the forward ends, i.e. what is kept for the backward;
- ``peak``: the most held at any moment of the forward + backward.

It also checks that every mode gives the same loss and gradients as ``none`` (max abs
difference printed) and reports the median wall time of ``--repeats`` steps (a shared CPU:
indicative only). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
for path in (ROOT, TOOLS):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from torch.profiler import record_function  # noqa: E402

import moe  # noqa: E402
from alloc_peak import allocation_peak  # noqa: E402
from moe.models.transformer import Transformer, TransformerConfig, init_weights  # noqa: E402
from parallel.rng import micro_batch_scope  # noqa: E402
from moe.models.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from moe.recompute import MODES  # noqa: E402


def build(args, mode: str) -> Transformer:
    router = moe.RouterConfig(policy="gshard", top_k=2, capacity_factor=1.25, drop_policy="position")
    mcfg = moe.MoEConfig(d_model=args.d_model, d_ffn=args.d_ffn, num_experts=args.experts, router=router,
                         aux_losses={"load_balancing": 0.01, "z_loss": 0.001})
    cfg = TransformerConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ffn=args.d_ffn,
                            moe_every=args.moe_every, moe=mcfg, causal=True, dropout=0.1)
    model = Transformer(cfg)
    init_weights(model, 0, n_layers=args.layers)
    return apply_activation_checkpointing(model, mode)


def step(model: Transformer, x: torch.Tensor, w: torch.Tensor):
    with micro_batch_scope(1234):
        y, aux = model(x)
    loss = (y * w).mean() + sum(aux.values())
    with record_function("bench_backward"):
        loss.backward()
    return loss.detach()


def measure(args, mode: str, x, w):
    model = build(args, mode)
    held = allocation_peak(lambda: step(model, x, w), marker="bench_backward")
    loss, peak, after_forward = held["result"], held["peak"], held["at_marker"]
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    times = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step(model, x, w)
        times.append(time.perf_counter() - t0)
    return {"peak": peak, "after_forward": after_forward, "loss": loss, "grads": grads,
            "time": statistics.median(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--moe-every", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.layers < 1 or args.moe_every < 1 or args.moe_every > args.layers:
        ap.error("need --layers >= 1 and 1 <= --moe-every <= --layers")
    data = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.d_model, generator=data)
    w = torch.randn(args.batch, args.seq, args.d_model, generator=data)
    results = {mode: measure(args, mode, x, w) for mode in MODES}
    ref = results["none"]
    print(f"Transformer: {args.layers} blocks (MoE every {args.moe_every}: {args.experts} experts, GShard top-2, "
          f"capacity factor 1.25), d_model {args.d_model}, d_ffn {args.d_ffn}, {args.heads} heads, causal, "
          f"dropout 0.1; batch {args.batch} x {args.seq} tokens, fp32; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)\n")
    print("| activation_checkpointing | peak fwd+bwd MiB | held after forward MiB | peak vs none "
          "| step time s (median) | max abs grad diff vs none |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        diff = max((r["grads"][n] - ref["grads"][n]).abs().max().item() for n in ref["grads"])
        diff = max(diff, (r["loss"] - ref["loss"]).abs().item())
        print(f"| {mode} | {r['peak'] / 2**20:.1f} | {r['after_forward'] / 2**20:.1f} | "
              f"{r['peak'] / ref['peak']:.2f}x | {r['time']:.3f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
