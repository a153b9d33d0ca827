"""Cross-entropy with a probability target that requires grad (dL/dtarget as torch has it),
and cross-entropy under autocast (a float32 loss).

The common path (ops/cross_entropy.py) never comes here: only a floating ``target`` with
``requires_grad`` under grad mode does (distillation through soft labels, torch's OpInfo
samples), or half-precision logits under ``torch.autocast``, where torch's autocast runs
cross-entropy in float32 and returns a float32 loss: here the half logits are read as they
are (the kernels compute in float32 anyway) and only the loss is written in float32; the
input gradient stays in the logits' dtype, as autocast's cast back gives.

Forward is the usual fused kernel, which also keeps the per-row log-sum-exp; backward
rescales the saved input gradient as usual and, for the target, runs one small
kernel (kernels/ce_target_grad.py) over the saved logits and lse:

    dL/dy_c = grad_output_row * (1 / divisor) * -(1 - eps) * w_c * (z_c - lse_row)

divisor: n_rows for reduction="mean" (torch divides probability-target losses by the
number of rows, weights or not), 1 for "sum" (or the ``divisor=`` argument), none for
"none" (grad_output is per row). Two custom ops carry it through torch.compile.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from . import _alloc
from . import _ce_launch as launch
from . import cross_entropy as ce
from ._runtime import FP_FUSION, acc_dtype, device_guard, split_f64
from .kernels import ce_target_grad as kernels

# Classes per program: 1024 fp32 logits is 8 values per thread at 4 warps, enough loads in
# flight; small rows take the next power of two (at least one warp's 32 lanes).
MAX_BLOCK_V = 1024
MIN_BLOCK_V = 32


def target_grad_block_v(n_classes: int) -> int:
    """Classes per program of the target-gradient kernel."""
    return max(MIN_BLOCK_V, min(MAX_BLOCK_V, triton.next_power_of_2(max(n_classes, 1))))


def target_grad_num_warps(block_v: int) -> int:
    """One warp per 256 classes (8 per thread), 1 to 4 warps."""
    return max(1, min(4, block_v // 256))


def launch_target_grad(logits: Tensor, lse_rows: Tensor, weight: Tensor | None, coef: Tensor,
                       out: Tensor, softcap: float | None) -> None:
    """out (target's shape) = coef_row * w_c * (z_c - lse_row); coef 0-dim or (n_rows,)."""
    logits3 = launch.rows_view(logits, class_dim=True)
    out3 = launch.rows_view(out, class_dim=True)
    n_outer, n_inner, n_classes = logits3.shape
    n_rows = n_outer * n_inner
    if n_rows == 0 or n_classes == 0:
        return
    block_v = target_grad_block_v(n_classes)
    sc_hi, sc_lo = split_f64(softcap if softcap is not None else 1.0)
    kernels.ce_target_grad_kernel[(n_rows, triton.cdiv(n_classes, block_v))](
        logits3, lse_rows, weight if weight is not None else lse_rows, coef, out3,
        n_classes, n_inner, *logits3.stride(), *out3.stride(),
        coef.stride(0) if coef.dim() else 0,
        sc_hi, sc_lo, int(weight is not None), int(softcap is not None),
        BLOCK_V=block_v, num_warps=target_grad_num_warps(block_v), enable_fp_fusion=FP_FUSION,
    )


# ---------------------------------------------------------------- custom ops

def _n_rows(input: Tensor, target: Tensor):
    return math.prod(ce._loss_shape(input, True, target))


@torch.library.custom_op("fusedgrad::cross_entropy_fwd_lse", mutates_args=())
def cross_entropy_fwd_lse(input: Tensor, target: Tensor, weight: Tensor | None,
                          ignore_index: int, reduction: str, label_smoothing: float,
                          z_loss: float, softcap: float | None, compute_grad: bool,
                          divisor: Tensor | None = None, divisor_value: float | None = None,
                          loss_fp32: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad, lse): cross_entropy_fwd plus the per-row log-sum-exp (n_rows,) in the
    accumulation dtype, which the target gradient needs; loss_fp32: the loss in float32."""
    grad = _alloc.empty_like(input) if compute_grad else input.new_empty(0)
    lse = []
    loss = ce._forward_into(input, target, weight, grad if compute_grad else None,
                            ignore_index, reduction, label_smoothing, z_loss, softcap,
                            divisor, divisor_value, lse_out=lse,
                            loss_dtype=torch.float32 if loss_fp32 else None)
    return loss, grad, lse[0]


@cross_entropy_fwd_lse.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      compute_grad, divisor=None, divisor_value=None, loss_fp32=False):
    prob = target.is_floating_point()
    shape = ce._loss_shape(input, prob, target) if reduction == "none" else []
    loss = input.new_empty(shape, dtype=torch.float32 if loss_fp32 else input.dtype)
    grad = torch.empty_like(input) if compute_grad else input.new_empty(0)
    lse = input.new_empty((_n_rows(input, target),), dtype=acc_dtype(input.dtype))
    return loss, grad, lse


@torch.library.custom_op("fusedgrad::cross_entropy_target_grad", mutates_args=())
def cross_entropy_target_grad(input: Tensor, target: Tensor, lse: Tensor, weight: Tensor | None,
                              coef: Tensor, softcap: float | None) -> Tensor:
    """dL/dtarget (target's shape and dtype, contiguous) from the logits and saved lse."""
    out = _alloc.empty(target.shape, dtype=target.dtype, device=target.device)
    if weight is not None:
        weight = weight.to(lse.dtype).contiguous()
    with device_guard(input):
        launch_target_grad(input, lse, weight, coef.to(lse.dtype).contiguous(), out, softcap)
    return out


@cross_entropy_target_grad.register_fake
def _(input, target, lse, weight, coef, softcap):
    return target.new_empty(target.shape)


def _setup_context(ctx, inputs, output):
    (input, target, weight, _ii, reduction, label_smoothing, _zl, softcap, _cg, divisor,
     divisor_value, _fp32) = inputs
    _, grad, lse = output
    ctx.mark_non_differentiable(grad, lse)
    ctx.reduction = reduction
    ctx.keep = 1.0 - label_smoothing
    ctx.softcap = softcap
    ctx.divisor_value = divisor_value
    ctx.has_divisor = divisor is not None
    ctx.applied_grad_output = None
    ctx.save_for_backward(input, target, weight, grad, lse, divisor)


def _input_grad(ctx, grad: Tensor, grad_output: Tensor) -> Tensor:
    """The saved input gradient times grad_output, in place the first time (free where
    grad_output is 1), as ops/cross_entropy.py's _scaled_grad does."""
    grad_output = grad_output.to(grad.dtype)
    if ctx.applied_grad_output is None:
        ctx.applied_grad_output = grad_output
        if type(grad) is torch.Tensor:
            ce._rescale_in_place(grad, grad_output)
        else:  # traced: the op, so functionalization sees the mutation
            torch.ops.fusedgrad.cross_entropy_bwd_(grad, grad_output)
        return grad
    ratio = grad_output / ctx.applied_grad_output  # a further backward (retained graph)
    if ratio.dim() > 0 and grad.dim() > 1:
        ratio = ratio.unsqueeze(1)
    return grad * ratio


def _backward(ctx, grad_loss, _grad_grad, _grad_lse):
    none = (None,) * 12
    if grad_loss is None:
        return none
    input, target, weight, grad, lse, divisor = ctx.saved_tensors
    grad_input = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_input = _input_grad(ctx, grad, grad_loss)
    if ctx.needs_input_grad[1] and target.is_floating_point():
        # One coefficient per row (or one for all): -(1 - eps) * grad_output / divisor.
        coef = grad_loss.to(lse.dtype) * -ctx.keep
        if ctx.reduction == "mean":
            coef = coef / lse.shape[0]
        elif ctx.has_divisor:
            coef = coef / divisor.to(lse.dtype)
        elif ctx.divisor_value is not None:
            coef = coef / ctx.divisor_value
        coef = coef.reshape(-1) if coef.dim() > 0 else coef
        grad_target = torch.ops.fusedgrad.cross_entropy_target_grad(
            input, target, lse, weight, coef, ctx.softcap)
    return (grad_input, grad_target) + none[2:]


cross_entropy_fwd_lse.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy_with_target_grad(input, target, weight, ignore_index, reduction,
                                   label_smoothing, z_loss, softcap, divisor, divisor_value,
                                   process_group) -> Tensor:
    """fg.cross_entropy when a probability ``target`` requires grad or under autocast
    (arguments checked)."""
    if process_group is not None:
        raise ValueError("fusedgrad.cross_entropy: gradients with respect to a probability "
                         "`target` are not supported with process_group (vocab-parallel); "
                         "pass target.detach()")
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    loss_fp32 = (input.dtype in (torch.float16, torch.bfloat16)
                 and torch.is_autocast_enabled(input.device.type))
    # The op runs without autocast: it must not cast the logits (that copy is what this
    # path avoids); its loss is float32 by loss_fp32.
    with torch.autocast(input.device.type, enabled=False):
        loss, _, _ = torch.ops.fusedgrad.cross_entropy_fwd_lse(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
            needs_grad, divisor, divisor_value, loss_fp32)
    return loss
