"""End-to-end training steps, fused vs PyTorch: step time and peak memory.

* LM head: hidden 2048 -> vocabulary 128256, bf16, 8192 tokens. ``logits = h @ W.T``,
  cross-entropy, backward into h and W. The logits (8192 x 128256 bf16 = 2.1 GB) and
  their gradient dominate memory: fusedgrad's ``inplace_backward`` (and Liger) keep
  one buffer for both, which shows in ``peak_mem_bytes``.
* ResNet block: (conv3x3 - BatchNorm - ReLU) x 2, 64 channels at 56x56, batch 64,
  channels_last, bf16 autocast with fp32 parameters (the usual AMP set-up); backward
  from a random output gradient into every parameter. fusedgrad's variant is the same
  model after ``fusedgrad.convert_batchnorm``.
* ResNet-50 bottleneck (layer1: 256 -> 64 -> 64 -> 256 channels at 56x56, identity
  shortcut), same set-up: conv1x1-BN-ReLU, conv3x3-BN-ReLU, conv1x1-BN, + shortcut, ReLU.
  fusedgrad's variant runs the same parameters through ``fusedgrad.batch_norm`` with the
  fused epilogues: ``activation="relu"`` twice and ``activation="relu", residual=x`` once.
* timm's resnet50 and efficientnet_b0 (random weights, channels_last, 224x224): one
  training step (forward under autocast, cross-entropy on random labels, backward into
  every parameter), as timm builds them vs after ``fusedgrad.convert_batchnorm``. bf16
  autocast is the usual set-up; the fp16 rows are their own comparison: under fp16
  autocast BatchNorm gets fp16 input with fp32 weights, where torch runs cuDNN's kernel
  (with bf16 input it runs its native one). Without timm these records say so.

No bytes model: these steps are dominated by matrix products/convolutions, so GB/s
would mean nothing; the records carry ``ms``, ``peak_mem_bytes`` and, for the LM head,
``tflops`` (3 matrix products of 2*T*H*V flops each).
"""

from __future__ import annotations

import copy

from .common import (
    COMPILE,
    FUSED,
    FUSED_INPLACE,
    LIGER,
    TORCH,
    Case,
    Context,
    compiled,
    fused_op,
    liger_cross_entropy,
    lm_head_inputs,
    lm_head_step,
    run_impl,
    run_impls,
    skipped,
    torch_dtype,
    with_tflops,
)

LM_TOKENS, LM_HIDDEN, LM_VOCAB = 8192, 2048, 128256
RN_BATCH, RN_CHANNELS, RN_HW = 64, 64, 56
# ResNet-50 layer1 bottleneck: in/out channels, inner width, spatial size, batch.
BOTTLENECK_IN, BOTTLENECK_MID, BOTTLENECK_HW, BOTTLENECK_BATCH = 256, 64, 56, 64
# timm models: (name, batch) at 224x224; the batch a single GPU trains them with.
TIMM_MODELS = (("resnet50", 128), ("efficientnet_b0", 128))
TIMM_HW = 224
TIMM_DTYPES = ("bf16", "fp16")


def cases() -> list[Case]:
    return [
        Case(family="e2e", name=f"e2e lm_head bf16 {LM_TOKENS}x{LM_HIDDEN}->{LM_VOCAB} step",
             dtype="bf16", mode="step",
             shape={"tokens": LM_TOKENS, "hidden": LM_HIDDEN, "vocab": LM_VOCAB},
             size=LM_TOKENS * LM_VOCAB, quick=True,
             impls=(FUSED, FUSED_INPLACE, TORCH, COMPILE, LIGER), run=run_lm_head),
        Case(family="e2e",
             name=f"e2e resnet_block bf16 cl {RN_BATCH}x{RN_CHANNELS}x{RN_HW}x{RN_HW} step",
             dtype="bf16", mode="step", layout="channels_last",
             shape={"N": RN_BATCH, "C": RN_CHANNELS, "H": RN_HW, "W": RN_HW},
             size=RN_BATCH * RN_CHANNELS * RN_HW * RN_HW, quick=True,
             impls=(FUSED, TORCH, COMPILE), run=run_resnet_block),
        Case(family="e2e",
             name=(f"e2e bottleneck bf16 cl {BOTTLENECK_BATCH}x{BOTTLENECK_IN}x{BOTTLENECK_HW}"
                   f"x{BOTTLENECK_HW} step"),
             dtype="bf16", mode="step", layout="channels_last",
             shape={"N": BOTTLENECK_BATCH, "C": BOTTLENECK_IN, "mid": BOTTLENECK_MID,
                    "H": BOTTLENECK_HW, "W": BOTTLENECK_HW},
             size=BOTTLENECK_BATCH * BOTTLENECK_IN * BOTTLENECK_HW ** 2, quick=True,
             impls=(FUSED, TORCH, COMPILE), run=run_bottleneck),
    ] + [
        Case(family="e2e", name=f"e2e timm {model} {dtype} cl {batch}x3x{TIMM_HW}x{TIMM_HW} step",
             dtype=dtype, mode="step", layout="channels_last",
             shape={"model": model, "N": batch, "H": TIMM_HW, "W": TIMM_HW},
             size=batch * 3 * TIMM_HW ** 2, quick=(dtype == "bf16"),
             impls=(FUSED, TORCH, COMPILE), run=run_timm_model)
        for model, batch in TIMM_MODELS for dtype in TIMM_DTYPES
    ]


def run_lm_head(case: Case, ctx: Context) -> list[dict]:
    import torch.nn.functional as F

    tokens, hidden, vocab = (case.shape[k] for k in ("tokens", "hidden", "vocab"))
    make_inputs, leaves, set_bytes = lm_head_inputs(case, ctx)

    def head_step(loss_fn):
        """The step of ``loss_fn(logits, t)`` on the eager head's logits x @ W^T."""
        return lm_head_step(lambda x, w, t: loss_fn(x @ w.t(), t))

    def fused(inplace):
        if fg_ce is None:
            return None, fg_reason
        return head_step(lambda logits, t: fg_ce(logits, t, inplace_backward=inplace)), ""

    def torch_loss(logits, t):
        return F.cross_entropy(logits, t)

    def torch_forward(x, w, t):
        return torch_loss(x @ w.t(), t)

    fg_ce, fg_reason = fused_op("cross_entropy")
    liger_ce, liger_reason = liger_cross_entropy()
    table = {
        FUSED: lambda: fused(False),
        FUSED_INPLACE: lambda: fused(True),
        TORCH: (head_step(torch_loss), ""),
        # The whole step's forward (matmul + loss) compiled, as a user would.
        COMPILE: lambda: (lm_head_step(compiled(torch_forward)), ""),
        LIGER: (head_step(liger_ce) if liger_ce is not None else None, liger_reason),
    }
    flops = 3 * 2 * tokens * hidden * vocab

    def measure(impl, step):
        return with_tflops(run_impl(case, ctx, impl, make_inputs, step, set_bytes=set_bytes,
                                    min_bytes=0, bytes_model="none (matmul-bound step)",
                                    leaves=leaves), flops)

    return run_impls(case, ctx, table, measure)


def resnet_block(channels: int):
    import torch.nn as nn

    def conv():
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    return nn.Sequential(conv(), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                         conv(), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def block_inputs(ctx: Context, n: int, c: int, h: int, w: int):
    """(make_inputs, set_bytes) of a convolution block's step: a bf16 channels_last input
    ``x`` and the output's gradient ``dy``, both (n, c, h, w)."""
    import torch

    def make_inputs():
        def act():
            return torch.randn(n, c, h, w, device=ctx.device, dtype=torch.bfloat16).to(
                memory_format=torch.channels_last)

        return {"x": act(), "dy": act()}

    return make_inputs, 2 * n * c * h * w * 2


def run_resnet_block(case: Case, ctx: Context) -> list[dict]:
    import torch

    n, c, h, w = (case.shape[k] for k in "NCHW")
    torch.manual_seed(0)
    base = resnet_block(c).to(ctx.device).to(memory_format=torch.channels_last)
    make_inputs, set_bytes = block_inputs(ctx, n, c, h, w)

    def step_of(model):
        params = list(model.parameters())

        def step(s):
            with torch.autocast(ctx.device, dtype=torch.bfloat16):
                y = model(s["x"])
            y.backward(s["dy"])
            return y

        return step, params

    convert, conv_reason = fused_op("convert_batchnorm")
    records = []
    for impl in case.impls:
        if impl not in ctx.impls:
            continue
        if impl == FUSED:
            if convert is None:
                records.append(skipped(case, impl, conv_reason, status="unavailable"))
                continue
            try:
                model = convert(copy.deepcopy(base))
            except Exception as exc:  # noqa: BLE001
                records.append(skipped(case, impl, f"convert_batchnorm failed: {exc}",
                                       status="error"))
                continue
        elif impl == TORCH:
            model = copy.deepcopy(base)
        elif impl == COMPILE:
            model = compiled(copy.deepcopy(base))
        else:  # pragma: no cover
            raise AssertionError(impl)
        step, params = step_of(model)
        records.append(run_impl(case, ctx, impl, make_inputs, step, set_bytes=set_bytes,
                                min_bytes=0, bytes_model="none (convolution-bound step)",
                                leaves=lambda s, _p=params: _p))
    return records


def bottleneck(channels: int, mid: int, fused: bool):
    """ResNet-50's bottleneck (torchvision's layout: conv1/bn1, conv2/bn2, conv3/bn3, identity
    shortcut) whose forward either uses torch's BatchNorm modules and separate ReLU / add ops
    (``fused=False``) or calls ``fusedgrad.batch_norm`` on the same parameters and buffers
    with the fused epilogues (``fused=True``). Seeded: the same parameters every time."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, mid, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(channels)

        def norm(self, bn, x, residual=None):
            """relu(bn(x) (+ residual)) in training mode."""
            if fused:
                import fusedgrad as fg

                return fg.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                     training=True, momentum=bn.momentum, eps=bn.eps,
                                     activation="relu", residual=residual)
            y = bn(x)
            return F.relu(y if residual is None else y + residual)

        def forward(self, x):
            y = self.norm(self.bn1, self.conv1(x))
            y = self.norm(self.bn2, self.conv2(y))
            return self.norm(self.bn3, self.conv3(y), residual=x)

    torch.manual_seed(0)
    return Block()


def _autocast_step(ctx, model, dtype, loss_of):
    import torch

    def step(s):
        with torch.autocast(ctx.device, dtype=dtype):
            out = model(s["x"])
        loss = loss_of(out, s)
        loss.backward()
        return loss

    return step


def run_bottleneck(case: Case, ctx: Context) -> list[dict]:
    import torch

    n, c, mid, h, w = (case.shape[k] for k in ("N", "C", "mid", "H", "W"))
    make_inputs, set_bytes = block_inputs(ctx, n, c, h, w)

    def loss_of(out, s):
        return (out * s["dy"]).sum()  # backward seeds dy, as y.backward(dy) would

    records = []
    fg_bn, fg_reason = fused_op("batch_norm")
    for impl in case.impls:
        if impl not in ctx.impls:
            continue
        if impl == FUSED and fg_bn is None:
            records.append(skipped(case, impl, fg_reason, status="unavailable"))
            continue
        model = bottleneck(c, mid, fused=(impl == FUSED)).to(ctx.device).to(
            memory_format=torch.channels_last)
        params = list(model.parameters())
        if impl == COMPILE:
            model = compiled(model)
        step = _autocast_step(ctx, model, torch.bfloat16, loss_of)
        records.append(run_impl(case, ctx, impl, make_inputs, step, set_bytes=set_bytes,
                                min_bytes=0, bytes_model="none (convolution-bound step)",
                                leaves=lambda s, _p=params: _p))
    return records


def timm_model(name: str):
    """timm's model with random weights, or (None, reason) without timm."""
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 - torchvision may fail to load, not just import
        return None, (f"timm not importable ({type(exc).__name__}: {exc}); install the "
                      "`models` extra")
    import torch

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False), ""


def run_timm_model(case: Case, ctx: Context) -> list[dict]:
    import torch
    import torch.nn.functional as F

    n, h, w = (case.shape[k] for k in ("N", "H", "W"))
    dtype = torch_dtype(case.dtype)
    set_bytes = n * 3 * h * w * 4  # fp32 images (autocast casts them)
    base, reason = timm_model(case.shape["model"])
    records = []
    if base is None:
        return [skipped(case, impl, reason, status="unavailable") for impl in case.impls
                if impl in ctx.impls]
    base = base.to(ctx.device).to(memory_format=torch.channels_last)
    n_classes = base.num_classes

    def make_inputs():
        x = torch.randn(n, 3, h, w, device=ctx.device).to(memory_format=torch.channels_last)
        return {"x": x, "t": torch.randint(0, n_classes, (n,), device=ctx.device)}

    def loss_of(out, s):
        return F.cross_entropy(out.float(), s["t"])

    convert, conv_reason = fused_op("convert_batchnorm")
    for impl in case.impls:
        if impl not in ctx.impls:
            continue
        model = copy.deepcopy(base)
        if impl == FUSED:
            if convert is None:
                records.append(skipped(case, impl, conv_reason, status="unavailable"))
                continue
            model, report = convert(model, report=True)
            if report.left:
                records.append(skipped(case, impl, f"convert_batchnorm left {report.left}",
                                       status="error"))
                continue
        params = list(model.parameters())
        if impl == COMPILE:
            model = compiled(model)
        step = _autocast_step(ctx, model, dtype, loss_of)
        records.append(run_impl(case, ctx, impl, make_inputs, step, set_bytes=set_bytes,
                                min_bytes=0, bytes_model="none (convolution-bound step)",
                                leaves=lambda s, _p=params: _p))
    return records
