"""The two small kernels around the fused cross-entropy kernel.

A call of ``fusedgrad.cross_entropy`` is, in the common case, exactly three launches:

    ce_prep_kernel    -> reduce = [scale, W, divisor, n_bad]   (1 program)
    fused kernel      -> per-row loss, gradient already multiplied by scale
    ce_finish_kernel  -> loss = sum(per-row loss) / divisor    (1 program; mean/sum only)

Everything the fused kernel needs from all rows before it can write a gradient is
folded into the prep kernel, computed on the device from the targets, so the host
never waits for the device:

    divisor = sum over non-ignored rows of w_t       (reduction="mean", class targets;
                                                      w_t = 1 without class weights)
            = n_rows                                 (mean, probability targets)
            = the caller's divisor                   (reduction="sum" with divisor=)
            = 1                                      (otherwise)
    scale   = 1 / divisor                            (inf for a mean over 0 rows: the fused
                                                      kernel writes ignored rows as 0)
    W       = sum_c w_c (only read with label smoothing; n_classes without weights)
    n_bad   = number of class indices outside [0, C) that are not ignore_index

A bad class index fails a device-side assert (like torch's own kernels; compiled with
``debug=True`` so the assert is kept) and its row's loss and gradient are NaN. Under
Triton's interpreter device asserts are no-ops, so the host reads ``n_bad`` (CPU tensors:
no synchronisation) and raises.

All sums run in one program in a fixed order: results are bitwise reproducible.
"""

import triton
import triton.language as tl

# DIVISOR_MODE values (constexpr of ce_prep_kernel).
DIVISOR_ONE = 0          # reduction "none", or "sum" without divisor=
DIVISOR_VALID_ROWS = 1   # "mean" with class targets: (weighted) count of non-ignored rows
DIVISOR_N_ROWS = 2       # "mean" with probability targets
DIVISOR_HOST = 3         # "sum" with a Python-number divisor (divisor_hi + divisor_lo)
DIVISOR_DEVICE = 4       # "sum" with a 0-dim tensor divisor (divisor_ptr)

# The same values inside kernels (a @triton.jit function may read globals only as constexpr).
_VALID_ROWS = tl.constexpr(DIVISOR_VALID_ROWS)
_N_ROWS = tl.constexpr(DIVISOR_N_ROWS)
_HOST = tl.constexpr(DIVISOR_HOST)
_DEVICE = tl.constexpr(DIVISOR_DEVICE)

# Slots of the reduce buffer (the fused kernel reads slots 0 and 1).
SLOT_SCALE, SLOT_WEIGHT_SUM, SLOT_DIVISOR, SLOT_N_BAD = 0, 1, 2, 3
REDUCE_SLOTS = 4


@triton.jit(debug=True, do_not_specialize=["n_rows", "n_inner", "n_classes", "ignore_index",
                                           "target_stride_outer", "target_stride_inner",
                                           "weight_stride"])
def ce_prep_kernel(
    # data pointers
    target_ptr, weight_ptr, divisor_ptr, reduce_ptr,
    # sizes
    n_rows, n_inner, n_classes,
    # strides (elements)
    target_stride_outer, target_stride_inner, weight_stride,
    # host scalars
    ignore_index, divisor_hi, divisor_lo,
    # compile-time choices
    CLASS_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, WEIGHT_SUM: tl.constexpr,
    DIVISOR_MODE: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """The per-call scalars of a cross-entropy call, one program.

    Pointers:
      target_ptr   class indices (n_outer, n_inner) of any integer dtype with strides
                   target_stride_{outer,inner}; read only if CLASS_TARGET (rows
                   r = outer * n_inner + inner, n_rows = n_outer * n_inner).
      weight_ptr   (n_classes,) class weights of any float dtype, stride weight_stride;
                   read only if HAS_WEIGHT.
      divisor_ptr  0-dim divisor of any real dtype; read only if DIVISOR_MODE == _DEVICE.
      reduce_ptr   (4,) fp32 (fp64 if IS_FP64), written: [scale, W, divisor, n_bad].
    Scalars: ignore_index; divisor_hi + divisor_lo (an fp32 pair: the host divisor in
      DIVISOR_HOST mode, ~48 exact bits for fp64).
    Constexprs: CLASS_TARGET (range check and the valid-row divisor), HAS_WEIGHT,
      WEIGHT_SUM (compute W = sum of weights: only label smoothing reads it; else
      W = n_classes), DIVISOR_MODE (see the module constants), IS_FP64, BLOCK (chunk).
    Bytes: one read of the targets (class targets), of the weights if WEIGHT_SUM, and
      n_rows weights gathered for a weighted mean; 4 scalars written.
    """
    if IS_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    offs = tl.arange(0, BLOCK)

    weight_sum = tl.cast(n_classes, acc_ty)
    if WEIGHT_SUM:
        w_acc = tl.zeros([BLOCK], acc_ty)
        for start in range(0, n_classes, BLOCK):
            cols = start + offs
            w = tl.load(weight_ptr + cols.to(tl.int64) * weight_stride, mask=cols < n_classes,
                        other=0.0)
            w_acc += w.to(acc_ty)
        weight_sum = tl.sum(w_acc, axis=0)

    n_bad = tl.zeros((), tl.int32)
    valid_sum = tl.zeros((), acc_ty)
    if CLASS_TARGET:
        bad_acc = tl.zeros([BLOCK], tl.int32)
        valid_acc = tl.zeros([BLOCK], acc_ty)
        for start in range(0, n_rows, BLOCK):
            rows = start + offs
            row_mask = rows < n_rows
            outer = (rows // n_inner).to(tl.int64)
            inner = (rows % n_inner).to(tl.int64)
            t = tl.load(target_ptr + outer * target_stride_outer + inner * target_stride_inner,
                        mask=row_mask, other=0).to(tl.int64)
            counted = row_mask & (t != ignore_index)
            in_range = (t >= 0) & (t < n_classes)
            bad_acc += (counted & ~in_range).to(tl.int32)
            if DIVISOR_MODE == _VALID_ROWS:
                if HAS_WEIGHT:
                    # A bad index is never an address: it reads class 0 (its row is NaN).
                    safe = tl.where(in_range, t, 0)
                    w_t = tl.load(weight_ptr + safe * weight_stride, mask=counted, other=0.0)
                    valid_acc += w_t.to(acc_ty)
                else:
                    valid_acc += counted.to(acc_ty)
        n_bad = tl.sum(bad_acc, axis=0)
        valid_sum = tl.sum(valid_acc, axis=0)
        tl.device_assert(n_bad == 0, "fusedgrad.cross_entropy: target out of bounds")

    if DIVISOR_MODE == _VALID_ROWS:
        divisor = valid_sum
    elif DIVISOR_MODE == _N_ROWS:
        divisor = tl.cast(n_rows, acc_ty)
    elif DIVISOR_MODE == _HOST:
        divisor = tl.cast(divisor_hi, acc_ty) + tl.cast(divisor_lo, acc_ty)
    elif DIVISOR_MODE == _DEVICE:
        divisor = tl.load(divisor_ptr).to(acc_ty)
    else:
        divisor = tl.full((), 1.0, acc_ty)
    tl.store(reduce_ptr + 0, 1.0 / divisor)
    tl.store(reduce_ptr + 1, weight_sum)
    tl.store(reduce_ptr + 2, divisor)
    tl.store(reduce_ptr + 3, n_bad.to(acc_ty))


@triton.jit(do_not_specialize=["n_rows"])
def ce_finish_kernel(
    loss_rows_ptr, reduce_ptr, out_ptr,
    n_rows,
    BLOCK: tl.constexpr,
):
    """out = sum(loss_rows) / divisor, one program, in a fixed order.

      loss_rows_ptr  (n_rows,) fp32/fp64 per-row losses, contiguous.
      reduce_ptr     (4,) the prep kernel's [scale, W, divisor, n_bad]; reads divisor.
      out_ptr        0-dim, the input's dtype: the reduced loss, rounded once.
    Constexpr: BLOCK (chunk of rows summed per step).
    Bytes: one read of the per-row losses.
    """
    acc_ty = loss_rows_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, n_rows, BLOCK):
        rows = start + offs
        acc += tl.load(loss_rows_ptr + rows, mask=rows < n_rows, other=0.0)
    total = tl.sum(acc, axis=0)
    divisor = tl.load(reduce_ptr + 2)
    tl.store(out_ptr, (total / divisor).to(out_ptr.dtype.element_ty))
