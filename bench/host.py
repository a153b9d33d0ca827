"""``python -m bench host``: what one call costs the host, next to torch's own op.

Runs anywhere (no GPU needed): Triton's launches are stubbed (counted, never run), so
what is timed is the Python and dispatcher work around the kernels: validation,
allocation, scalar packing, grid sizing and every other device operation the op issues.
For each case it reports, per call of the op (forward, or forward + backward):

- ``launches``: Triton kernel launches;
- ``other ops``: other device operations (aten ops that are not views or metadata),
  i.e. what a CUDA build would launch besides fusedgrad's own kernels;
- ``host us``: median wall time of one call with launches stubbed, and torch's own op
  on the same tiny CPU input (its kernels run, but on inputs this small they cost
  next to nothing), and the ratio. The two are timed in alternating order, call by
  call, so that load from other processes on the machine hits both alike.

fusedgrad's ops take the branches a CUDA run takes (``device_branches``: e.g. no
CPU-only eager check of the targets), so the counts and times are those of the CUDA
host path, minus Triton's own launch overhead (stubbed).

Cases come from one module per op family (``bench/host_<op>.py``, each exposing
``CASES``: a list of :class:`HostCase`), so each op's owner keeps its own list.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

# Modules that contribute cases, in report order.
CASE_MODULES = ("bench.host_ce", "bench.host_bn", "bench.host_lce")

# aten ops that move no data: not counted as device operations.
_FREE_OPS = {
    "view", "_unsafe_view", "reshape", "as_strided", "expand", "permute", "transpose", "t",
    "unsqueeze", "squeeze", "select", "slice", "alias", "detach", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "size", "stride",
    "sym_size", "sym_stride", "sym_numel", "is_same_size", "unflatten", "flatten",
    "_reshape_alias", "view_as", "dim", "numel",
}


@dataclass
class HostCase:
    """One measured call: ``make()`` builds fresh inputs, ``fused(inputs)`` and
    ``torch_ref(inputs)`` run one call (forward, or forward + backward) of each."""

    name: str
    make: Callable[[], dict]
    fused: Callable[[dict], object]
    torch_ref: Callable[[dict], object]


class _LaunchCounter:
    def __init__(self):
        # Every launched kernel, in order: the stub only appends (its own cost is timed
        # with the op's, so it does as little as it can); names are read afterwards.
        self.kernels: list = []
        # With record=True: (kernel, grid, args, keyword args) of every launch, in order,
        # tensors replaced by ArgTensor (no reference kept: a kept gradient buffer would
        # change what autograd does, e.g. copy instead of steal a leaf's gradient).
        self.calls: list[tuple] = []

    @property
    def count(self) -> int:
        return len(self.kernels)

    @property
    def names(self) -> list[str]:
        return [getattr(k, "__name__", "?") for k in self.kernels]


@dataclass(frozen=True)
class ArgTensor:
    """What a launch sees of a tensor argument: its dtype and 16-byte alignment."""

    dtype: object
    aligned16: bool


def _arg_summary(value):
    import torch

    if isinstance(value, torch.Tensor):
        return ArgTensor(value.dtype, value.data_ptr() % 16 == 0)
    return value


@contextlib.contextmanager
def stubbed_launches(record: bool = False):
    """Count Triton launches and skip their execution (interpreter or compiled);
    with record, also keep a summary of each launch (``counter.calls``)."""
    from triton.runtime import jit

    counter = _LaunchCounter()
    patched = []

    def stub(self, *args, grid=None, warmup=False, **kwargs):
        counter.kernels.append(self)
        if record:
            counter.calls.append((self, grid, tuple(_arg_summary(a) for a in args),
                                  {k: _arg_summary(v) for k, v in kwargs.items()}))
        return None

    classes = [jit.JITFunction]
    try:
        from triton.runtime import interpreter

        classes.append(interpreter.InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    for cls in classes:
        patched.append((cls, cls.run))
        cls.run = stub
    try:
        yield counter
    finally:
        for cls, run in patched:
            cls.run = run


def count_device_ops(fn) -> list[str]:
    """Leaf aten ops that would run on the device during ``fn()``.

    Recorded with torch.profiler rather than a dispatch mode: a dispatch mode does not
    see the ops issued inside a custom op's implementation.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    has_aten_child = {id(e.cpu_parent) for e in events if e.cpu_parent is not None}
    out = []
    for e in events:
        name = e.name[len("aten::"):]
        if id(e) in has_aten_child or name in _FREE_OPS:
            continue
        out.append(name)
    return out


def _median_us(fns, inputs_fn, reps: int) -> list[float]:
    """Median wall time of one call of each of ``fns``, their reps interleaved so that a
    drift of the machine's speed (other processes, clock changes) reaches each alike, in
    alternating order (each follows the other as often: neither always runs on caches
    the other left)."""
    times = [[] for _ in fns]
    pairs = list(zip(fns, times, strict=True))
    for rep in range(reps):
        for fn, out in pairs if rep % 2 == 0 else pairs[::-1]:
            inputs = inputs_fn()
            t0 = time.perf_counter()
            fn(inputs)
            out.append((time.perf_counter() - t0) * 1e6)
    return [statistics.median(t) for t in times]


@contextlib.contextmanager
def device_branches():
    """Ops take the branches a CUDA run takes (no CPU-only eager data checks): what is
    counted and timed is the CUDA host path (see fusedgrad._runtime.host_reads_free)."""
    from fusedgrad import _runtime

    old, _runtime._CPU_AS_DEVICE = _runtime._CPU_AS_DEVICE, True
    try:
        yield
    finally:
        _runtime._CPU_AS_DEVICE = old


def measure(case: HostCase, reps: int = 200) -> dict:
    """Launches, other device ops and host microseconds of one call, vs torch."""
    with stubbed_launches() as launches, device_branches():
        case.fused(case.make())  # warm: caches, first-call imports
        n0 = launches.count
        case.fused(case.make())
        n_launch = launches.count - n0
        inputs = case.make()
        other_ops = count_device_ops(lambda: case.fused(inputs))
        # torch's op runs under the same context: it launches no Triton kernel and takes no
        # fusedgrad branch, so it does the same work as outside it.
        case.torch_ref(case.make())
        fused_us, torch_us = _median_us((case.fused, case.torch_ref), case.make, reps)
    return {"case": case.name, "launches": n_launch, "other_ops": len(other_ops),
            "other_op_names": other_ops, "fused_us": fused_us, "torch_us": torch_us,
            "ratio": fused_us / torch_us if torch_us else float("inf")}


def all_cases() -> list[HostCase]:
    import importlib

    cases = []
    for mod in CASE_MODULES:
        try:
            cases += importlib.import_module(mod).CASES
        except ModuleNotFoundError as exc:  # an op family not in this checkout
            if exc.name != mod:
                raise
    return cases


def main(args) -> int:
    # The interpreter makes every launch a plain Python call that the stub replaces;
    # it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    torch.set_num_threads(1)
    cases = all_cases()
    if args.shape:
        cases = [c for c in cases if any(s in c.name for s in args.shape)]
    if args.op:
        keys = {"cross_entropy": "ce", "batch_norm": "bn", "linear_cross_entropy": "lce"}
        cases = [c for c in cases if any(c.name.startswith(keys.get(o, o)) for o in args.op)]
    print(f"{'case':44s} {'launches':>8s} {'other ops':>9s} {'host us':>9s} "
          f"{'torch us':>9s} {'ratio':>6s}")
    for case in cases:
        r = measure(case, reps=args.reps)
        print(f"{r['case']:44s} {r['launches']:8d} {r['other_ops']:9d} {r['fused_us']:9.0f} "
              f"{r['torch_us']:9.0f} {r['ratio']:5.2f}x", flush=True)
        if args.verbose:
            print(f"    other ops: {', '.join(r['other_op_names']) or '-'}")
    return 0
