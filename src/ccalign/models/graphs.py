"""Decode steps run eagerly, or captured once as CUDA graphs and replayed without the host in the loop.

A step is a function of static buffers only (inputs copied in, outputs written in place or returned as
tensors that each replay overwrites), with Python constants for everything else, so one capture per distinct
step shape serves every later batch. Decode modes:

    "reference"  the plain eager loop of each model (not handled here)
    "eager"      the fast path's static-shape step, run eagerly (what any CPU run uses)
    "graph"      that step captured with torch.cuda.graph on its first call, replayed after
    "compile"    that step compiled with torch.compile (fused kernels), then captured the same way

Capture is used only on CUDA devices; elsewhere "graph" and "compile" run the same step eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import torch

from ccalign.log import get_logger

DECODE_MODES = ("reference", "eager", "graph", "compile")

log = get_logger(__name__)


def check_decode_mode(decode: str) -> None:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {list(DECODE_MODES)}, got {decode!r}")


class StepRunner:
    """Runs ``fn`` for a step key: eagerly, or (CUDA, mode graph/compile) as a graph captured per key.

    The first call of a key runs ``fn`` for real on a side stream (warm-up: lazy library initialisation and
    compilation) and returns its result, then records ``fn`` into a graph (recording executes nothing).
    Later calls of that key replay the graph and return the tensors the recording produced, overwritten by
    the replay. All graphs share one memory pool: they are replayed one at a time, in the order they were
    captured (as a decode loop does).
    """

    def __init__(self, device: torch.device | str, mode: str):
        check_decode_mode(mode)
        self.capture = torch.device(device).type == "cuda" and mode in ("graph", "compile")
        self.compile = self.capture and mode == "compile"
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.pool = None
        self.capture_seconds = 0.0  # warm-up, compilation and recording, summed over keys
        self.logged = 0  # graphs already reported by log_capture

    def __call__(self, key: Hashable, fn: Callable[[], object], compile: bool = True) -> object:
        if not self.capture:
            return fn()
        entry = self.graphs.get(key)
        if entry is not None:
            entry[0].replay()
            return entry[1]
        return self._capture(key, torch.compile(fn, dynamic=False) if self.compile and compile else fn)

    def _capture(self, key: Hashable, fn: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()  # the real step
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            recorded = fn()
        self.pool = graph.pool()
        self.graphs[key] = (graph, recorded)
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - t0
        return out

    def log_capture(self, what: str) -> None:
        """Log the capture cost once, after the call that captured new graphs."""
        if len(self.graphs) > self.logged:
            self.logged = len(self.graphs)
            log.info(
                "%s: %d CUDA graph(s)%s captured in %.1f s (once per batch shape)",
                what,
                len(self.graphs),
                " of compiled steps" if self.compile else "",
                self.capture_seconds,
            )
