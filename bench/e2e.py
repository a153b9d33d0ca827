"""End-to-end training steps, fused vs PyTorch: step time and peak memory.

* LM head: hidden 2048 -> vocabulary 128256, bf16, 8192 tokens. ``logits = h @ W.T``,
  cross-entropy, backward into h and W. The logits (8192 x 128256 bf16 = 2.1 GB) and
  their gradient dominate memory: fusedgrad's ``inplace_backward`` (and Liger) keep
  one buffer for both, which shows in ``peak_mem_bytes``.
* ResNet block: (conv3x3 - BatchNorm - ReLU) x 2, 64 channels at 56x56, batch 64,
  channels_last, bf16 autocast with fp32 parameters (the usual AMP set-up); backward
  from a random output gradient into every parameter. fusedgrad's variant is the same
  model after ``fusedgrad.convert_batchnorm``.

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
    run_impl,
    skipped,
)

LM_TOKENS, LM_HIDDEN, LM_VOCAB = 8192, 2048, 128256
RN_BATCH, RN_CHANNELS, RN_HW = 64, 64, 56


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
    ]


def run_lm_head(case: Case, ctx: Context) -> list[dict]:
    import torch
    import torch.nn.functional as F

    tokens, hidden, vocab = (case.shape[k] for k in ("tokens", "hidden", "vocab"))
    set_bytes = (tokens + vocab) * hidden * 2

    def make_inputs():
        return {
            "h": torch.randn(tokens, hidden, device=ctx.device, dtype=torch.bfloat16,
                             requires_grad=True),
            "W": (torch.randn(vocab, hidden, device=ctx.device, dtype=torch.bfloat16)
                  * hidden ** -0.5).requires_grad_(),
            "t": torch.randint(0, vocab, (tokens,), device=ctx.device),
        }

    def leaves(s):
        return (s["h"], s["W"])

    def step_of(loss_fn):
        def step(s):
            loss = loss_fn(s["h"] @ s["W"].t(), s["t"])
            loss.backward()
            return loss

        return step

    def torch_loss(logits, t):
        return F.cross_entropy(logits, t)

    fg_ce, fg_reason = fused_op("cross_entropy")
    liger_ce, liger_reason = liger_cross_entropy()
    flops = 3 * 2 * tokens * hidden * vocab
    records = []
    for impl in case.impls:
        if impl not in ctx.impls:
            continue
        step = None
        if impl in (FUSED, FUSED_INPLACE):
            if fg_ce is None:
                records.append(skipped(case, impl, fg_reason, status="unavailable"))
                continue

            def fused_loss(logits, t, _inplace=(impl == FUSED_INPLACE)):
                return fg_ce(logits, t, inplace_backward=_inplace)

            step = step_of(fused_loss)
        elif impl == TORCH:
            step = step_of(torch_loss)
        elif impl == COMPILE:
            # The whole step's forward (matmul + loss) compiled, as a user would.
            fwd = compiled(lambda h, W, t: F.cross_entropy(h @ W.t(), t))

            def step(s, _fwd=fwd):
                loss = _fwd(s["h"], s["W"], s["t"])
                loss.backward()
                return loss
        elif impl == LIGER:
            if liger_ce is None:
                records.append(skipped(case, impl, liger_reason, status="unavailable"))
                continue
            step = step_of(liger_ce)
        rec = run_impl(case, ctx, impl, make_inputs, step, set_bytes=set_bytes, min_bytes=0,
                       bytes_model="none (matmul-bound step)", leaves=leaves)
        if rec["status"] == "ok":
            rec["tflops"] = flops / (rec["ms"] * 1e-3) / 1e12
        records.append(rec)
    return records


def resnet_block(channels: int):
    import torch.nn as nn

    def conv():
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    return nn.Sequential(conv(), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                         conv(), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def run_resnet_block(case: Case, ctx: Context) -> list[dict]:
    import torch

    n, c, h, w = (case.shape[k] for k in "NCHW")
    torch.manual_seed(0)
    base = resnet_block(c).to(ctx.device).to(memory_format=torch.channels_last)
    set_bytes = 2 * n * c * h * w * 2  # x and dy, bf16

    def make_inputs():
        def act():
            return torch.randn(n, c, h, w, device=ctx.device, dtype=torch.bfloat16).to(
                memory_format=torch.channels_last)

        return {"x": act(), "dy": act()}

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
