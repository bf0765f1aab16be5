"""The MoE layer against the ideal grouped GEMM and DeepSpeed-MoE: forward + backward time
and peak memory, side by side in one process, interleaved repeats.

Legend: T tokens, d model width, f expert width, E experts, k choices per token, cf
capacity factor ("none": dropless).

    python tools/bench_moe.py --regime dispatch                  # one regime, CPU fp32
    python tools/bench_moe.py --regime all --repeats 5 --json out.json
    python tools/bench_moe.py --regime fine --sweep              # + two other shapes of the regime
    python tools/bench_moe.py --T 2048 --d 256 --f 512 --E 8 --k 2  # any shape
    python tools/bench_moe.py --distributed --ep 4                # ep=4 on gloo (NCCL on GPUs)

Implementations, every one on the same input x[T, d] (the ideal: on T*k rows) with the
same expert MLP (d -> f, gelu, f -> d, no biases), loss = mean(y^2) (+ the aux loss):
  ideal             two torch.bmm over [E, T*k/E, d]: every expert gets exactly T*k/E rows,
                    no router, no permutation. No MoE layer can beat it.
  ours/<backend>/cf this project's ``MoELayer`` with that op backend (cpp: the fused C++
                    expert MLP; torch: ``F.grouped_mm``) dropless and at each capacity factor.
  deepspeed/cf      ``deepspeed.moe.layer.MoE`` (ep_size=1, same k and capacity factor,
                    min_capacity=0, use_rts=False; dropless = drop_tokens=False).
Each repeat times every implementation once, in turn (interleaved, so a load change on a
shared machine hits all of them); the table gives the median, the spread (min-max over
repeats) and the ratios layer/ideal and deepspeed/ours of the medians. Peak memory: the
resident-set high-water mark of one extra step above the RSS just before it (Linux
/proc/self/clear_refs; malloc's mmap threshold is pinned low so freed tensors leave the
RSS), or, on CUDA, ``torch.cuda.max_memory_allocated`` above the allocated bytes before.
On CUDA the run is bf16 and also reports the ideal's TFLOP/s against a measured matmul peak.

After the tables, one line per regime (its ``--sweep`` shapes included) says whether each target
of issue 13 is met (``verdict``: time and peak at most 1.15x the ideal's, DeepSpeed at least
1.2x / 1.2x / 1.8x slower on compute / dispatch / fine) and, if not, which cells miss it.

``--json PATH`` writes every figure: config, implementation, median / min / max seconds,
peak bytes, machine, load averages, command.
Speed is never asserted in tests; this is the script the numbers in docs/performance.md
come from.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

from alloc_peak import allocation_peak  # noqa: E402
from bench_kernels import _loadavg, _sync, machine  # noqa: E402

import moe  # noqa: E402
from moe.ops import available_backends  # noqa: E402

REGIMES = {
    "compute": dict(T=4096, d=1024, f=4096, E=8, k=2),
    "dispatch": dict(T=16384, d=256, f=1024, E=64, k=2),
    "fine": dict(T=8192, d=512, f=256, E=64, k=8),
}
# Other shapes of each regime (``--sweep``): the targets hold for the regime, not one example.
SWEEP = {
    "compute": [dict(T=2048, d=768, f=3072, E=8, k=2), dict(T=2048, d=1024, f=4096, E=4, k=1)],
    "dispatch": [dict(T=8192, d=384, f=768, E=128, k=2), dict(T=32768, d=128, f=512, E=32, k=1)],
    "fine": [dict(T=4096, d=768, f=192, E=128, k=8), dict(T=8192, d=256, f=128, E=64, k=6)],
}


# ------------------------------------------------------------------ implementations
class _Ideal(nn.Module):
    """The yardstick: the expert MLPs as two batched GEMMs on exactly T*k/E rows per expert."""

    def __init__(self, E: int, d: int, f: int, dtype, device):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, d, f, dtype=dtype, device=device) * 0.02)
        self.w2 = nn.Parameter(torch.randn(E, f, d, dtype=dtype, device=device) * 0.02)

    def forward(self, rows_ECD):
        return torch.bmm(F.gelu(torch.bmm(rows_ECD, self.w1)), self.w2)


class _DSExpert(nn.Module):
    """DeepSpeed's expert: the same MLP as ours (d -> f, gelu, f -> d, no biases)."""

    def __init__(self, d: int, f: int, dtype, device):
        super().__init__()
        self.fc1 = nn.Linear(d, f, bias=False, dtype=dtype, device=device)
        self.fc2 = nn.Linear(f, d, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _init_deepspeed_comm() -> None:
    """A one-process gloo group for DeepSpeed's MoE (it always asks for its ep group)."""
    import deepspeed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(name, value)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def _free_port() -> int:
    from parallel.spawn import free_port

    return free_port()


def _deepspeed_layer(cfg: Dict, cf: Optional[float], ep_size: int, dtype, device):
    from deepspeed.moe.layer import MoE

    layer = MoE(cfg["d"], _DSExpert(cfg["d"], cfg["f"], dtype, device), num_experts=cfg["E"], ep_size=ep_size,
                k=cfg["k"], capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0, min_capacity=0,
                drop_tokens=cf is not None, use_rts=False)
    layer.set_deepspeed_parallelism()
    return layer.to(device=device, dtype=dtype)


def _our_layer(cfg: Dict, cf: Optional[float], backend: str, dtype, device, ep_group=None):
    config = moe.MoEConfig(d_model=cfg["d"], d_ffn=cfg["f"], num_experts=cfg["E"], backend=backend,
                           router=moe.RouterConfig(top_k=cfg["k"], capacity_factor=cf))
    layer = moe.MoELayer(config, ep_group=ep_group, dtype=dtype, device=device)
    layer.experts.backend = backend  # the expert MLP follows the op backend too
    return layer


def _cf_name(cf: Optional[float]) -> str:
    return "dropless" if cf is None else f"cf{cf:g}"


def build_steps(cfg: Dict, backends: List[str], cfs: List[Optional[float]], deepspeed: bool, dtype,
                device) -> Dict[str, Callable[[], None]]:
    """implementation name -> one forward + backward step (gradients set to None first)."""
    gen = torch.Generator().manual_seed(0)
    T, d, E, k = cfg["T"], cfg["d"], cfg["E"], cfg["k"]
    x = torch.randn(T, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    if (T * k) % E:
        raise ValueError(f"T*k={T * k} is not divisible by E={E}: the ideal needs T*k/E rows per expert")
    rows = torch.randn(E, T * k // E, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    steps: Dict[str, Callable[[], None]] = {}

    def step_of(module, fn):
        def step():
            module.zero_grad(set_to_none=True)
            x.grad = rows.grad = None
            fn().backward()
        return step

    ideal = _Ideal(E, d, cfg["f"], dtype, device)
    steps["ideal"] = step_of(ideal, lambda: ideal(rows).float().square().mean())
    for backend in backends:
        for cf in cfs:
            layer = _our_layer(cfg, cf, backend, dtype, device)

            def ours(layer=layer):
                y, aux = layer(x)
                return y.float().square().mean() + sum(aux.values())

            steps[f"ours/{backend}/{_cf_name(cf)}"] = step_of(layer, ours)
    if deepspeed:
        _init_deepspeed_comm()
        for cf in cfs:
            ds = _deepspeed_layer(cfg, cf, 1, dtype, device)

            def theirs(ds=ds):
                y, l_aux, _ = ds(x)
                return y.float().square().mean() + l_aux

            steps[f"deepspeed/{_cf_name(cf)}"] = step_of(ds, theirs)
    return steps


# ------------------------------------------------------------------ measurement
def _pin_malloc() -> None:
    """Large blocks from mmap and back to the OS on free, so the RSS follows live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also turns off its dynamic growth)
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_bytes(step: Callable[[], None], device: torch.device) -> Dict[str, Optional[int]]:
    """Peak memory of one step above the memory in use just before it: {"peak_bytes": the tensors
    the step allocates (CUDA: ``max_memory_allocated``; CPU: torch's profiler, ``alloc_peak``),
    "rss_peak_bytes": the resident-set high-water mark above the RSS before (CPU, Linux)}."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "rss_peak_bytes": None}
    rss = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        step()
        rss = (_rss_kib("VmHWM") - base) * 1024
    except OSError:
        pass
    gc.collect()
    return {"peak_bytes": allocation_peak(step)["peak"], "rss_peak_bytes": rss}


def measure(steps: Dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> Dict[str, Dict]:
    """Interleaved timing (median, min, max seconds) and the peak memory of one step per implementation."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    _sync(device)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for r in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            print(f"repeat {r}: {name} {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    return {name: dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), times_s=t, **peaks[name])
            for name, t in times.items()}


def matmul_peak_tflops(device: torch.device, dtype) -> float:
    """The device's measured dense matmul throughput (8192^3, best of 5)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


# ------------------------------------------------------------------ reporting
def _ratio(a: Optional[Dict], b: Optional[Dict], key: str) -> Optional[float]:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def summarize(regime: str, cfg: Dict, results: Dict[str, Dict]) -> List[Dict]:
    """Rows of the table: each implementation with its ratios to the ideal and DeepSpeed's to ours."""
    ideal = results["ideal"]
    rows = []
    for name, r in results.items():
        row = dict(regime=regime, **cfg, impl=name, median_s=r["median_s"], min_s=r["min_s"], max_s=r["max_s"],
                   peak_bytes=r["peak_bytes"], rss_peak_bytes=r.get("rss_peak_bytes"),
                   vs_ideal=_ratio(r, ideal, "median_s"), mem_vs_ideal=_ratio(r, ideal, "peak_bytes"),
                   rss_vs_ideal=_ratio(r, ideal, "rss_peak_bytes"), deepspeed_vs_ours=None)
        if name.startswith("ours/"):
            ds = results.get("deepspeed/" + name.split("/")[-1])
            row["deepspeed_vs_ours"] = _ratio(ds, r, "median_s")
        rows.append(row)
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: List[Dict]) -> str:
    head = ("| regime | impl | median s | spread (min-max) s | vs ideal | DeepSpeed / ours | peak MiB | "
            "peak vs ideal |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2 ** 20
        lines.append(f"| {r['regime']} | {r['impl']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
                     f"{_fmt(r['vs_ideal'], '.2f')} | {_fmt(r['deepspeed_vs_ours'], '.2f')} | {_fmt(peak, '.0f')} | "
                     f"{_fmt(r['mem_vs_ideal'], '.2f')} |")
    return "\n".join(lines)


# The issue-13 targets: the layer at most 1.15x the ideal's time and peak memory, and DeepSpeed-MoE
# at least this many times slower than the layer, per regime (a custom shape has no DeepSpeed target).
TIME_TARGET, MEMORY_TARGET = 1.15, 1.15
DEEPSPEED_TARGET = {"compute": 1.2, "dispatch": 1.2, "fine": 1.8}


def verdict(rows: List[Dict]) -> List[str]:
    """One line per regime (sweep shapes counted with their regime): each target met, or which cells miss it."""
    by_regime: Dict[str, List[Dict]] = {}
    for r in rows:
        if r["impl"].startswith("ours/"):
            by_regime.setdefault(r["regime"].split(":")[0], []).append(r)
    lines = []
    for regime, ours in by_regime.items():
        parts = []
        for label, key, target, worse in (("time vs ideal", "vs_ideal", TIME_TARGET, max),
                                          ("peak vs ideal", "mem_vs_ideal", MEMORY_TARGET, max),
                                          ("DeepSpeed / ours", "deepspeed_vs_ours", DEEPSPEED_TARGET.get(regime), min)):
            values = [r[key] for r in ours if r[key] is not None]
            if target is None or not values:
                continue
            miss = [f"{r['regime']} {r['impl']} {r[key]:.2f}" for r in ours if r[key] is not None
                    and (r[key] > target if worse is max else r[key] < target)]
            bound = "<=" if worse is max else ">="
            status = "met" if not miss else f"missed by {len(miss)}/{len(values)} ({'; '.join(miss)})"
            parts.append(f"{label} {bound} {target:g}: {status} (worst {worse(values):.2f})")
        lines.append(f"targets, {regime}: " + " | ".join(parts))
    return lines


# ------------------------------------------------------------------ distributed mode
def _dist_rank(rank: int, world: int, cfg: Dict, cf: Optional[float], warmup: int, repeats: int, deepspeed: bool):
    import torch.distributed as dist

    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    torch.manual_seed(rank)
    x = torch.randn(cfg["T"], cfg["d"], device=device, dtype=dtype, requires_grad=True)
    ours = _our_layer(cfg, cf, "auto", dtype, device, ep_group=group)
    steps = {}

    def ours_step():
        ours.zero_grad(set_to_none=True)
        y, aux = ours(x)
        (y.float().square().mean() + sum(aux.values())).backward()

    steps["ours"] = ours_step
    if deepspeed:
        import deepspeed as ds_mod

        ds_mod.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        ds = _deepspeed_layer(cfg, cf, world, dtype, device)

        def ds_step():
            ds.zero_grad(set_to_none=True)
            y, l_aux, _ = ds(x)
            (y.float().square().mean() + l_aux).backward()

        steps["deepspeed"] = ds_step
    for _ in range(warmup):
        for s in steps.values():
            s()
    times = {n: [] for n in steps}
    for _ in range(repeats):
        for n, s in steps.items():
            dist.barrier()
            start = time.perf_counter()
            s()
            dist.barrier()
            times[n].append(time.perf_counter() - start)
    stats = ours.last_stats
    # Bytes this rank sent to other ranks per step: the dispatcher counts the forward's dispatch and
    # combine (self-sends excluded); the backward's reverse all-to-alls move the same again.
    ours_bytes = 2 * stats["bytes_sent"]
    out = {"ours": dict(median_s=statistics.median(times["ours"]), bytes_per_step=ours_bytes)}
    if deepspeed:
        # DeepSpeed all-to-alls its whole padded [E, C, d] buffer (the other ranks' share of it) in the
        # dispatch and the combine, forward and backward: four exchanges per step.
        C = _ds_capacity(cfg, cf, world)
        item = torch.tensor([], dtype=dtype).element_size()
        ds_bytes = 4 * cfg["E"] * C * cfg["d"] * item * (world - 1) // world
        out["deepspeed"] = dict(median_s=statistics.median(times["deepspeed"]), bytes_per_step=ds_bytes)
    return out


def _ds_capacity(cfg: Dict, cf: Optional[float], world: int) -> int:
    if cf is None:  # dropless: DeepSpeed pads to the largest expert load over the ep group; estimate 2x mean
        return 2 * math.ceil(cfg["T"] * cfg["k"] / cfg["E"])
    return math.ceil(cf * cfg["T"] * cfg["k"] / cfg["E"])


def run_distributed_mode(args, cfg: Dict) -> List[Dict]:
    from parallel.spawn import run_distributed

    cf = args.capacity_factors[-1]
    per_rank = run_distributed(_dist_rank, args.ep, cfg, cf, args.warmup, args.repeats, not args.no_deepspeed,
                               timeout=args.timeout)
    rows = []
    for impl in per_rank[0]:
        rows.append(dict(mode=f"ep={args.ep}", **cfg, cf=cf, impl=impl,
                         median_s=max(r[impl]["median_s"] for r in per_rank),
                         bytes_per_step=sum(r[impl]["bytes_per_step"] for r in per_rank)))
    return rows


# ------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", nargs="+", default=["all"], choices=["all", *REGIMES])
    for name in ("T", "d", "f", "E", "k"):
        p.add_argument(f"--{name}", type=int, default=None, help="a custom shape (all five needed)")
    p.add_argument("--capacity-factors", nargs="+", default=["none", "1.25"],
                   help="'none' = dropless (default: none 1.25)")
    p.add_argument("--backends", nargs="+", default=None, help="op backends for our layer (default: all on CPU)")
    p.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeed-MoE out")
    p.add_argument("--sweep", action="store_true", help="also run the other shapes of each regime (SWEEP)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--distributed", action="store_true", help="ep mode: our layer vs DeepSpeed at --ep ranks")
    p.add_argument("--ep", type=int, default=4)
    p.add_argument("--timeout", type=float, default=540, help="seconds for the whole distributed run")
    args = p.parse_args(argv)
    custom = [getattr(args, n) for n in ("T", "d", "f", "E", "k")]
    if any(v is not None for v in custom) and not all(v is not None for v in custom):
        p.error("a custom shape needs all of --T --d --f --E --k")
    args.custom = dict(zip(("T", "d", "f", "E", "k"), custom)) if all(v is not None for v in custom) else None
    try:
        args.capacity_factors = [None if c == "none" else float(c) for c in args.capacity_factors]
    except ValueError:
        p.error(f"--capacity-factors {args.capacity_factors}: each must be 'none' or a positive number")
    if any(c is not None and c <= 0 for c in args.capacity_factors):
        p.error(f"--capacity-factors {args.capacity_factors}: each must be 'none' or a positive number")
    return args


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    _pin_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    command = "python tools/bench_moe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    regimes = {"custom": args.custom} if args.custom else (
        REGIMES if "all" in args.regime else {r: REGIMES[r] for r in args.regime})
    if args.sweep and not args.custom:
        regimes = {f"{name}{suffix}": cfg for name, first in regimes.items()
                   for suffix, cfg in [("", first)] + [(":{T}/{d}/{f}/{E}/{k}".format(**c), c) for c in SWEEP[name]]}
    load_before = _loadavg()
    print(f"machine: {machine()}\ncommand: {command}\ndevice {device.type}, {dtype}; median of {args.repeats} "
          f"interleaved repeats after {args.warmup} warmup; load average before: {load_before}\n", flush=True)
    rows: List[Dict] = []
    extra: Dict[str, object] = {}
    if args.distributed:
        cfg = args.custom or dict(T=2048, d=256, f=512, E=8, k=2)
        rows = run_distributed_mode(args, cfg)
        print("| mode | impl | median s | bytes per step |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} {_cf_name(r['cf'])} | {r['impl']} | {r['median_s']:.3f} | {r['bytes_per_step']:,} |")
    else:
        backends = args.backends or available_backends(device.type)
        for regime, cfg in regimes.items():
            steps = build_steps(cfg, backends, args.capacity_factors, not args.no_deepspeed, dtype, device)
            results = measure(steps, device, args.warmup, args.repeats)
            if device.type == "cuda":
                flops = 6 * 2 * cfg["T"] * cfg["k"] * cfg["d"] * cfg["f"]
                extra[f"{regime}_ideal_tflops"] = flops / results["ideal"]["median_s"] / 1e12
            rows += summarize(regime, cfg, results)
            print(table(summarize(regime, cfg, results)), flush=True)
            del steps
        print("\n" + "\n".join(verdict(rows)))
        if device.type == "cuda":
            extra["matmul_peak_tflops"] = matmul_peak_tflops(device, dtype)
            print("\n" + ", ".join(f"{k}={v:.1f}" for k, v in extra.items()))
    load_after = _loadavg()
    print(f"\nload average after: {load_after}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(), command=command, device=device.type, dtype=str(dtype),
                           repeats=args.repeats, warmup=args.warmup, load_before=load_before, load_after=load_after,
                           date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows, **extra), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
