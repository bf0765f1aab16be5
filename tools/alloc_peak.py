"""Peak bytes held among the CPU tensors one call allocates, from torch's profiler.

``profile(profile_memory=True)`` records every CPU allocation and free with its address
and size (``[memory]`` events). Summing them in order (+size at an allocation, -size when
that address is freed; a free of memory allocated before profiling, e.g. last step's
gradients, is not counted) gives the bytes held among the tensors the call allocated:
activations, saved tensors, temporaries and the new gradients, on top of what existed
before (weights, inputs). Exact where the resident-set size is coarse (allocator caching,
page granularity, memory freed at the start of the call).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Dict, Optional

from torch.profiler import ProfilerActivity, profile


def allocation_peak(fn: Callable[[], object], marker: Optional[str] = None) -> Dict[str, object]:
    """Run ``fn()`` once under the profiler: {"peak": bytes, "at_marker": bytes held when the
    first ``record_function(marker)`` region starts (0 without a marker), "result": fn's result}."""
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    starts = [e["ts"] for e in events if marker is not None and e.get("name") == marker]
    mark = min(starts) if starts else None
    live: Dict[int, int] = {}
    held = peak = at_marker = 0
    marked = False
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"]["Ev Idx"]))
    for e in memory:
        a = e["args"]
        if mark is not None and not marked and e["ts"] >= mark:
            at_marker, marked = held, True
        if a["Bytes"] > 0:
            live[a["Addr"]] = a["Bytes"]
            held += a["Bytes"]
        elif a["Addr"] in live:
            held -= live.pop(a["Addr"])
        peak = max(peak, held)
    return {"peak": peak, "at_marker": at_marker, "result": result}
