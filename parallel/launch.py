"""Start the process group from whatever launched us: torchrun, srun, or nothing.

Where the rank and world come from, in order:

1. torchrun / ``torch.distributed.run`` (or any launcher that sets them): ``RANK``,
   ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
2. SLURM without torchrun (``srun python -m moe.train ...``, one task per rank):
   ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is ``MASTER_ADDR``,
   else loopback (127.0.0.1) when the job runs on one node, else the first host of
   ``SLURM_JOB_NODELIST`` (``scontrol show hostnames`` when available, else our own
   parser); the port ``MASTER_PORT`` or one derived from ``SLURM_JOB_ID``.
3. Neither: a single process (world 1) with an in-memory store (no socket at all).

Local runs rendezvous on loopback: without a master address the rendezvous is
127.0.0.1, and when the master address is a loopback one (``localhost``, 127.x,
``::1``) and this process group makes its own store (srun, or the environment set by
hand), rank 0's store listens on that loopback address only, not on every interface
(``torch.distributed.TCPStore`` alone binds every interface). Under torchrun the store
is torchrun's own (``TORCHELASTIC_USE_AGENT_STORE``): its binding is torch's.

Under torchrun with ``--max-restarts``, the restarted workers' group must not meet
the keys the failed ones left in torchrun's shared store: ``attempt_store``.

Backend: ``MOE_DIST_BACKEND`` (``gloo`` | ``nccl``) or the ``backend`` argument;
``auto`` picks NCCL when CUDA is available, else gloo.

``init_distributed()`` returns a ``DistContext``; ``ctx.close()`` destroys the
process group only if this call created it, so the same code runs inside a test
harness that already initialised one.

Collective timeout: ``init_distributed(timeout_s=...)`` (the trainer passes
``parallel.timeout_s``, default 600 s) bounds how long any collective waits for its
peers, in the world group and, passed on explicitly (``DistContext.timeout`` ->
``build_groups(timeout=...)`` -> ``ParallelDims.build`` -> ``ProcessGroups.timeout``), in
every group the job creates afterwards (the parallel groups, the hierarchical
dispatcher's node groups; ``torch.distributed.new_group`` would otherwise use torch's
own default, 30 min for gloo). A peer that hung or died then ends the job with an error instead of a hang:
gloo raises on the waiting ranks (``explain_timeout`` adds a note naming the key), and
NCCL's watchdog aborts the process with its own "collective operation timeout" line.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist

from .dims import ParallelDims, ProcessGroups

DIST_BACKENDS = ("auto", "gloo", "nccl")  # torch.distributed backends (a job's parallel.backend)

LOOPBACK = "127.0.0.1"


class LaunchError(RuntimeError):
    """The environment does not describe a consistent distributed launch."""


# --------------------------------------------------------------------------------------
# SLURM host lists: "node[01-03,07],gpu-a[1-2]-x" -> node01 node02 node03 node07 ...
def _split_top_level(text: str) -> List[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise LaunchError(f"unbalanced brackets in SLURM host list {text!r}")
    parts.append(cur)
    return [p for p in parts if p]


def _expand_ranges(body: str) -> List[str]:
    out: List[str] = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise LaunchError(f"bad range {item!r} in SLURM host list")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str) -> List[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [h for v in _expand_ranges(m.group(1)) for h in _expand_host(head + v + tail)]


def expand_hostlist(nodelist: str) -> List[str]:
    """Every host of a SLURM host list expression, in order (our own parser)."""
    return [h for part in _split_top_level(nodelist.strip()) for h in _expand_host(part)]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` when present)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=20, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    hosts = expand_hostlist(nodelist)
    if not hosts:
        raise LaunchError(f"SLURM node list {nodelist!r} names no host")
    return hosts[0]


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits: rank, world size, local rank, master address, source."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    master_port: Optional[int]
    source: str  # "torchrun" | "slurm" | "single"


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r} must be an integer") from None


def detect_launch(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read the launcher's environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        world = _int_env(env, "WORLD_SIZE") if "WORLD_SIZE" in env else None
        if missing and world != 1:
            raise LaunchError(f"torchrun-style launch is missing {', '.join(missing)} in the environment")
        rank = _int_env(env, "RANK") if "RANK" in env else 0
        world = world or 1
        if not 0 <= rank < world:
            raise LaunchError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
        return LaunchEnv(rank, world, _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                         env.get("MASTER_ADDR"), int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
                         "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if world > 1 and not nodelist:
            raise LaunchError("SLURM launch without SLURM_JOB_NODELIST / SLURM_NODELIST: cannot find the master host")
        if env.get("MASTER_ADDR"):
            addr = env["MASTER_ADDR"]
        elif not nodelist or _slurm_single_node(env, nodelist):
            addr = LOOPBACK  # every task on this node: no need to listen beyond it
        else:
            addr = first_host(nodelist)
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        else:  # the same on every task of the job, different between jobs
            port = 20000 + (_int_env(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 9500)
        return LaunchEnv(rank, world, local, addr, port, "slurm")
    return LaunchEnv(0, 1, 0, None, None, "single")


def _slurm_single_node(env: Mapping[str, str], nodelist: str) -> bool:
    """Whether the SLURM job runs on one node (``SLURM_NNODES`` / ``SLURM_JOB_NUM_NODES``, else the node list)."""
    for name in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if env.get(name, "").strip().isdigit():
            return int(env[name]) == 1
    try:
        return len(expand_hostlist(nodelist)) == 1
    except LaunchError:
        return False


def is_loopback(host: Optional[str]) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_store(host: str, port: int, rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """The rendezvous store on a loopback ``host``: rank 0 serves it on a socket bound to that
    address only (torch's ``TCPStore`` alone would listen on every interface); the others connect."""
    host = LOOPBACK if host.lower() == "localhost" else host.strip("[]")
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(128, world_size))
    except OSError as e:
        sock.close()
        raise LaunchError(f"cannot serve the rendezvous on {host}:{port} ({e}); is MASTER_PORT in use?") from None
    fd = sock.detach()  # the store owns the listening socket from here on
    try:
        return dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def pick_backend(backend: str = "auto") -> str:
    """``MOE_DIST_BACKEND`` wins over the argument; ``auto``: NCCL with CUDA, else gloo."""
    backend = os.environ.get("MOE_DIST_BACKEND", "") or backend
    if backend not in DIST_BACKENDS:
        raise LaunchError(f"distributed backend {backend!r} is not allowed; choose one of {DIST_BACKENDS} "
                          "(argument or MOE_DIST_BACKEND)")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend 'nccl' needs CUDA GPUs, and torch sees none; use gloo on CPU")
    return backend


@dataclass
class DistContext:
    """The process group this process trains in (see ``init_distributed``).

    ``timeout``: the collective timeout of the world group ``init_distributed`` created, for
    the groups the job creates afterwards (``build_groups(timeout=ctx.timeout)``); None when
    the group was started otherwise (a test harness): then ``torch.distributed.new_group``
    applies torch's default, as it would without us.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    source: str
    device: torch.device
    owns_group: bool
    timeout: Optional[timedelta] = None

    def close(self) -> None:
        """Destroy the process group if ``init_distributed`` created it (idempotent)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


_TIMEOUT_MARKS = ("timed out waiting", "collective operation timeout")  # gloo, NCCL watchdog


def explain_timeout(exc: BaseException, timeout_s: float) -> bool:
    """Add a note naming ``parallel.timeout_s`` to a collective's timeout error; True if it was one.

    Recognises gloo's "Timed out waiting <ms> for <op>" and NCCL's "collective operation
    timeout"; any other exception is left as it is.
    """
    text = str(exc).lower()
    if not any(mark in text for mark in _TIMEOUT_MARKS):
        return False
    exc.add_note(f"a collective waited longer than parallel.timeout_s={timeout_s:g} s for its peers: another "
                 "rank hung or died (its own log shows why); raise parallel.timeout_s if the ranks may "
                 "legitimately wait that long (e.g. a slow checkpoint file system)")
    return True


def attempt_store(launch: LaunchEnv, timeout: timedelta,
                  env: Optional[Mapping[str, str]] = None) -> Optional[dist.Store]:
    """The store of a torchrun worker's process group, keyed by its attempt; None: ``env://`` as usual.

    torchrun's agent shares its TCP store with its workers (``TORCHELASTIC_USE_AGENT_STORE=True``:
    the c10d rendezvous, ``--standalone``, or ``--master_port``) and keeps it across restarts, so
    the workers of a restart (``--max-restarts``) would read the connection addresses their
    predecessors left there and fail to connect (torch 2.13: "Gloo connectFullMesh failed ...
    Connection refused"). With one agent (``GROUP_WORLD_SIZE`` 1: every worker on this machine)
    every worker has the same ``TORCHELASTIC_RESTART_COUNT``, so the group's keys go under
    ``moe/attempt_<count>``. With several agents the counts can differ (only the agent whose
    worker failed counts a restart), so a restarted worker stops with a ``LaunchError`` naming
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives every rendezvous round a fresh store.
    """
    env = os.environ if env is None else env
    if launch.source != "torchrun" or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = _int_env(env, "TORCHELASTIC_RESTART_COUNT") if "TORCHELASTIC_RESTART_COUNT" in env else 0
    agents = _int_env(env, "GROUP_WORLD_SIZE") if "GROUP_WORLD_SIZE" in env else 1
    if agents > 1:
        if attempt > 0:
            raise LaunchError(f"torchrun restarted this worker (TORCHELASTIC_RESTART_COUNT={attempt}) on one of "
                              f"{agents} nodes that share the rendezvous store: the restarted process group cannot "
                              "connect through it; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment of "
                              "every torchrun (with --rdzv-backend=c10d) so each restart gets a fresh store")
        return None
    if launch.master_port is None:
        raise LaunchError("torchrun shares its agent store (TORCHELASTIC_USE_AGENT_STORE=True) but MASTER_PORT is "
                          "not set: the store's port is unknown")
    store = dist.TCPStore(launch.master_addr or "127.0.0.1", launch.master_port, launch.world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"moe/attempt_{attempt}", store)


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise LaunchError(f"device {device!r} is not allowed; choose auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(backend: str = "auto", *, device: str = "auto",
                     timeout_s: float = 600.0) -> DistContext:
    """Initialise ``torch.distributed`` from the environment (or reuse a live group).

    Returns a ``DistContext`` with this process's rank, the backend and the device
    to train on (``cuda:LOCAL_RANK`` with CUDA unless ``device='cpu'``). ``timeout_s``:
    the collective timeout of the new group, kept as ``DistContext.timeout`` for the groups
    created after it; a live group keeps its own (``timeout`` None).
    """
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = _pick_device(device, local)
        return DistContext(rank, world, local, dist.get_backend(), "existing", dev, owns_group=False)
    launch = detect_launch()
    dev = _pick_device(device, launch.local_rank)
    name = pick_backend(backend)
    if name == "nccl" and dev.type != "cuda":
        name = "gloo"
    timeout = timedelta(seconds=timeout_s)
    if launch.source == "single":
        dist.init_process_group(name, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif launch.source == "torchrun" and launch.world_size == 1 and not launch.master_addr:
        dist.init_process_group(name, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        addr = launch.master_addr or LOOPBACK
        os.environ["MASTER_ADDR"] = addr
        os.environ["MASTER_PORT"] = str(launch.master_port)
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun serves the store
        store = attempt_store(launch, timeout)
        if store is None and is_loopback(addr) and launch.master_port is not None and not agent_store:
            store = loopback_store(addr, launch.master_port, launch.rank, launch.world_size, timeout)
        if store is None:
            dist.init_process_group(name, init_method="env://", rank=launch.rank,
                                    world_size=launch.world_size, timeout=timeout)
        else:
            dist.init_process_group(name, store=store, rank=launch.rank, world_size=launch.world_size,
                                    timeout=timeout)
    return DistContext(launch.rank, launch.world_size, launch.local_rank, name, launch.source, dev,
                       owns_group=True, timeout=timeout)


def build_groups(ep: int = 1, *, tp: int = 1, pp: int = 1, etp: int = 1, sequence_parallel: bool = False,
                 timeout: Optional[timedelta] = None) -> ProcessGroups:
    """``ParallelDims.from_world(world, ep=...)`` then ``.build(timeout=timeout)`` on a live process group.

    ``timeout``: the collective timeout of the new groups (``DistContext.timeout``; None: torch's default).
    """
    if not dist.is_initialized():
        raise LaunchError("build_groups: call init_distributed() first")
    dims = ParallelDims.from_world(dist.get_world_size(), ep=ep, tp=tp, pp=pp, etp=etp,
                                   sequence_parallel=sequence_parallel)
    return dims.build(timeout=timeout)
