"""Run a function on several local processes, each in a gloo process group on 127.0.0.1.

Legend: W = world_size processes, ranks 0..W-1.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes
(spawn), gives each a gloo process group on a free loopback port, calls
``fn(rank, world_size, *args, **kwargs)`` in each and returns the per-rank return
values as a list indexed by rank. ``fn`` must be a module-level function and its
return value picklable. A failure in any rank re-raises here with that rank's
traceback; a run that takes longer than ``timeout`` seconds is killed.
"""
from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


class DistributedTestError(RuntimeError):
    """A rank raised, died or did not finish in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, timeout, args, kwargs, results):
    # Runs in the child. Every outcome is reported as (rank, ok, payload bytes);
    # pickling here keeps tensors out of torch's shared-memory queue reductions.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            value = fn(rank, world_size, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def _stop(procs, grace: float) -> None:
    # Let finished ranks exit on their own, then kill whatever is left.
    end = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def run_distributed(fn, world_size: int, *args, timeout: float = 60, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Returns ``[value of rank 0, value of rank 1, ...]``. Raises
    ``DistributedTestError`` naming the rank and carrying its full traceback if any
    rank raises or dies, or naming the ranks still running after ``timeout`` s
    (all children are killed in every failure case).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, timeout, args, kwargs, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    grace = 0.0
    try:
        while len(values) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise DistributedTestError(
                    f"{getattr(fn, '__name__', fn)} timed out after {timeout}s at "
                    f"world_size={world_size}; ranks still running: {missing}"
                )
            try:
                rank, ok, payload = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank not in values and p.exitcode not in (None, 0):
                        raise DistributedTestError(
                            f"rank {rank} died with exit code {p.exitcode} "
                            "without reporting a result"
                        ) from None
                continue
            if not ok:
                raise DistributedTestError(
                    f"rank {rank} of {world_size} raised in "
                    f"{getattr(fn, '__name__', fn)}:\n{payload}"
                )
            values[rank] = pickle.loads(payload)
        grace = 10.0
    finally:
        _stop(procs, grace)
    return [values[r] for r in range(world_size)]
