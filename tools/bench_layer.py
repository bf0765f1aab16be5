"""Benchmark a whole MoELayer (forward + backward) per op backend, and the grouped GEMM
against its per-expert loop twin. Prints a markdown table.

    python tools/bench_layer.py                      # defaults below
    python tools/bench_layer.py --tokens 8192 --d-model 512 --experts 16 --top-k 2 --threads 2

Speed belongs here, never in tests.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import moe
from moe.ops import available_backends


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factors", default="none,1.25", help="comma list; 'none' = dropless")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model)
    print(f"machine: {platform.processor() or platform.machine()}, threads {args.threads}, torch {torch.__version__}")
    print(f"T={args.tokens} d={args.d_model} f={args.d_ffn} E={args.experts} k={args.top_k}; "
          f"min of {args.repeats} runs, forward + backward\n")
    print("| capacity factor | backend | experts | ms | tokens/s |")
    print("|---|---|---|---|---|")
    for cf_text in args.capacity_factors.split(","):
        cf = None if cf_text.strip() == "none" else float(cf_text)
        for backend in available_backends("cpu"):
            cfg = moe.MoEConfig(d_model=args.d_model, d_ffn=args.d_ffn, num_experts=args.experts, backend=backend,
                                router=moe.RouterConfig(top_k=args.top_k, capacity_factor=cf))
            layer = moe.MoELayer(cfg)
            for experts_path in ("grouped", "loop"):
                layer.experts.grouped_gemm = experts_path == "grouped"

                def step(layer=layer):
                    y, aux = layer(x)
                    (y.square().mean() + sum(aux.values())).backward()

                sec = _time(step, args.repeats)
                print(f"| {cf_text} | {backend} | {experts_path} | {1e3 * sec:.1f} | {args.tokens / sec:,.0f} |")


if __name__ == "__main__":
    main()
