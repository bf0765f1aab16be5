"""Suite-wide pytest set-up. Settings (paths, markers, timeout) live in pyproject.toml;
shared helpers live in tests/helpers/ (import them as ``tests.helpers.<module>``).

One thread per process: the distributed tests start several processes on a few cores,
and ``make test`` has always run with ``OMP_NUM_THREADS=1``; a plain ``pytest`` now does
the same unless the caller sets the variable. It must be set before torch is imported,
hence here and at import time.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_report_header(config):
    """One header line saying which kernel backends this run can test."""
    try:
        from moe.ops import available_backends
        cpu = ", ".join(available_backends("cpu"))
    except Exception as exc:  # the header must never break collection
        return f"moe backends: unknown ({type(exc).__name__}: {exc})"
    import torch
    gpu = ", ".join(available_backends("cuda")) if torch.cuda.is_available() else "no CUDA device"
    return f"moe backends: cpu [{cpu}]; cuda [{gpu}]; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
