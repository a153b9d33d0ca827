"""Gradient of softmax cross-entropy with respect to probability targets.

Only launched when a probability target requires grad (rare: distillation through a
teacher's soft labels, torch's OpInfo samples); the fused forward kernel never pays for it.
For one row of C logits z (after the optional soft-cap) with log-sum-exp ``lse`` saved by
the forward, class weights w (1 without) and label smoothing eps (y' = (1-eps) y + eps/C),
torch's loss is -sum_c w_c y'_c log p_c, so

    dloss/dy_c = -(1-eps) w_c (z_c - lse)

times the reduction's factor and grad_output; the launcher folds all three into one
per-row coefficient ``coef`` = -(1-eps) * grad_output_row / divisor. z_loss adds
z_loss * lse^2, which does not depend on y. One read of the logits, one write of dy.
"""

import triton
import triton.language as tl

from ._compat import mask_if
from .cross_entropy import _tanh


@triton.jit(do_not_specialize=["has_weight", "has_softcap", "coef_stride"])
def ce_target_grad_kernel(
    logits_ptr, lse_ptr, weight_ptr, coef_ptr, out_ptr,
    n_classes, n_inner,
    l_stride_o, l_stride_i, l_stride_c, o_stride_o, o_stride_i, o_stride_c, coef_stride,
    sc_hi, sc_lo, has_weight, has_softcap,
    BLOCK_V: tl.constexpr,
):
    """Grid (n_rows, cdiv(n_classes, BLOCK_V)); row r = outer * n_inner + inner.

    logits_ptr  (n_outer, n_inner, n_classes), strides l_stride_o/_i/_c: the logits.
    lse_ptr     (n_rows,) acc dtype: the forward's per-row log-sum-exp of the capped logits.
    weight_ptr  (n_classes,) acc dtype, contiguous; read only when has_weight != 0.
    coef_ptr    acc dtype, element r at r * coef_stride (coef_stride 0: one shared value).
    out_ptr     (n_outer, n_inner, n_classes), strides o_stride_o/_i/_c: dloss/dtarget,
                in its own dtype.
    sc_hi, sc_lo: the soft-cap as an fp32 pair (used when has_softcap != 0).
    Arithmetic in the dtype of lse (fp32, or fp64 for fp64 logits). BLOCK_V: classes per
    program.
    Offsets are int64 throughout (row and column products may pass 2^31).
    """
    row = tl.program_id(0)
    outer = (row // n_inner).to(tl.int64)
    inner = (row % n_inner).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < n_classes
    acc_ty = lse_ptr.dtype.element_ty
    z = tl.load(logits_ptr + outer * l_stride_o + inner * l_stride_i + cols * l_stride_c,
                mask=mask, other=0.0).to(acc_ty)
    if has_softcap != 0:
        softcap = tl.cast(sc_hi, acc_ty) + tl.cast(sc_lo, acc_ty)
        z = softcap * _tanh(z / softcap)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row.to(tl.int64) * coef_stride)
    w = tl.load(weight_ptr + cols, mask=mask_if(mask, has_weight), other=1.0).to(acc_ty)
    dy = coef * w * (z - lse)
    tl.store(out_ptr + outer * o_stride_o + inner * o_stride_i + cols * o_stride_c,
             dy.to(out_ptr.dtype.element_ty), mask=mask)
