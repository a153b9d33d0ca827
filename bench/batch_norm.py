"""BatchNorm benchmark (training mode): fusedgrad vs PyTorch eager and torch.compile.

Cases: fp32/bf16/fp16 activations (affine weight, bias and running statistics in fp32,
as under autocast), contiguous and channels_last, forward+backward and forward only, at
ResNet-50's BatchNorm shapes (N = 64 and 256; C x H x W = 64x56x56, 128x28x28,
256x14x14, 512x7x7, 2048x7x7) and at few-channel, huge-spatial shapes (16x3x512x512,
8x32x256x256) where a per-channel reduction has little parallelism across channels.

Bytes models (M = N*C*H*W elements of e bytes; the per-channel terms are tiny):

* ``minimal_bytes`` -- every record's GB/s. Forward: read x, write y (2*M*e).
  Forward+backward: that, then read x and dy and write dx (5*M*e in all).
* ``fused_kernel_bytes`` -- fusedgrad's kernels by design. Forward: read x twice (a
  statistics pass and a normalise pass) and write y (3*M*e). Backward: read x and dy
  to reduce sum(dy) and sum(dy*x_hat) per channel, then read x and dy again and write
  dx (5*M*e); forward+backward 8*M*e.

Fused epilogues (training fwd+bwd, ResNet-50's shapes): ``bn+relu`` is
``relu(batch_norm(x))`` and ``bn+add+relu`` is ``relu(batch_norm(x) + r)`` (the bottleneck's
last norm with its shortcut r). fusedgrad runs one ``fusedgrad.batch_norm(...,
activation="relu", residual=r)``; torch eager runs F.batch_norm, add and relu; torch.compile
compiles that code. Minimal bytes: BN+ReLU 5*M*e as plain BN (the ReLU's mask is recomputed,
never stored); BN+add+ReLU 7*M*e (r read, its gradient written). fusedgrad's kernel bytes come
from the launcher's ``plan_batch_norm`` (``python -m bench plan --op bn``). Rows: bf16 and
fp16 channels_last, fp32 contiguous; with fp16 input and fp32 weights torch runs cuDNN's
BatchNorm (its own peer row), with bf16 its native kernel.
"""

from __future__ import annotations

from functools import partial

from .common import (
    COMPILE,
    FUSED,
    TORCH,
    Case,
    Context,
    compiled,
    dtype_size,
    fused_op,
    non_leaf,
    run_impl,
    run_impls,
    torch_dtype,
)

RESNET50_BN = ((64, 56), (128, 28), (256, 14), (512, 7), (2048, 7))  # (C, H=W)
RESNET_BATCHES = (64, 256)
FEW_CHANNEL = ((16, 3, 512, 512), (8, 32, 256, 256))  # (N, C, H, W)
DTYPES = ("fp32", "bf16", "fp16")
LAYOUTS = ("contiguous", "channels_last")
MODES = ("fwd+bwd", "fwd")
MOMENTUM = 0.1
EPS = 1e-5
# Per-channel fp32 traffic: weight, bias, running mean/var read+written, saved
# mean/invstd, dweight, dbias -- a small constant per channel.
PER_CHANNEL_BYTES = 10 * 4
# --quick: ResNet-50's first BatchNorm (channels_last, the layout convnets train in)
# and a three-channel image batch (little parallelism across channels).
QUICK = {
    ("bf16", "channels_last", (64, 64, 56, 56), "fwd+bwd"),
    ("bf16", "contiguous", (16, 3, 512, 512), "fwd+bwd"),
}


# (name, activation, residual) of the fused epilogue cases, and their (dtype, layout) rows.
EPILOGUES = (("bn+relu", "relu", False), ("bn+add+relu", "relu", True))
EPILOGUE_ROWS = (("bf16", "channels_last"), ("fp16", "channels_last"), ("fp32", "contiguous"))


def shapes() -> list[tuple[int, int, int, int]]:
    out = [(n, c, hw, hw) for n in RESNET_BATCHES for c, hw in RESNET50_BN]
    return out + list(FEW_CHANNEL)


def minimal_bytes(shape, dtype: str, mode: str) -> int:
    n, c, h, w = shape
    m = n * c * h * w * dtype_size(dtype)
    return (5 * m if mode == "fwd+bwd" else 2 * m) + c * PER_CHANNEL_BYTES


def fused_kernel_bytes(shape, dtype: str, mode: str) -> int:
    n, c, h, w = shape
    m = n * c * h * w * dtype_size(dtype)
    return (8 * m if mode == "fwd+bwd" else 3 * m) + c * PER_CHANNEL_BYTES


def epilogue_minimal_bytes(shape, dtype: str, residual: bool) -> int:
    """Training fwd+bwd of act(bn(x) (+ r)): x, y, dy, x, dx (and r, dr)."""
    n, c, h, w = shape
    m = n * c * h * w * dtype_size(dtype)
    return (7 if residual else 5) * m + c * PER_CHANNEL_BYTES


def epilogue_kernel_bytes(shape, dtype: str, layout: str, activation: str, residual: bool):
    """What fusedgrad's kernels move for a training fwd+bwd, by the launcher's plan (None
    where this checkout's launcher has no plan_batch_norm)."""

    from fusedgrad import _bn_launch

    plan_fn = getattr(_bn_launch, "plan_batch_norm", None)
    if plan_fn is None:
        return None
    plan = plan_fn(shape, torch_dtype(dtype), channels_last=(layout == "channels_last"),
                   activation=activation, residual=residual)
    return plan.hbm_bytes(dtype_size(dtype)) + shape[1] * PER_CHANNEL_BYTES


def case_name(dtype: str, layout: str, shape, mode: str, op: str = "bn") -> str:
    short = "cl" if layout == "channels_last" else "contig"
    return f"{op} {dtype} {short} {'x'.join(map(str, shape))} {mode}"


def cases() -> list[Case]:
    out = []
    for dtype in DTYPES:
        for layout in LAYOUTS:
            for mode in MODES:
                for shape in shapes():
                    n, c, h, w = shape
                    out.append(Case(
                        family="batch_norm", name=case_name(dtype, layout, shape, mode),
                        dtype=dtype, mode=mode, layout=layout,
                        shape={"N": n, "C": c, "H": h, "W": w}, size=n * c * h * w,
                        quick=(dtype, layout, shape, mode) in QUICK,
                        impls=(FUSED, TORCH, COMPILE), run=run_case))
    for op, activation, residual in EPILOGUES:
        for dtype, layout in EPILOGUE_ROWS:
            for n in RESNET_BATCHES:
                for c, hw in RESNET50_BN:
                    shape = (n, c, hw, hw)
                    out.append(Case(
                        family="batch_norm", name=case_name(dtype, layout, shape, "fwd+bwd", op),
                        dtype=dtype, mode="fwd+bwd", layout=layout,
                        shape={"N": n, "C": c, "H": hw, "W": hw}, size=n * c * hw * hw,
                        quick=(dtype, layout, shape) == ("bf16", "channels_last",
                                                         (64, 64, 56, 56)),
                        impls=(FUSED, TORCH, COMPILE),
                        run=partial(run_epilogue_case, activation=activation,
                                    residual=residual)))
    return out


def run_case(case: Case, ctx: Context) -> list[dict]:
    import torch
    import torch.nn.functional as F

    shape = tuple(case.shape[k] for k in "NCHW")
    n_channels = shape[1]
    dtype = torch_dtype(case.dtype)
    backward = case.mode == "fwd+bwd"
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    elems = case.size
    set_bytes = elems * dtype_size(case.dtype) * (2 if backward else 1)
    min_bytes = minimal_bytes(shape, case.dtype, case.mode)

    def make_inputs():
        x = torch.randn(shape, device=ctx.device, dtype=dtype).to(memory_format=fmt)
        def per_channel(scale, offset):
            return offset + scale * torch.randn(n_channels, device=ctx.device)

        s = {
            "x": x,
            "anchor": torch.zeros((), device=ctx.device, requires_grad=True),
            "rm": torch.zeros(n_channels, device=ctx.device),
            "rv": torch.ones(n_channels, device=ctx.device),
            "w": per_channel(0.1, 1.0).requires_grad_(backward),
            "b": per_channel(0.1, 0.0).requires_grad_(backward),
        }
        if backward:
            s["dy"] = torch.randn(shape, device=ctx.device, dtype=dtype).to(memory_format=fmt)
        return s

    def leaves(s):
        return (s["w"], s["b"]) if backward else ()

    def step_of(bn_fn):
        def step(s):
            if not backward:
                return bn_fn(s["x"], s["rm"], s["rv"], s["w"], s["b"])
            # x enters as a non-leaf, as a conv's output does (see common.non_leaf);
            # weight and bias are leaves (parameters) and accumulate their gradients.
            y = bn_fn(non_leaf(s["x"], s["anchor"]), s["rm"], s["rv"], s["w"], s["b"])
            y.backward(s["dy"])
            return y

        return step

    def torch_bn(x, rm, rv, w, b):
        return F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)

    fg_bn, fg_reason = fused_op("batch_norm")
    table = {
        FUSED: (partial(fg_bn, training=True, momentum=MOMENTUM, eps=EPS)
                if fg_bn is not None else None, fg_reason),
        TORCH: (torch_bn, ""),
        COMPILE: lambda: (compiled(torch_bn), ""),
    }

    def measure(impl, bn_fn):
        kernel_bytes = fused_kernel_bytes(shape, case.dtype, case.mode) if impl == FUSED \
            else None
        return run_impl(case, ctx, impl, make_inputs, step_of(bn_fn), set_bytes=set_bytes,
                        min_bytes=min_bytes, bytes_model="minimal", leaves=leaves,
                        kernel_bytes=kernel_bytes)

    return run_impls(case, ctx, table, measure)


def run_epilogue_case(case: Case, ctx: Context, *, activation: str, residual: bool) -> list[dict]:
    """Training fwd+bwd of act(bn(x) (+ r)); x and r enter as non-leaves (a conv's output
    and the block's shortcut), weight and bias are leaves."""
    import torch
    import torch.nn.functional as F

    shape = tuple(case.shape[k] for k in "NCHW")
    n_channels = shape[1]
    dtype = torch_dtype(case.dtype)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    n_big = 4 if residual else 3  # x, dy (and r): tensor-sized inputs of one set
    set_bytes = case.size * dtype_size(case.dtype) * n_big

    def make_inputs():
        def big():
            return torch.randn(shape, device=ctx.device, dtype=dtype).to(memory_format=fmt)

        s = {"x": big(), "dy": big(), "r": big() if residual else None,
             "anchor": torch.zeros((), device=ctx.device, requires_grad=True),
             "rm": torch.zeros(n_channels, device=ctx.device),
             "rv": torch.ones(n_channels, device=ctx.device),
             "w": (1.0 + 0.1 * torch.randn(n_channels, device=ctx.device)).requires_grad_(),
             "b": (0.1 * torch.randn(n_channels, device=ctx.device)).requires_grad_()}
        return s

    def step_of(fn):
        def step(s):
            r = non_leaf(s["r"], s["anchor"]) if residual else None
            y = fn(non_leaf(s["x"], s["anchor"]), r, s["rm"], s["rv"], s["w"], s["b"])
            y.backward(s["dy"])
            return y

        return step

    def torch_fn(x, r, rm, rv, w, b):
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)
        if r is not None:
            y = y + r
        return F.relu(y)

    fg_bn, fg_reason = fused_op("batch_norm")
    min_bytes = epilogue_minimal_bytes(shape, case.dtype, residual)

    def fused_fn(x, r, rm, rv, w, b):
        return fg_bn(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS,
                     activation=activation, residual=r)

    table = {
        FUSED: (fused_fn if fg_bn is not None else None, fg_reason),
        TORCH: (torch_fn, ""),
        COMPILE: lambda: (compiled(torch_fn), ""),
    }

    def measure(impl, fn):
        kernel_bytes = epilogue_kernel_bytes(shape, case.dtype, case.layout, activation,
                                             residual) if impl == FUSED else None
        return run_impl(case, ctx, impl, make_inputs, step_of(fn), set_bytes=set_bytes,
                        min_bytes=min_bytes, bytes_model="minimal",
                        leaves=lambda s: (s["w"], s["b"]), kernel_bytes=kernel_bytes)

    return run_impls(case, ctx, table, measure)
