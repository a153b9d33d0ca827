"""Launchers of the kernels around the fused cross-entropy kernel (kernels/ce_prep.py):
the prep kernel (divisor, gradient scale, weight sum, class-index range check) and the
finishing reduction."""

from __future__ import annotations

import torch

from ._launch_record import Launch, make_launch, watch
from ._runtime import FP_FUSION
from .kernels import ce_prep as prep_kernels
from .kernels.ce_prep import (  # noqa: F401  (re-exported for ops/cross_entropy.py)
    DIVISOR_DEVICE,
    DIVISOR_HOST,
    DIVISOR_N_ROWS,
    DIVISOR_ONE,
    DIVISOR_VALID_ROWS,
    REDUCE_SLOTS,
    SLOT_N_BAD,
)

# Rows (or classes) per step of the one-program loops: 1024 int64 targets is 8 KB per
# step, enough loads in flight for one SM; 4 warps give 8 values per thread.
PREP_BLOCK = 1024
PREP_NUM_WARPS = 4
FINISH_BLOCK = 1024
FINISH_NUM_WARPS = 4


def plan_prep(*, n_rows: int, n_inner: int, n_classes: int, target_strides: tuple[int, int],
              weight_stride: int | None, ignore_index: int, divisor_hi: float,
              divisor_lo: float, class_target: bool, weight_sum: bool, divisor_mode: int,
              is_fp64: bool) -> Launch:
    """The prep kernel's launch; its tensors: target, weight (or reduce_buf), divisor (or
    reduce_buf), reduce_buf. weight_stride None: no class weights."""
    has_weight = weight_stride is not None
    tensors = ("target", "weight", "divisor", "reduce_buf")
    return make_launch(prep_kernels.ce_prep_kernel, (1,), tensors, (
        n_rows, n_inner, n_classes, target_strides[0], target_strides[1],
        weight_stride if has_weight else 0, ignore_index, divisor_hi, divisor_lo,
    ), dict(
        CLASS_TARGET=class_target, HAS_WEIGHT=has_weight, WEIGHT_SUM=weight_sum,
        DIVISOR_MODE=divisor_mode, IS_FP64=is_fp64, BLOCK=PREP_BLOCK, num_warps=PREP_NUM_WARPS,
        enable_fp_fusion=FP_FUSION,
    ))


def launch_prep(target_rows, weight, divisor, reduce_buf, *, n_rows: int, n_inner: int,
                n_classes: int, target_strides: tuple[int, int], ignore_index: int,
                divisor_hi: float, divisor_lo: float, class_target: bool, weight_sum: bool,
                divisor_mode: int) -> None:
    """Fill reduce_buf (REDUCE_SLOTS,) = [scale, W, divisor, n_bad] (see the kernel).

    target_rows: class indices (any integer dtype), addressed with target_strides as
    (outer, inner); any tensor when not class_target. weight: (n_classes,) or None.
    divisor: 0-dim device tensor (DIVISOR_DEVICE) or None.
    """
    launch = plan_prep(
        n_rows=n_rows, n_inner=n_inner, n_classes=n_classes, target_strides=target_strides,
        weight_stride=weight.stride(0) if weight is not None else None,
        ignore_index=ignore_index, divisor_hi=divisor_hi, divisor_lo=divisor_lo,
        class_target=class_target, weight_sum=weight_sum, divisor_mode=divisor_mode,
        is_fp64=reduce_buf.dtype == torch.float64)
    launch(target_rows, weight if weight is not None else reduce_buf,
           divisor if divisor is not None else reduce_buf, reduce_buf)


def plan_finish(n_rows: int) -> Launch:
    """The finishing reduction's launch; its tensors: loss_rows, reduce_buf, out."""
    return make_launch(prep_kernels.ce_finish_kernel, (1,), ("loss_rows", "reduce_buf", "out"),
                       (n_rows,), dict(BLOCK=FINISH_BLOCK, num_warps=FINISH_NUM_WARPS,
                                       enable_fp_fusion=FP_FUSION))


def launch_finish(loss_rows, reduce_buf, out, n_rows: int) -> None:
    """out (0-dim, any float dtype) = sum(loss_rows) / reduce_buf's divisor."""
    plan_finish(n_rows)(loss_rows, reduce_buf, out)


def plan_host_kernels(n_rows: int, reduction: str) -> list[tuple[str, tuple, dict]]:
    """[(kernel name, grid, constexprs)] this module launches for one call, in order: the
    prep kernel always, the finishing reduction unless reduction="none" (bench plan)."""
    kernels = [("ce_prep_kernel", (1,), {"BLOCK": PREP_BLOCK, "num_warps": PREP_NUM_WARPS})]
    if reduction != "none":
        kernels.append(("ce_finish_kernel", (1,),
                        {"BLOCK": FINISH_BLOCK, "num_warps": FINISH_NUM_WARPS}))
    return kernels


# The plans of ops/cross_entropy.py read the constants above: setting one drops them.
watch(__name__)
