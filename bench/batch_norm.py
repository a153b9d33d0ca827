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
"""

from __future__ import annotations

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
    skipped,
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


def case_name(dtype: str, layout: str, shape, mode: str) -> str:
    short = "cl" if layout == "channels_last" else "contig"
    return f"bn {dtype} {short} {'x'.join(map(str, shape))} {mode}"


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
    records = []
    for impl in case.impls:
        if impl not in ctx.impls:
            continue
        kernel_bytes = None
        if impl == FUSED:
            if fg_bn is None:
                records.append(skipped(case, impl, fg_reason, status="unavailable"))
                continue

            def bn_fn(x, rm, rv, w, b):
                return fg_bn(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)

            kernel_bytes = fused_kernel_bytes(shape, case.dtype, case.mode)
        elif impl == TORCH:
            bn_fn = torch_bn
        elif impl == COMPILE:
            bn_fn = compiled(torch_bn)
        else:  # pragma: no cover
            raise AssertionError(impl)
        records.append(run_impl(case, ctx, impl, make_inputs, step_of(bn_fn),
                                set_bytes=set_bytes, min_bytes=min_bytes, bytes_model="minimal",
                                leaves=leaves, kernel_bytes=kernel_bytes))
    return records
