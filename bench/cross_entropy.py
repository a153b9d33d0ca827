"""Cross-entropy benchmark: fusedgrad vs PyTorch eager, torch.compile, Liger-Kernel.

Cases: bf16 and fp32 logits, rows in {4096, 8192, 16384} x V in {32000, 50257, 128256,
151936, 256000}; forward+backward (``loss.backward()`` on a mean loss) and forward only
(logits without grad). Plus, in bf16: few rows of a huge vocabulary (64 and 512 x 256000:
can the op fill the GPU?), and two backward variants at 8192 x 128256 whose backward is
not free: ``go2`` (a mean loss, backward with grad_output 2) and ``none``
(reduction="none", backward with random per-row grad_output). Peers: torch eager,
torch.compile (default mode and "max-autotune-no-cudagraphs"; not in --quick, whose
budget one autotuned compilation would use up) and Liger-Kernel. Every record also has
a CUDA-graph time (``graph_ms``, see bench/timing.py).

The logits enter as a non-leaf tensor, as in a model, so the gradient is produced and
handed on, never accumulated into ``.grad`` (see ``common.non_leaf``). Forward+backward
also times fusedgrad's ``inplace_backward`` mode (gradient written into the logits'
storage, as Liger-Kernel always does).

Bytes models (next to the benchmark, as the README promises):

* ``minimal_bytes`` -- what any implementation must move, used for every record's GB/s:
  forward+backward reads the N x V logits once and writes the N x V gradient once;
  forward only reads the logits once. Plus the int64 targets and the scalar loss.
* ``fused_kernel_bytes`` -- what fusedgrad's kernels move by their design, from the
  launcher's own plan (``bench/plan_ce.py``, which ``python -m bench plan`` prints): the
  path it takes for this shape decides whether a logit is read once or twice. With
  ``grad_output == 1`` (plain ``loss.backward()``) the backward moves nothing.

Inplace note: with ``inplace_backward`` (and Liger) each timed call overwrites its
logits with the gradient, so later calls see gradient values as logits. The work per
call is identical (same shapes, finite values), so the timing is unaffected.
"""

from __future__ import annotations

from .common import (
    COMPILE,
    COMPILE_MAX,
    FUSED,
    FUSED_INPLACE,
    LIGER,
    TORCH,
    Case,
    Context,
    compiled,
    dtype_size,
    fused_op,
    liger_cross_entropy,
    non_leaf,
    run_impl,
    run_impls,
    torch_dtype,
)

ROWS = (4096, 8192, 16384)
VOCABS = (32000, 50257, 128256, 151936, 256000)
DTYPES = ("bf16", "fp32")
MODES = ("fwd+bwd", "fwd")
# --quick: the LM-typical case in both modes (each torch.compile peer costs a fresh
# compilation, which dominates --quick's 3-minute budget).
QUICK = {("bf16", 8192, 128256, "fwd+bwd"), ("bf16", 8192, 128256, "fwd")}
# Few rows of the largest vocabulary: one program per row would leave SMs idle.
FEW_ROWS = (64, 512)
FEW_ROWS_VOCAB = 256000
# Backward variants (bf16, fwd+bwd): name suffix -> (reduction, grad_output); grad_output
# None is a random per-row tensor (reduction="none"), a number a 0-dim tensor.
VARIANT_SHAPE = (8192, 128256)
VARIANTS = {"go2": ("mean", 2.0), "none": ("none", None)}
COMPILE_MAX_MODE = "max-autotune-no-cudagraphs"
# Backward only (mode "bwd", bf16): the time of ``loss.backward()`` alone, the forward run
# untimed before each call (timing.measure_backward_only). fusedgrad's backward with
# grad_output 1 does no work by design; the peers' does. Selected with ``--mode bwd``.
BWD_ROWS = 8192
BWD_VOCABS = (32000, 128256, 256000)

TARGET_BYTES = 8  # int64 class indices
LOSS_BYTES = 4


def minimal_bytes(n_rows: int, vocab: int, dtype: str, mode: str) -> int:
    logits = n_rows * vocab * dtype_size(dtype)
    small = n_rows * TARGET_BYTES + LOSS_BYTES
    if mode == "bwd":  # a backward must at least write the N x V gradient
        return logits
    return (2 * logits if mode == "fwd+bwd" else logits) + small


def fused_kernel_bytes(n_rows: int, vocab: int, dtype: str, mode: str,
                       grad_output_one: bool = True) -> int:
    from .plan_ce import fused_hbm_bytes

    return fused_hbm_bytes(n_rows, vocab, dtype, mode, grad_output_one=grad_output_one)


def case_name(dtype: str, n_rows: int, vocab: int, mode: str, variant: str = "") -> str:
    return f"ce {dtype} {n_rows}x{vocab} {mode}" + (f" {variant}" if variant else "")


def _case(dtype, n_rows, vocab, mode, variant=""):
    reduction, grad_output = VARIANTS.get(variant, ("mean", 1.0))
    quick = not variant and (dtype, n_rows, vocab, mode) in QUICK
    impls = (FUSED, FUSED_INPLACE) if mode == "fwd+bwd" else (FUSED,)
    peers = (TORCH, COMPILE, LIGER) if quick else (TORCH, COMPILE, COMPILE_MAX, LIGER)
    return Case(family="cross_entropy", name=case_name(dtype, n_rows, vocab, mode, variant),
                dtype=dtype, mode=mode,
                shape={"rows": n_rows, "vocab": vocab, "reduction": reduction,
                       "grad_output": grad_output},
                size=n_rows * vocab, quick=quick, impls=impls + peers, run=run_case)


def cases() -> list[Case]:
    out = []
    for dtype in DTYPES:
        for mode in MODES:
            for n_rows in ROWS:
                for vocab in VOCABS:
                    out.append(_case(dtype, n_rows, vocab, mode))
    for mode in MODES:
        for n_rows in FEW_ROWS:
            out.append(_case("bf16", n_rows, FEW_ROWS_VOCAB, mode))
    for vocab in BWD_VOCABS:  # before the variants: a time-limited run reaches them first
        out.append(_case("bf16", BWD_ROWS, vocab, "bwd"))
    for variant in VARIANTS:
        out.append(_case("bf16", *VARIANT_SHAPE, "fwd+bwd", variant))
    return out


def run_case(case: Case, ctx: Context) -> list[dict]:
    import torch
    import torch.nn.functional as F

    n_rows, vocab = case.shape["rows"], case.shape["vocab"]
    reduction = case.shape.get("reduction", "mean")
    grad_output = case.shape.get("grad_output", 1.0)
    dtype = torch_dtype(case.dtype)
    backward = case.mode in ("fwd+bwd", "bwd")
    backward_only = case.mode == "bwd"
    set_bytes = n_rows * vocab * dtype_size(case.dtype) + n_rows * TARGET_BYTES
    min_bytes = minimal_bytes(n_rows, vocab, case.dtype, case.mode)

    def make_inputs():
        s = {
            "x": torch.randn(n_rows, vocab, device=ctx.device, dtype=dtype),
            "t": torch.randint(0, vocab, (n_rows,), device=ctx.device),
            "anchor": torch.zeros((), device=ctx.device, requires_grad=True),
        }
        if backward and grad_output != 1.0:  # built here, not in the timed step
            s["go"] = (torch.rand(n_rows, device=ctx.device, dtype=dtype) + 0.5
                       if grad_output is None
                       else torch.full((), grad_output, device=ctx.device, dtype=dtype))
        return s

    def step_of(loss_fn):
        def forward(s):
            # The logits enter as a non-leaf, as a model's do (see common.non_leaf).
            return loss_fn(non_leaf(s["x"], s["anchor"]), s["t"])

        def backward_of(s, loss):
            loss.backward(s.get("go"))

        def step(s):
            if not backward:
                return loss_fn(s["x"], s["t"])
            loss = forward(s)
            backward_of(s, loss)
            return loss

        # For backward-only timing (timing.measure_backward_only): the two halves.
        step.forward, step.backward = forward, backward_of
        return step

    bwd_ctx = ctx
    if backward_only and ctx.measure is None:
        from dataclasses import replace

        from .timing import measure_backward_only

        bwd_ctx = replace(ctx, measure=measure_backward_only)

    fg_ce, fg_reason = fused_op("cross_entropy")
    liger_ce, liger_reason = liger_cross_entropy()

    def torch_ce(x, t):
        return F.cross_entropy(x, t, reduction=reduction)

    def fused(inplace):
        if fg_ce is None:
            return None, fg_reason

        def loss_fn(x, t):
            return fg_ce(x, t, reduction=reduction, inplace_backward=inplace)

        return loss_fn, ""

    def liger_loss(x, t):
        return liger_ce(x, t, reduction)

    table = {
        FUSED: lambda: fused(False),
        FUSED_INPLACE: lambda: fused(True),
        TORCH: (torch_ce, ""),
        COMPILE: lambda: (compiled(torch_ce), ""),
        COMPILE_MAX: lambda: (compiled(torch_ce, mode=COMPILE_MAX_MODE), ""),
        LIGER: (liger_loss if liger_ce is not None else None, liger_reason),
    }

    def measure(impl, loss_fn):
        kernel_bytes = None
        if impl in (FUSED, FUSED_INPLACE) and not backward_only:
            kernel_bytes = fused_kernel_bytes(n_rows, vocab, case.dtype, case.mode,
                                              grad_output_one=grad_output == 1.0)
        return run_impl(case, bwd_ctx, impl, make_inputs, step_of(loss_fn),
                        set_bytes=set_bytes, min_bytes=min_bytes, bytes_model="minimal",
                        kernel_bytes=kernel_bytes, graph=not backward_only)

    return run_impls(case, ctx, table, measure)
