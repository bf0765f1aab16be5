"""Run the LIMoE demo config over several seeds and variants, print a markdown table.

    python tools/quality_table.py                                 # tiny_limoe vs its dense twin, seeds 0 1 2
    python tools/quality_table.py --variants moe no_limoe_losses local_only top1 position --seeds 0
    python tools/quality_table.py --variants moe --set data.shapes.heldout_fraction=0.2 --json out.json
    python tools/quality_table.py --config examples/configs/tiny_switch_lm.yaml --set train.steps=400   # LM vs dense

Each run is ``python -m moe.train --config <config> --set train.seed=S --set model.init_seed=S``
plus the ``--set`` given here and then the variant's own (which win), in ONE process
(``parallel.ep=1``, ``train.micro_batch_size`` = the global batch: the contrastive loss
sees the same 64 negatives as the 4-process demo, which gathers them over data
parallelism; routing capacity is computed over the whole batch instead of 16 pairs per
rank), with ``OMP_NUM_THREADS=1`` unless set. ``--nproc N`` runs the config's own layout
under torchrun with N processes instead. Each run writes ``<out-root>/<variant>_s<seed>/``;
its last ``eval/*`` record of ``metrics.jsonl`` is the result. A progress line per run goes
to stderr; the table (mean and min-max over seeds) to stdout; ``--json PATH`` writes every
run's numbers and the summary.

Variants (``--variants``; ``--list`` prints them): the config as is (``moe``), its
equal-active-FLOPs dense twin (``model.preset=<its preset>_dense``: works for the LM
presets too, whose table shows the validation loss), and the LIMoE ablations (no
entropy losses, local only, top-1, position dropping instead of BPR).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: Dict[str, List[str]] = {
    "moe": [],
    "dense": ["model.preset={preset}_dense"],  # the config's preset's dense twin
    # LIMoE ablations: the entropy losses (the joint Switch balancing loss stays on).
    "no_limoe_losses": ["model.moe.aux_losses={}"],
    "local_only": ["model.moe.aux_losses={limoe_local: 0.1}"],
    # top-1 routing (Switch policy, same capacity factor) and position dropping instead of BPR.
    "top1": ["model.moe.router.policy=switch", "model.moe.router.top_k=1"],
    "position": ["model.moe.router.drop_policy=position"],
}

DESCRIPTIONS: Dict[str, str] = {
    "moe": "the config as is",
    "dense": "equal-active-FLOPs dense twin (model.preset=<the config's preset>_dense)",
    "no_limoe_losses": "no LIMoE entropy losses (joint load balancing only)",
    "local_only": "local entropy loss only (no global)",
    "top1": "top-1 routing (switch policy)",
    "position": "position dropping instead of BPR",
}

# metrics.jsonl key -> table column
COLUMNS = {
    "eval/zero_shot_accuracy": "zero-shot (held-out classes)",
    "eval/zero_shot_accuracy_all": "zero-shot (all classes)",
    "eval/zero_shot_colour_accuracy_all": "colour right (all)",
    "eval/zero_shot_shape_accuracy_all": "shape right (all)",
    "eval/val_contrastive_loss": "val loss",
    "eval/val_loss": "val loss (nats/token)",
    "wall_s": "wall s",
}


def final_eval(metrics_path: Path) -> Dict[str, float]:
    """The last record of ``metrics.jsonl`` that holds ``eval/*`` keys (its step included)."""
    last: Dict[str, float] = {}
    with open(metrics_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if any(k.startswith("eval/") for k in rec):
                last = rec
    if not last:
        raise RuntimeError(f"{metrics_path} has no eval record")
    return last


def command(config: str, variant: str, seed: int, out_dir: Path, extra: List[str], nproc: int,
            global_batch: Optional[int], preset: Optional[str]) -> List[str]:
    sets = [f"train.seed={seed}", f"model.init_seed={seed}", f"train.out_dir={out_dir}", "train.overwrite=true",
            "telemetry.plots=false", "telemetry.tensorboard=false", "train.checkpoint_every=0"]
    if nproc == 1:
        sets += ["parallel.ep=1"]
        if global_batch is not None:
            sets += [f"train.micro_batch_size={global_batch}"]
    if variant == "dense" and not preset:
        raise SystemExit(f"--variants dense: {config} has no model.preset to take the dense twin of")
    sets += extra + [v.format(preset=preset) for v in VARIANTS[variant]]  # the variant's own keys win
    if nproc == 1:
        head = [sys.executable, "-m", "moe.train"]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "moe.train"]
    return head + ["--config", config] + [a for s in sets for a in ("--set", s)]


def config_value(config: str, extra: List[str], key: str) -> Optional[object]:
    """``section.name`` of the config file (a --set of it wins)."""
    for s in reversed(extra):
        if s.startswith(f"{key}="):
            import yaml

            return yaml.safe_load(s.split("=", 1)[1])
    import yaml

    section, name = key.split(".")
    with open(config) as f:
        return ((yaml.safe_load(f) or {}).get(section) or {}).get(name)


def summarise(runs: List[dict], variants: List[str]) -> List[dict]:
    rows = []
    for v in variants:
        rs = [r for r in runs if r["variant"] == v and r.get("ok")]
        row = {"variant": v, "seeds": [r["seed"] for r in rs]}
        for key in COLUMNS:
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                            "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}
        rows.append(row)
    return rows


def markdown(rows: List[dict]) -> str:
    keys = [k for k in COLUMNS if any(k in row for row in rows)]  # the metrics these runs have
    head = "| variant | seeds | " + " | ".join(COLUMNS[k] for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for row in rows:
        cells = []
        for key in keys:
            s = row.get(key)
            if s is None:
                cells.append("-")
            elif key == "wall_s":
                cells.append(f"{s['mean']:.0f}")
            elif len(row["seeds"]) > 1:
                cells.append(f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})")
            else:
                cells.append(f"{s['mean']:.3f}")
        seeds = ",".join(map(str, row["seeds"])) or "none"
        lines.append(f"| {row['variant']} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="examples/configs/tiny_limoe.yaml")
    p.add_argument("--variants", nargs="+", default=["moe", "dense"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override for every run (repeatable)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (1: single-process layout)")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (single-process runs only)")
    p.add_argument("--out-root", default="runs/quality")
    p.add_argument("--json", dest="json_path", default=None, help="write every run and the summary here")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, sets in VARIANTS.items():
            print(f"{name}: {DESCRIPTIONS[name]}  [{' '.join(sets) or '-'}]")
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(VARIANTS)}")
    if args.nproc < 1 or args.jobs < 1:
        p.error("--nproc and --jobs must be >= 1")
    if args.nproc > 1 and args.jobs > 1:
        p.error("--jobs > 1 is only for single-process runs (--nproc 1)")
    gbs = config_value(args.config, args.extra, "train.global_batch_size") if args.nproc == 1 else None
    preset = config_value(args.config, args.extra, "model.preset")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    todo = [(v, s) for s in args.seeds for v in args.variants]  # seed-major: a variant pair shares the load
    runs: List[dict] = []
    running: List[tuple] = []
    total, done = len(todo), 0

    def finish(proc, variant, seed, out_dir, log, t0):
        nonlocal done
        rc = proc.wait()
        log.close()
        wall = time.monotonic() - t0
        done += 1
        run = {"variant": variant, "seed": seed, "out_dir": str(out_dir), "rc": rc, "wall_s": wall, "ok": False}
        if rc == 0:
            try:
                rec = final_eval(out_dir / "metrics.jsonl")
                run.update({k: float(v) for k, v in rec.items() if k.startswith("eval/")}, step=rec.get("step"),
                           ok=True)
            except (OSError, RuntimeError, ValueError) as e:
                run["error"] = str(e)
        runs.append(run)
        acc, acc_all, val = (run.get(f"eval/{k}") for k in ("zero_shot_accuracy", "zero_shot_accuracy_all", "val_loss"))
        if acc is not None and acc_all is not None:
            status = f"zero-shot {acc:.3f} all-class {acc_all:.3f}"
        elif val is not None:
            status = f"val loss {val:.4f}"
        else:
            status = f"FAILED rc={rc} (log: {out_dir}.log)"
        print(f"[{done}/{total}] {variant} seed {seed}: {status} in {wall:.0f} s", file=sys.stderr, flush=True)

    while todo or running:
        while todo and len(running) < args.jobs:
            variant, seed = todo.pop(0)
            out_dir = Path(args.out_root) / f"{variant}_s{seed}"
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            cmd = command(args.config, variant, seed, out_dir, args.extra, args.nproc, gbs, preset)
            log = open(f"{out_dir}.log", "w")
            print(f"start {variant} seed {seed}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                            variant, seed, out_dir, log, time.monotonic()))
        still = []
        for item in running:
            if item[0].poll() is None:
                still.append(item)
            else:
                finish(*item)
        running = still
        if running:
            time.sleep(1.0)
    rows = summarise(runs, args.variants)
    print(markdown(rows))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"config": args.config, "seeds": args.seeds, "set": args.extra, "nproc": args.nproc,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs, "summary": rows},
                      f, indent=1)
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
