"""Benchmark every MoE op on every available backend against the torch reference.

Legend: T tokens, D row width (``--d``), E experts, k choices per token.

    python tools/bench_kernels.py --quick                 # one headline shape, CPU
    python tools/bench_kernels.py                         # full grid (slow on a small CPU)
    python tools/bench_kernels.py --device cuda --T 16384 --d 1024 --E 64 --k 2 8

For each (T, d, E, k) and backend it times, forward and backward (median of --repeats
after --warmup runs; --stat min for a loaded machine): router_topk (logits[T,E] -> weights, scores), assign_slots
(forward only: integer outputs, capacity factor 1.25), permute_rows, unpermute_rows,
and "permute+unpermute" (the token round trip of an MoE layer, with gradients wrt x and
the weights). Speedups are against the "torch" reference in the same process. Results
are printed as a markdown table.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe.ops import available_backends, get_backend  # noqa: E402
from moe.ops import reference as R  # noqa: E402

OPS = ("router_topk", "assign_slots", "permute_rows", "unpermute_rows", "permute+unpermute")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STAT = {"median": statistics.median, "min": min}


def _time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, stat: str) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return STAT[stat](times)


def _inputs(T: int, d: int, E: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Router logits, a dropless routing, its dest map and token activations."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    weights, experts, _, _, _ = R.router_topk(logits, k)
    positions, _, tpe = R.assign_slots(experts, torch.arange(T * k), torch.ones(T, k, dtype=torch.bool), E, None)
    starts = torch.cumsum(tpe, 0) - tpe
    dest = starts[experts] + positions
    x = torch.randn(T, d, generator=gen).to(dtype)
    return {name: t.to(device) for name, t in
            dict(logits=logits, weights=weights, experts=experts, dest=dest, x=x).items()}


def _cases(ops, data, T: int, d: int, E: int, k: int):
    """op name -> (forward() -> (outputs, inputs needing grad), or None when not differentiable)."""
    capacity = max(1, math.ceil(1.25 * T * k / E))
    order = torch.arange(T * k, device=data["x"].device)
    dispatched = torch.ones(T, k, dtype=torch.bool, device=data["x"].device)
    num_rows = T * k

    def router():
        logits = data["logits"].detach().requires_grad_()
        w, _, s, _, _ = ops.router_topk(logits, k, "softmax", True)
        return (w, s), (logits,)

    def slots():
        ops.assign_slots(data["experts"], order, dispatched, E, capacity)
        return None

    def permute():
        x = data["x"].detach().requires_grad_()
        return (ops.permute_rows(x, data["dest"], num_rows),), (x,)

    rows_in = ops.permute_rows(data["x"], data["dest"], num_rows).detach()

    def unpermute():
        rows = rows_in.detach().requires_grad_()
        w = data["weights"].detach().requires_grad_()
        return (ops.unpermute_rows(rows, data["dest"], w),), (rows, w)

    def round_trip():
        x = data["x"].detach().requires_grad_()
        w = data["weights"].detach().requires_grad_()
        rows = ops.permute_rows(x, data["dest"], num_rows)
        return (ops.unpermute_rows(rows, data["dest"], w),), (x, w)

    return {"router_topk": router, "assign_slots": slots, "permute_rows": permute, "unpermute_rows": unpermute,
            "permute+unpermute": round_trip}


def _time_case(forward, device, warmup, repeats, stat) -> Tuple[float, Optional[float]]:
    fwd_ms = _time_ms(forward, device, warmup, repeats, stat)
    probe = forward()
    if probe is None:
        return fwd_ms, None
    outputs, inputs = probe
    grads = [torch.randn_like(o) for o in outputs]

    def backward():
        torch.autograd.grad(outputs, inputs, grads, retain_graph=True)

    return fwd_ms, _time_ms(backward, device, warmup, repeats, stat)


def run(args) -> List[Dict]:
    rows = []
    dtype = DTYPES[args.dtype]
    for device_name in args.device:
        device = torch.device(device_name)
        names = args.backends or [b for b in available_backends(device.type)]
        names = ["torch"] + [n for n in names if n != "torch"]
        for T in args.T:
            for d in args.d:
                for E in args.E:
                    for k in args.k:
                        if k > E:
                            continue
                        if T * k * d * torch.tensor([], dtype=dtype).element_size() > args.max_rows_bytes:
                            print(f"skip T={T} d={d} k={k}: rows exceed --max-rows-bytes", file=sys.stderr)
                            continue
                        data = _inputs(T, d, E, k, dtype, device)
                        base: Dict[str, float] = {}
                        for name in names:
                            ops = get_backend(name, device).ops
                            cases = _cases(ops, data, T, d, E, k)
                            for op in args.ops:
                                fwd, bwd = _time_case(cases[op], device, args.warmup, args.repeats, args.stat)
                                total = fwd + (bwd or 0.0)
                                if name == "torch":
                                    base[op] = total
                                rows.append(dict(device=device_name, op=op, T=T, d=d, E=E, k=k, backend=name,
                                                 fwd=fwd, bwd=bwd, total=total, speedup=base[op] / total))
                                print(_format_row(rows[-1]), file=sys.stderr, flush=True)
                        del data
    return rows


def _format_row(r: Dict) -> str:
    bwd = "-" if r["bwd"] is None else f"{r['bwd']:.3f}"
    return (f"| {r['device']} | {r['op']} | {r['T']} | {r['d']} | {r['E']} | {r['k']} | {r['backend']} | "
            f"{r['fwd']:.3f} | {bwd} | {r['total']:.3f} | {r['speedup']:.2f}x |")


def table(rows: List[Dict]) -> str:
    head = ("| device | op | T | d | E | k | backend | fwd ms | bwd ms | fwd+bwd ms | vs torch |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_format_row(r) for r in rows])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nproc = str(os.cpu_count())
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, nproc={nproc}, torch threads={torch.get_num_threads()}{gpu}; torch {torch.__version__}, "
            f"python {platform.python_version()}")


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    p.add_argument("--device", nargs="+", default=default_devices, choices=["cpu", "cuda"])
    p.add_argument("--T", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--d", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--E", nargs="+", type=int, default=[8, 64])
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 8])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--backends", nargs="+", default=None, help="default: every available backend for the device")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stat", default="median", choices=sorted(STAT),
                   help="summary of the repeats (min is steadier on a shared, loaded machine)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU runs")
    p.add_argument("--max-rows-bytes", type=float, default=2.5e9, help="skip shapes whose rows[T*k, d] exceed this")
    p.add_argument("--quick", action="store_true",
                   help="only the headline shape T=16384, d=1024, E=64, k=2")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.d, args.E, args.k = [16384], [1024], [64], [2]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"command: python tools/bench_kernels.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"dtype: {args.dtype}; {args.stat} of {args.repeats} after {args.warmup} warmup; "
          f"load average before: {_loadavg()}\n")
    print(table(run(args)))


if __name__ == "__main__":
    main()
