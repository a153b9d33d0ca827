"""Measuring one implementation on one case: median time, peak memory, rotated inputs.

Protocol (the same for every implementation, so the numbers compare):

1. Build ONE input set, call the step once (warm-up: Triton/Inductor compilation,
   cuBLAS handles), then reset the allocator's peak counter, call it once more and
   read ``torch.cuda.max_memory_allocated`` -> ``peak_mem_bytes`` (everything live at
   the peak: the input set included, which is the same for every implementation of a
   case) and ``peak_extra_bytes`` (peak minus what was allocated before the call: the
   implementation's own workspace, saved activations and outputs).
2. Build more input sets until the data rotated through is several times the L2
   (each set is touched once per call, so repeated calls cannot run out of cache), and
   time with ``triton.testing.do_bench(..., return_mode="median")``, which warms up
   for ``warmup_ms`` and also clears the L2 between calls.
3. Subtract the timer's own cost: an empty step timed the same way (``baseline_ms``,
   measured once per run), so a few-microsecond op is not charged the event overhead.
4. Optionally (``graph=True``) capture the step, once per input set, as CUDA graphs and
   time their replay the same way (``graph_ms``): what the op costs when the host's
   launch overhead is gone (as in a graph-captured training step). An implementation
   that synchronises cannot be captured; ``graph_note`` then says why.

Nothing here runs without CUDA; the CPU paths of the bench never import it.
"""

from __future__ import annotations

import gc
import itertools
import math
from collections.abc import Callable, Sequence

import torch

# Data rotated through per timed call, as a multiple of the device's L2 size.
L2_ROTATION_FACTOR = 4
# At most this many input sets: enough for the smallest case (ResNet-50's 512x7x7 at
# N=64 in 16 bits, x and dy: 3.2 MB) to rotate through 4x a 50 MB L2; large cases need
# one set, which alone is far bigger than the L2.
MAX_INPUT_SETS = 64
# do_bench's warm-up and measuring windows, in milliseconds.
WARMUP_MS = 25
REP_MS = 100
QUICK_REP_MS = 50


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    # Hopper reports 50 MB (H100) / 60 MB (H200); fall back to 50 MB if absent.
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def input_sets_needed(set_bytes: int, l2: int, factor: int = L2_ROTATION_FACTOR,
                      max_sets: int = MAX_INPUT_SETS) -> int:
    """How many distinct input sets make the rotated data ``factor`` times the L2."""
    if set_bytes <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(factor * l2 / set_bytes)))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


_BASELINE_MS: dict = {}


def empty_baseline_ms(rep_ms: int = REP_MS) -> float:
    """Median do_bench time of a step that does nothing (cached per measuring window)."""
    from triton.testing import do_bench

    if rep_ms not in _BASELINE_MS:
        _BASELINE_MS[rep_ms] = float(do_bench(lambda: None, warmup=WARMUP_MS, rep=rep_ms,
                                              return_mode="median"))
    return _BASELINE_MS[rep_ms]


def net_ms(raw_ms: float, baseline_ms: float) -> float:
    """raw minus the empty-step baseline, never below a hundredth of the raw time."""
    return max(raw_ms - baseline_ms, 0.01 * raw_ms)


def graph_ms(sets: list, step: Callable[[dict], object], leaves, rep_ms: int) -> float:
    """Median replay time of ``step`` captured as one CUDA graph per input set."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for s in sets[:1] * 3:
            step(s)
            for t in leaves(s):
                t.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    pool = torch.cuda.graph_pool_handle()
    for s in sets:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            step(s)
        graphs.append(g)
    order = itertools.cycle(graphs)
    ms = do_bench(lambda: next(order).replay(), warmup=WARMUP_MS, rep=rep_ms,
                  return_mode="median")
    graphs.clear()
    return float(ms)


def measure(make_inputs: Callable[[], dict], step: Callable[[dict], object], set_bytes: int,
            leaves: Callable[[dict], Sequence[torch.Tensor]] = lambda s: (),
            rep_ms: int = REP_MS, graph: bool = False) -> dict:
    """Peak memory and median time of ``step(inputs)``.

    make_inputs: builds one fresh input set (a dict of tensors) on the GPU.
    step: runs the measured region on one set (forward, or forward and backward).
    set_bytes: bytes of one input set (for the rotation count).
    leaves: the tensors of a set whose ``.grad`` must be cleared between calls
        (do_bench's ``grad_to_none``), so gradients are written, not accumulated.
    """
    from triton.testing import do_bench

    first = make_inputs()
    step(first)  # warm-up: compilation, handles, allocator pools
    for t in leaves(first):
        t.grad = None
    free_memory()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(first)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for t in leaves(first):
        t.grad = None

    n_sets = input_sets_needed(set_bytes, l2_bytes())
    sets = [first] + [make_inputs() for _ in range(n_sets - 1)]
    order = itertools.cycle(sets)
    grad_leaves = [t for s in sets for t in leaves(s)]

    def call():
        step(next(order))

    raw = do_bench(call, warmup=WARMUP_MS, rep=rep_ms, grad_to_none=grad_leaves or None,
                   return_mode="median")
    baseline = empty_baseline_ms(rep_ms)
    out = {"ms": net_ms(float(raw), baseline), "baseline_ms": baseline,
           "peak_mem_bytes": int(peak), "peak_extra_bytes": int(peak - before),
           "input_sets": n_sets}
    if graph:
        try:
            out["graph_ms"] = net_ms(graph_ms(sets, step, leaves, rep_ms), baseline)
        except Exception as exc:  # noqa: BLE001 - e.g. a host sync inside the step
            torch.cuda.synchronize()
            out["graph_ms"] = None
            out["graph_note"] = f"not capturable: {type(exc).__name__}: {str(exc)[:200]}"
    # Release the input sets before the next implementation allocates its own.
    sets.clear()
    grad_leaves.clear()
    first = order = None
    free_memory()
    return out


def copy_bandwidth_gbps(n_bytes: int = 512 * 2**20) -> dict:
    """Device-to-device copy of ``n_bytes``: (bytes read + bytes written) / median time."""
    from triton.testing import do_bench

    bufs = {"src": torch.randn(n_bytes // 4, device="cuda")}
    bufs["dst"] = torch.empty_like(bufs["src"])
    ms = do_bench(lambda: bufs["dst"].copy_(bufs["src"]), warmup=WARMUP_MS, rep=REP_MS,
                  return_mode="median")
    moved = 2 * bufs["src"].numel() * bufs["src"].element_size()
    bufs.clear()
    free_memory()
    return {"bytes": moved, "ms": float(ms), "gbps": moved / (ms * 1e-3) / 1e9}


def measure_backward_only(make_inputs: Callable[[], dict], step: Callable[[dict], object],
                          set_bytes: int, leaves=lambda s: (), rep_ms: int = REP_MS,
                          graph: bool = False) -> dict:
    """Median time of the backward alone: ``step.forward(s)`` runs untimed before each
    call, then CUDA events time ``step.backward(s, loss)``. Peak memory is that of the
    backward over what the forward left. One input set: the forward just before each
    backward writes more than L2 holds at the benchmarked sizes (N x V logits), and the
    timed region is the backward's own kernels. Not captured as a CUDA graph (a backward
    alone needs a graph built outside the capture)."""
    import statistics
    import time

    s = make_inputs()
    for _ in range(3):  # warm-up: compilation, handles, allocator pools
        step.backward(s, step.forward(s))
        for t in leaves(s):
            t.grad = None
    free_memory()
    loss = step.forward(s)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step.backward(s, loss)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    deadline = time.perf_counter() + max(rep_ms, 1) * 1e-3 * 4  # forward time included
    while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 200):
        for t in leaves(s):
            t.grad = None
        loss = step.forward(s)
        start.record()
        step.backward(s, loss)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    loss = s = None
    free_memory()
    return {"ms": float(statistics.median(times)), "baseline_ms": None,
            "peak_mem_bytes": int(peak), "peak_extra_bytes": int(peak - before),
            "input_sets": 1, "graph_ms": None,
            "graph_note": "backward only: timed with CUDA events, not as a graph"}
