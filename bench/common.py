"""Cases, records and the implementations compared (fusedgrad and its peers).

A *case* is one problem (op family, dtype, shape, layout, fwd or fwd+bwd); running it
yields one *record* per implementation. Records are plain dicts (they go to JSON as
they are); their keys are listed in ``RECORD_KEYS``.

Byte counts: every record of a case carries the SAME minimal bytes model (``bytes``:
each input read once, each output written once, what any implementation must move),
so ``gbps`` and ``pct_copy_bw`` compare implementations at the same work: it is an
effective bandwidth, never flattering an implementation that moves more. fusedgrad's
records also carry ``kernel_bytes``/``kernel_gbps``: what its kernels actually move by
their own model (e.g. two reads of x for BatchNorm's forward), i.e. how close the
kernels run to the copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

# Implementation names, as they appear in records, tables and plot legends.
FUSED = "fusedgrad"
FUSED_INPLACE = "fusedgrad (inplace)"
TORCH = "torch"
COMPILE = "torch.compile"
# Second compile peer: Inductor's autotuned kernels (no CUDA graphs, so it times the same
# launches as the others; the graph column times every implementation under CUDA graphs).
COMPILE_MAX = "torch.compile max-autotune"
LIGER = "liger"
TORCH_LCE = "torch.lce"  # torch's F.linear_cross_entropy, chunked (linear + CE cases only)
PEERS = (TORCH, COMPILE, COMPILE_MAX, LIGER, TORCH_LCE)
# Command-line spellings for --impl.
IMPL_ALIASES = {
    "fusedgrad": FUSED, "fused": FUSED, "fg": FUSED,
    "inplace": FUSED_INPLACE, "fusedgrad-inplace": FUSED_INPLACE,
    "torch": TORCH, "eager": TORCH, "pytorch": TORCH,
    "compile": COMPILE, "torch.compile": COMPILE, "inductor": COMPILE,
    "max-autotune": COMPILE_MAX, "compile-max": COMPILE_MAX,
    "liger": LIGER, "liger-kernel": LIGER,
    "torch.lce": TORCH_LCE, "torch-lce": TORCH_LCE,
}
DTYPE_NAMES = ("fp32", "bf16", "fp16")

RECORD_KEYS = (
    "family", "case", "dtype", "mode", "layout", "shape", "size", "impl", "status", "reason",
    "ms", "bytes", "bytes_model", "gbps", "pct_copy_bw", "kernel_bytes", "kernel_gbps",
    "peak_mem_bytes", "peak_extra_bytes", "input_sets", "speedup",
    # ms is net of the timer's own cost (an empty step timed the same way: baseline_ms);
    # graph_ms times the same step replayed as a CUDA graph (None when it cannot be
    # captured, e.g. an implementation that synchronises; graph_note says why).
    "baseline_ms", "graph_ms", "graph_note",
)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_size(name: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}[name]


@dataclasses.dataclass
class Case:
    """One benchmark problem. ``run(case, ctx)`` returns its records (CUDA only)."""

    family: str            # "cross_entropy" | "batch_norm" | "e2e"
    name: str              # unique and filterable, e.g. "ce bf16 8192x128256 fwd+bwd"
    dtype: str             # "fp32" | "bf16" | "fp16"
    mode: str              # "fwd" | "fwd+bwd" | "step"
    shape: dict
    size: int              # elements of the main tensor (the plots' x axis)
    layout: str = ""       # "contiguous" | "channels_last" (BatchNorm, ResNet block)
    quick: bool = False    # part of --quick
    impls: tuple = ()      # implementations this case compares
    run: Callable | None = None


@dataclasses.dataclass
class Context:
    """What every case needs to know about the run."""

    impls: set                 # implementations selected on the command line
    copy_gbps: float           # measured device-to-device copy bandwidth
    rep_ms: int = 100
    device: str = "cuda"       # where inputs live ("cpu" only for the tests' dry run)
    measure: Callable | None = None  # None: bench.timing.measure (tests pass a stand-in)


def new_record(case: Case, impl: str, **fields) -> dict:
    rec = {k: None for k in RECORD_KEYS}
    rec.update(family=case.family, case=case.name, dtype=case.dtype, mode=case.mode,
               layout=case.layout, shape=dict(case.shape), size=case.size, impl=impl,
               status="ok", reason="", speedup={})
    rec.update(fields)
    return rec


def skipped(case: Case, impl: str, reason: str, status: str = "skipped") -> dict:
    return new_record(case, impl, status=status, reason=reason)


# --- who is available -------------------------------------------------------------


def fused_op(name: str):
    """``(fusedgrad.<name>, "")`` or ``(None, reason)`` while the op has not landed."""
    try:
        fg = importlib.import_module("fusedgrad")
    except Exception as exc:  # noqa: BLE001 - report any import failure verbatim
        return None, f"fusedgrad does not import: {type(exc).__name__}: {exc}"
    fn = getattr(fg, name, None)
    if fn is None:
        return None, f"fusedgrad.{name} is not available (not exported by this checkout)"
    return fn, ""


def liger_cross_entropy():
    """Liger-Kernel's cross-entropy as ``fn(logits, target) -> loss``, or (None, reason).

    Imports the op module directly: ``liger_kernel.transformers`` would pull in
    Hugging Face transformers. Argument order is that of liger-kernel 0.8.x
    (``LigerCrossEntropyFunction.apply``); like fusedgrad's inplace mode, Liger writes
    the gradient into the logits' storage during the forward when they require grad.
    """
    try:
        mod = importlib.import_module("liger_kernel.ops.cross_entropy")
        fn_cls = mod.LigerCrossEntropyFunction
    except Exception as exc:  # noqa: BLE001
        return None, (f"Liger-Kernel not importable ({type(exc).__name__}: {exc}); "
                      "install the `liger` extra or carry its wheel (bench/fetch_wheels.sh)")

    def liger_ce(logits, target, reduction="mean"):
        out = fn_cls.apply(logits, target, None, -100, 0.0, 0.0, reduction, None, False, False,
                           False)
        return out[0] if isinstance(out, tuple) else out

    return liger_ce, ""


def liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001
        return None


def compiled(fn: Callable, mode: str | None = None) -> Callable:
    """``torch.compile`` of the same PyTorch code, fresh for this case.

    Dynamo's caches are reset so every case compiles for its own static shapes (no
    recompile limit reached, no dynamic-shape kernels from an earlier case). ``mode``:
    None (Inductor's default) or e.g. "max-autotune-no-cudagraphs" (COMPILE_MAX).
    """
    import torch

    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, mode=mode)


_NON_LEAF = None


def non_leaf(x, anchor):
    """``x`` as a non-leaf autograd tensor, at no cost: the logits/activations of a model.

    In a model the tensor a loss or a normalisation reads is the output of an earlier
    layer, and its gradient flows on into that layer. Benchmarking on a leaf instead
    would (a) add ``AccumulateGrad``'s work (it copies a gradient that something else
    still references) and (b) forbid in-place gradients (``inplace_backward``). So each
    timed call re-enters ``x`` (a tensor that does not require grad) into autograd
    through an identity Function marked as an in-place op: no data is moved, and the
    gradient arriving at it is dropped, as the earlier layer would consume it. ``anchor``
    is a 0-d leaf requiring grad, which makes the output require grad.
    """
    global _NON_LEAF
    if _NON_LEAF is None:
        import torch

        class NonLeaf(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t, _anchor):
                ctx.mark_dirty(t)
                return t

            @staticmethod
            def backward(ctx, grad):
                return None, None

        _NON_LEAF = NonLeaf
    # detach(): a fresh alias each call, so the calls do not chain autograd nodes.
    return _NON_LEAF.apply(x.detach(), anchor)


def run_impl(case: Case, ctx: Context, impl: str, make_inputs, step, *, set_bytes: int,
             min_bytes: int, bytes_model: str, leaves=lambda s: (), kernel_bytes=None,
             graph: bool = False) -> dict:
    """Measure one implementation of ``case``; errors and OOM become records, not crashes.
    graph: also time the step replayed as a CUDA graph (``graph_ms``)."""
    import torch

    from . import timing

    try:
        measure = ctx.measure or timing.measure
        extra = {"graph": True} if graph else {}
        m = measure(make_inputs, step, set_bytes, leaves=leaves, rep_ms=ctx.rep_ms, **extra)
    except torch.cuda.OutOfMemoryError as exc:
        timing.free_memory()
        return skipped(case, impl, f"out of memory: {str(exc).splitlines()[0]}", status="oom")
    except Exception as exc:  # noqa: BLE001 - one failing implementation must not stop the run
        timing.free_memory()
        return skipped(case, impl, f"{type(exc).__name__}: {str(exc)[:400]}", status="error")
    seconds = m["ms"] * 1e-3
    gbps = min_bytes / seconds / 1e9 if min_bytes else None
    rec = new_record(case, impl, ms=m["ms"], bytes=min_bytes, bytes_model=bytes_model, gbps=gbps,
                     pct_copy_bw=(100.0 * gbps / ctx.copy_gbps) if gbps and ctx.copy_gbps
                     else None,
                     peak_mem_bytes=m["peak_mem_bytes"], peak_extra_bytes=m["peak_extra_bytes"],
                     input_sets=m["input_sets"], baseline_ms=m.get("baseline_ms"),
                     graph_ms=m.get("graph_ms"), graph_note=m.get("graph_note"))
    if kernel_bytes is not None:
        rec.update(kernel_bytes=kernel_bytes, kernel_gbps=kernel_bytes / seconds / 1e9)
    return rec


def run_impls(case: Case, ctx: Context, table: dict, measure: Callable) -> list[dict]:
    """One record per implementation that both the case and the context select, in the
    case's order. table: impl -> (fn, reason), or a function returning that pair, called only
    for a selected implementation (``compiled`` resets Dynamo); fn None gives an
    "unavailable" record with the reason, else ``measure(impl, fn)`` makes the record."""
    records = []
    for impl in case.impls:
        if impl not in ctx.impls:
            continue
        entry = table[impl]
        fn, reason = entry() if callable(entry) else entry
        records.append(skipped(case, impl, reason, status="unavailable") if fn is None
                       else measure(impl, fn))
    return records


def with_tflops(rec: dict, flops: float) -> dict:
    """``rec`` with ``tflops`` for a measured step of ``flops`` floating-point operations."""
    if rec["status"] == "ok":
        rec["tflops"] = flops / (rec["ms"] * 1e-3) / 1e12
    return rec


def lm_head_inputs(case: Case, ctx: Context):
    """(make_inputs, leaves, set_bytes) of a bf16 LM-head step: hidden states ``x``
    (tokens, hidden) and the head's weight ``W`` (vocab, hidden), both leaves, and class
    targets ``t``; the shape's "tokens", "hidden" and "vocab"."""
    import torch

    tokens, hidden, vocab = (case.shape[k] for k in ("tokens", "hidden", "vocab"))

    def make_inputs():
        return {
            "x": torch.randn(tokens, hidden, device=ctx.device, dtype=torch.bfloat16,
                             requires_grad=True),
            "W": (torch.randn(vocab, hidden, device=ctx.device, dtype=torch.bfloat16)
                  * hidden ** -0.5).requires_grad_(),
            "t": torch.randint(0, vocab, (tokens,), device=ctx.device),
        }

    def leaves(s):
        return (s["x"], s["W"])

    return make_inputs, leaves, (tokens + vocab) * hidden * 2


def lm_head_step(forward: Callable) -> Callable:
    """The step of ``forward(x, W, t) -> loss`` on lm_head_inputs: forward, then backward."""
    def step(s):
        loss = forward(s["x"], s["W"], s["t"])
        loss.backward()
        return loss

    return step


def add_speedups(records: list[dict]) -> None:
    """For each fusedgrad record: ``speedup[peer] = peer_ms / fused_ms`` within its case."""
    by_case: dict[str, list[dict]] = {}
    for r in records:
        by_case.setdefault(r["case"], []).append(r)
    for recs in by_case.values():
        peers = {r["impl"]: r["ms"] for r in recs
                 if r["impl"] in PEERS and r["status"] == "ok" and r["ms"]}
        for r in recs:
            if r["impl"] in (FUSED, FUSED_INPLACE) and r["status"] == "ok" and r["ms"]:
                r["speedup"] = {p: ms / r["ms"] for p, ms in peers.items()}
