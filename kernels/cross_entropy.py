"""Softmax cross-entropy: loss and gradient in one pass over the logits.

Notation for one row (one sample, or one spatial position of a sample) of C
logits z (after the optional soft-cap z <- c*tanh(z/c)):

    lse = log sum_c exp(z_c),   p_c = exp(z_c - lse)

Class-index target t with class weights w (w = 1 without weights), label
smoothing eps and W = sum_c w_c (torch's formula):

    loss = (1-eps) w_t (lse - z_t) + eps/C (W lse - sum_c w_c z_c) + z_loss lse^2
    dloss/dz_c = A p_c - B_c
        A   = (1-eps) w_t + eps/C W + 2 z_loss lse
        B_c = (1-eps) w_t [c == t] + eps/C w_c

Probability targets y (y' = (1-eps) y + eps/C):

    loss = (sum_c w_c y'_c) lse - sum_c w_c y'_c z_c + z_loss lse^2
    dloss/dz_c = A p_c - w_c y'_c,   A = sum_c w_c y'_c + 2 z_loss lse

The soft-cap multiplies the gradient by 1 - tanh^2 = 1 - (z_capped / c)^2.
The gradient is written already multiplied by the reduction's scale (1/divisor
for a mean, read from device memory), so a backward with grad_output == 1 has
nothing left to do.

All arithmetic is in fp32 (fp64 for fp64 logits); values are rounded once, at
the store. Rows are addressed as (outer, inner) so that (N, C, d1..dk) logits,
whose class axis is strided, are read in place: row r = outer * n_inner + inner.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from exp: exact enough near 0 (odd Taylor series) and saturating for large |x|."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
    t = tl.where(ax < 0.0625, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _row_coords(n_inner):
    """(row, outer, inner) of this program's row, int64 for address arithmetic.

    n_rows < 2^31 (the grid limit), so the division runs in 32 bits (a 64-bit
    division is a slow subroutine call on the GPU)."""
    row = tl.program_id(0)
    outer = (row // n_inner).to(tl.int64)
    inner = (row % n_inner).to(tl.int64)
    return row.to(tl.int64), outer, inner


@triton.jit
def _scalar(hi, lo, IS_FP64: tl.constexpr):
    """A host float passed as an fp32 pair hi + lo, in the accumulation dtype."""
    if IS_FP64:
        value = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        value = tl.cast(hi, tl.float32) + tl.cast(lo, tl.float32)
    return value


@triton.jit
def _load_logits(row_ptr, cols, mask, class_stride, softcap, has_softcap, IS_FP64: tl.constexpr):
    """Load one chunk of a row, upcast, soft-cap; padded lanes are -inf (after the cap)."""
    z = tl.load(row_ptr + cols * class_stride, mask=mask, other=0.0)
    if IS_FP64:
        z = z.to(tl.float64)
    else:
        z = z.to(tl.float32)
    if has_softcap != 0:
        z = softcap * _tanh(z / softcap)
    return tl.where(mask, z, -float("inf"))


@triton.jit
def _load_weights(weight_ptr, cols, mask, has_weight, IS_FP64: tl.constexpr):
    """Class weights of one chunk (1 without weights, 0 on padding); no load without weights."""
    w = tl.load(weight_ptr + cols, mask=mask & (has_weight != 0), other=1.0)
    if IS_FP64:
        w = w.to(tl.float64)
    else:
        w = w.to(tl.float32)
    return tl.where(mask, w, 0.0)


@triton.jit
def _load_target_probs(row_ptr, cols, mask, class_stride, keep, add, IS_FP64: tl.constexpr):
    """y * keep + add on valid lanes, 0 on padding (y' = (1-eps) y + eps/C)."""
    y = tl.load(row_ptr + cols * class_stride, mask=mask, other=0.0)
    if IS_FP64:
        y = y.to(tl.float64)
    else:
        y = y.to(tl.float32)
    return tl.where(mask, y * keep + add, 0.0)


@triton.jit
def _grad_chunk(z, mask, cols, lse, coef_a, coef_t, coef_smooth, target_col, w, y, scale, softcap,
                has_softcap, PROB_TARGET: tl.constexpr):
    """scale * (A p - B) * dcap for one chunk, in the accumulation dtype."""
    p = tl.exp(z - lse)
    if PROB_TARGET:
        g = coef_a * p - w * y
    else:
        # Without smoothing the w_c term is exactly absent (an inf weight must not give
        # 0 * inf = NaN, as torch's plain NLL path shows).
        g = coef_a * p - tl.where(coef_smooth != 0, coef_smooth * w, 0.0) \
            - tl.where(cols == target_col, coef_t, 0.0)
    if has_softcap != 0:
        zc = z / softcap
        g = g * (1.0 - zc * zc)
    g = g * scale
    return tl.where(mask, g, 0.0)


@triton.jit(do_not_specialize=["has_weight", "has_softcap", "write_grad", "ignore_index"])
def cross_entropy_fwd_bwd_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, reduce_ptr,
    n_classes, n_inner,
    logit_stride_outer, logit_stride_inner, logit_stride_class,
    grad_stride_outer, grad_stride_inner, grad_stride_class,
    target_stride_outer, target_stride_inner, target_stride_class,
    ignore_index, smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo,
    has_weight, has_softcap, write_grad,
    PROB_TARGET: tl.constexpr, IS_FP64: tl.constexpr, LARGE_OFFSETS: tl.constexpr,
    BLOCK_V: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """Per-row loss, logsumexp and (optionally) the gradient, one program per row.

    Pointers (n_rows = n_outer * n_inner rows of n_classes logits):
      logits_ptr  (n_outer, n_inner, n_classes) any float dtype, strides
                  logit_stride_{outer,inner,class} in elements.
      grad_ptr    same logical shape and the logits' dtype, strides grad_stride_*;
                  may alias logits_ptr (in-place backward). Unused unless write_grad.
      target_ptr  class indices (n_outer, n_inner), any integer dtype, strides
                  target_stride_{outer,inner}; or, if PROB_TARGET, probabilities
                  (n_outer, n_inner, n_classes) with target_stride_{outer,inner,class}.
      weight_ptr  (n_classes,) contiguous, fp32 (fp64 if IS_FP64); never read unless
                  has_weight (then any valid pointer of that dtype may be passed).
      loss_ptr    (n_rows,) fp32/fp64: per-row loss (0 for ignored rows, NaN for a
                  class index outside [0, n_classes)).
      lse_ptr     (n_rows,) fp32/fp64: per-row logsumexp of the (capped) logits.
      reduce_ptr  (2,) fp32/fp64, computed on the device: [scale folded into the
                  gradient (1/divisor of a mean, else 1), W = sum of the class weights].
    Scalars: ignore_index; label smoothing eps, z_loss and softcap c (used if
      has_softcap), each passed as an fp32 pair hi + lo so fp64 rows get ~48-bit
      exact values (Triton passes Python floats as fp32; lo is 0 for fp32 math).
    Runtime flags (0/1, not specialised, so they do not multiply compilations):
      has_weight; has_softcap; write_grad (0 for forward-only calls).
    Constexprs: PROB_TARGET, IS_FP64 (compute in fp64), LARGE_OFFSETS (class offsets
      need int64: the class stride times n_classes can pass 2^31),
      BLOCK_V (chunk width, power of 2),
      SINGLE_BLOCK (BLOCK_V >= n_classes: the row stays in registers).

    Bytes per logit (b = element size): SINGLE_BLOCK: 1 read + 1 write (2b), or
    1 read (b) without write_grad; otherwise 2 reads + 1 write (3b): one online
    logsumexp pass, one gradient pass. Probability targets add 1 read of y per
    logit per pass. Per row: a few scalars.
    """
    row, outer, inner = _row_coords(n_inner)
    row_logits = logits_ptr + outer * logit_stride_outer + inner * logit_stride_inner
    row_grad = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner
    row_target = target_ptr + outer * target_stride_outer + inner * target_stride_inner
    if IS_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    label_smoothing = _scalar(smoothing_hi, smoothing_lo, IS_FP64)
    z_loss = _scalar(z_loss_hi, z_loss_lo, IS_FP64)
    softcap = _scalar(softcap_hi, softcap_lo, IS_FP64)
    weight_total = tl.load(reduce_ptr + 1).to(acc_ty)

    # Class-index target: validity, its weight and its (capped) logit, by scalar loads.
    # A target outside [0, n_classes) is never used as an address.
    if PROB_TARGET:
        target_col = 0
        safe_col = 0
    else:
        target_col = tl.load(row_target).to(tl.int64)
        ignored = target_col == ignore_index
        in_range = (target_col >= 0) & (target_col < n_classes)
        safe_col = tl.where(in_range, target_col, 0)

    cols = tl.arange(0, BLOCK_V)
    if LARGE_OFFSETS:
        cols = cols.to(tl.int64)
    if SINGLE_BLOCK:
        mask = cols < n_classes
        z = _load_logits(row_logits, cols, mask, logit_stride_class, softcap, has_softcap, IS_FP64)
        w = _load_weights(weight_ptr, cols, mask, has_weight, IS_FP64)
        m = tl.max(z, axis=0)
        lse = m + tl.log(tl.sum(tl.exp(z - m), axis=0))
        if PROB_TARGET:
            y = _load_target_probs(row_target, cols, mask, target_stride_class,
                                   1.0 - label_smoothing, label_smoothing / n_classes, IS_FP64)
            wy_sum = tl.sum(w * y, axis=0)
            wyz_sum = tl.sum(tl.where(mask, w * y * z, 0.0), axis=0)
        else:
            y = w  # unused
            wz_sum = tl.sum(tl.where(mask, w * z, 0.0), axis=0)
            z_t = tl.sum(tl.where(cols == safe_col, z, 0.0), axis=0)
    else:
        # Pass 1: online logsumexp (and the smoothing / probability-target sums).
        m = tl.full((), -float("inf"), acc_ty)
        s = tl.zeros((), acc_ty)
        acc1 = tl.zeros((), acc_ty)
        acc2 = tl.zeros((), acc_ty)
        for start in range(0, n_classes, BLOCK_V):
            c = start + cols
            mask = c < n_classes
            z = _load_logits(row_logits, c, mask, logit_stride_class, softcap, has_softcap,
                             IS_FP64)
            w = _load_weights(weight_ptr, c, mask, has_weight, IS_FP64)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if PROB_TARGET:
                y = _load_target_probs(row_target, c, mask, target_stride_class,
                                       1.0 - label_smoothing, label_smoothing / n_classes,
                                       IS_FP64)
                acc1 += tl.sum(w * y, axis=0)
                acc2 += tl.sum(tl.where(mask, w * y * z, 0.0), axis=0)
            else:
                acc1 += tl.sum(tl.where(mask, w * z, 0.0), axis=0)
        lse = m + tl.log(s)
        if PROB_TARGET:
            wy_sum = acc1
            wyz_sum = acc2
        else:
            wz_sum = acc1
            z_t = _load_logits(row_logits, safe_col, in_range, logit_stride_class, softcap,
                               has_softcap, IS_FP64)

    # Per-row loss and gradient coefficients.
    if PROB_TARGET:
        loss = wy_sum * lse - wyz_sum + z_loss * lse * lse
        coef_a = wy_sum + 2.0 * z_loss * lse
        coef_t = 0.0
        coef_smooth = 0.0
    else:
        w_t = tl.load(weight_ptr + safe_col, mask=in_range & (has_weight != 0), other=1.0)
        w_t = w_t.to(acc_ty)
        eps_c = label_smoothing / n_classes
        coef_t = (1.0 - label_smoothing) * w_t
        coef_smooth = eps_c
        # The smoothing terms only when eps != 0: with eps == 0 torch computes plain NLL, so
        # a -inf logit (masked vocabulary) or an inf weight must not turn 0 * inf into NaN.
        smooth = tl.where(eps_c != 0, eps_c * (weight_total * lse - wz_sum), 0.0)
        loss = coef_t * (lse - z_t) + smooth + z_loss * lse * lse
        coef_a = coef_t + tl.where(eps_c != 0, eps_c * weight_total, 0.0) + 2.0 * z_loss * lse
        loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    if write_grad != 0:
        scale = tl.load(reduce_ptr).to(acc_ty)
        if not PROB_TARGET:
            # Ignored rows get an exact 0 (not 0 * scale, which is NaN when the mean's
            # divisor is 0); rows with a bad target get NaN.
            scale = tl.where(ignored, 0.0, tl.where(in_range, scale, float("nan")))
        out_ty = grad_ptr.dtype.element_ty
        if SINGLE_BLOCK:
            # Reload the (cached, C-element) weights rather than keep them live across
            # the reductions: registers go to the row of logits.
            w = _load_weights(weight_ptr, cols, mask, has_weight, IS_FP64)
            g = _grad_chunk(z, mask, cols, lse, coef_a, coef_t, coef_smooth, target_col, w, y,
                            scale, softcap, has_softcap, PROB_TARGET)
            tl.store(row_grad + cols * grad_stride_class, g.to(out_ty), mask=mask)
        else:
            # Pass 2: re-read the row and write the gradient.
            for start in range(0, n_classes, BLOCK_V):
                c = start + cols
                mask = c < n_classes
                z = _load_logits(row_logits, c, mask, logit_stride_class, softcap, has_softcap,
                                 IS_FP64)
                w = _load_weights(weight_ptr, c, mask, has_weight, IS_FP64)
                if PROB_TARGET:
                    y = _load_target_probs(row_target, c, mask, target_stride_class,
                                           1.0 - label_smoothing, label_smoothing / n_classes,
                                           IS_FP64)
                else:
                    y = w
                g = _grad_chunk(z, mask, c, lse, coef_a, coef_t, coef_smooth, target_col, w, y,
                                scale, softcap, has_softcap, PROB_TARGET)
                tl.store(row_grad + c * grad_stride_class, g.to(out_ty), mask=mask)


@triton.jit
def scale_grad_kernel(
    grad_ptr, grad_output_ptr,
    n_classes, n_inner,
    grad_stride_outer, grad_stride_inner, grad_stride_class,
    go_stride_outer, go_stride_inner,
    PER_ROW: tl.constexpr, IS_FP64: tl.constexpr, LARGE_OFFSETS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Backward: grad *= grad_output in place; nothing is read or written where it is 1.

    Grid (n_rows, cdiv(n_classes, BLOCK_V)); program (row, chunk) scales BLOCK_V classes.
      grad_ptr         (n_outer, n_inner, n_classes), strides grad_stride_*; any float dtype.
      grad_output_ptr  scalar (PER_ROW=False) or (n_outer, n_inner) with strides
                       go_stride_{outer,inner} (0 for an expanded grad_output).
    Constexprs: PER_ROW (reduction='none'), IS_FP64 (multiply in fp64, else fp32),
      LARGE_OFFSETS (int64 class offsets), BLOCK_V (chunk width, power of 2).
    Bytes per element: 0 when grad_output == 1 (one scalar read per program),
    otherwise 1 read + 1 write.
    """
    _, outer, inner = _row_coords(n_inner)
    chunk = tl.program_id(1)
    if PER_ROW:
        g_out = tl.load(grad_output_ptr + outer * go_stride_outer + inner * go_stride_inner)
    else:
        g_out = tl.load(grad_output_ptr)
    if IS_FP64:
        g_out = g_out.to(tl.float64)
    else:
        g_out = g_out.to(tl.float32)
    if g_out != 1.0:
        cols = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
        if LARGE_OFFSETS:
            cols = cols.to(tl.int64)
        mask = cols < n_classes
        ptrs = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner \
            + cols * grad_stride_class
        g = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (g.to(g_out.dtype) * g_out).to(g.dtype), mask=mask)


# ------------------------------------------------------------------ vocab-parallel pieces
# With the vocabulary split over ranks, each rank runs the statistics kernel over its
# slice (1 read), the ranks exchange O(rows) numbers, and each rank runs the gradient
# kernel with the global per-row coefficients (1 read + 1 write).


@triton.jit(do_not_specialize=["has_weight", "has_softcap"])
def cross_entropy_shard_stats_kernel(
    logits_ptr, target_ptr, weight_ptr, stats_ptr,
    n_classes, n_inner,
    logit_stride_outer, logit_stride_inner, logit_stride_class,
    target_stride_outer, target_stride_inner, target_stride_class,
    softcap_hi, softcap_lo, has_weight, has_softcap,
    PROB_TARGET: tl.constexpr, IS_FP64: tl.constexpr, LARGE_OFFSETS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per-row statistics of this rank's slice of the vocabulary, one program per row.

    Pointers (n_rows = n_outer * n_inner rows of this shard's n_classes logits):
      logits_ptr  (n_outer, n_inner, n_classes), strides logit_stride_*.
      target_ptr  only if PROB_TARGET: probabilities of this slice, strides target_stride_*.
      weight_ptr  (n_classes,) this slice's class weights (fp32/fp64); read if has_weight.
      stats_ptr   (n_rows, 6) fp32/fp64, contiguous, written:
                  [max z, sum exp(z - max), sum w z, sum w, sum w y, sum w y z]
                  (the last two are 0 without PROB_TARGET).
    Scalars: softcap as an fp32 hi + lo pair; has_weight, has_softcap runtime flags.
    Constexprs: PROB_TARGET, IS_FP64, LARGE_OFFSETS (int64 class offsets), BLOCK_V.
    Bytes per logit: 1 read (plus 1 read of y with probability targets).
    """
    row, outer, inner = _row_coords(n_inner)
    row_logits = logits_ptr + outer * logit_stride_outer + inner * logit_stride_inner
    row_target = target_ptr + outer * target_stride_outer + inner * target_stride_inner
    if IS_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    softcap = _scalar(softcap_hi, softcap_lo, IS_FP64)
    cols = tl.arange(0, BLOCK_V)
    if LARGE_OFFSETS:
        cols = cols.to(tl.int64)
    m = tl.full((), -float("inf"), acc_ty)
    s = tl.zeros((), acc_ty)
    wz = tl.zeros((), acc_ty)
    w_sum = tl.zeros((), acc_ty)
    wy = tl.zeros((), acc_ty)
    wyz = tl.zeros((), acc_ty)
    for start in range(0, n_classes, BLOCK_V):
        c = start + cols
        mask = c < n_classes
        z = _load_logits(row_logits, c, mask, logit_stride_class, softcap, has_softcap, IS_FP64)
        w = _load_weights(weight_ptr, c, mask, has_weight, IS_FP64)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        wz += tl.sum(tl.where(mask, w * z, 0.0), axis=0)
        w_sum += tl.sum(w, axis=0)
        if PROB_TARGET:
            y = _load_target_probs(row_target, c, mask, target_stride_class, 1.0, 0.0, IS_FP64)
            wy += tl.sum(w * y, axis=0)
            wyz += tl.sum(tl.where(mask, w * y * z, 0.0), axis=0)
    out = stats_ptr + row * 6
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, wz)
    tl.store(out + 3, w_sum)
    tl.store(out + 4, wy)
    tl.store(out + 5, wyz)


@triton.jit(do_not_specialize=["has_weight", "has_softcap"])
def cross_entropy_shard_grad_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, coef_ptr,
    n_classes, n_inner,
    logit_stride_outer, logit_stride_inner, logit_stride_class,
    grad_stride_outer, grad_stride_inner, grad_stride_class,
    target_stride_outer, target_stride_inner, target_stride_class,
    softcap_hi, softcap_lo, has_weight, has_softcap,
    PROB_TARGET: tl.constexpr, IS_FP64: tl.constexpr, LARGE_OFFSETS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Gradient of this rank's slice from global per-row coefficients, one program per row.

      logits_ptr, grad_ptr  (n_outer, n_inner, n_classes) with their strides; may alias.
      target_ptr  class index *local to this slice* (n_outer, n_inner) int64 (-1 or any
                  value outside [0, n_classes) when the target lives on another rank);
                  or, if PROB_TARGET, this slice's probabilities (target_stride_*).
      weight_ptr  (n_classes,) this slice's weights; read if has_weight.
      coef_ptr    (n_rows, 6) fp32/fp64 contiguous: [lse, A, coef_t, scale, keep, add]:
                  grad = scale * (A p - B) with p = exp(z - lse) and
                  B = coef_t [c == t] + add * w   (class index), or
                  B = w (keep * y + add)           (probabilities),
                  keep = 1 - eps, add = eps / C_total.
    Constexprs: PROB_TARGET, IS_FP64, LARGE_OFFSETS, BLOCK_V.
    Bytes per logit: 1 read + 1 write (plus 1 read of y with probability targets).
    """
    row, outer, inner = _row_coords(n_inner)
    row_logits = logits_ptr + outer * logit_stride_outer + inner * logit_stride_inner
    row_grad = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner
    row_target = target_ptr + outer * target_stride_outer + inner * target_stride_inner
    if IS_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    softcap = _scalar(softcap_hi, softcap_lo, IS_FP64)
    coef = coef_ptr + row * 6
    lse = tl.load(coef).to(acc_ty)
    coef_a = tl.load(coef + 1).to(acc_ty)
    coef_t = tl.load(coef + 2).to(acc_ty)
    scale = tl.load(coef + 3).to(acc_ty)
    keep = tl.load(coef + 4).to(acc_ty)
    add = tl.load(coef + 5).to(acc_ty)
    if PROB_TARGET:
        target_col = 0
    else:
        target_col = tl.load(row_target).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    if LARGE_OFFSETS:
        cols = cols.to(tl.int64)
    out_ty = grad_ptr.dtype.element_ty
    for start in range(0, n_classes, BLOCK_V):
        c = start + cols
        mask = c < n_classes
        z = _load_logits(row_logits, c, mask, logit_stride_class, softcap, has_softcap, IS_FP64)
        w = _load_weights(weight_ptr, c, mask, has_weight, IS_FP64)
        if PROB_TARGET:
            y = _load_target_probs(row_target, c, mask, target_stride_class, keep, add, IS_FP64)
        else:
            y = w
        g = _grad_chunk(z, mask, c, lse, coef_a, coef_t, add, target_col, w, y, scale, softcap,
                        has_softcap, PROB_TARGET)
        tl.store(row_grad + c * grad_stride_class, g.to(out_ty), mask=mask)
