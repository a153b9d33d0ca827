"""Softmax cross-entropy: loss and gradient in one pass over the logits.

Notation for one row (one sample, or one spatial position of a sample) of C
logits z (after the optional soft-cap z <- c*tanh(z/c)):

    m = max_c z_c,   s = sum_c exp(z_c - m),   lse = m + log s,
    p_c = exp((z_c - m) - log s)

The shifted logits z - m and log s are kept apart, as torch does, never folded
into lse first: for a confident row (the target leads by ~12 with logits ~30) the
loss log s - (z_t - m) is ~1e-5, and lse - z_t would round it to the precision of
lse (~2e-6). Every long-row path streams partials (m, s, lin, wsum) that merge
exactly (see _chunk_stats and _merge_stats), so the same formulas hold for a row
seen whole, in chunks by one program, or in chunks by several programs or ranks.

Class-index target t with class weights w (w = 1 without weights), label
smoothing eps and W = sum_c w_c (torch's formula):

    loss = (1-eps) w_t (log s - (z_t - m)) + eps/C (W log s - sum_c w_c (z_c - m))
           + z_loss lse^2
    dloss/dz_c = A p_c - B_c
        A   = (1-eps) w_t + eps/C W + 2 z_loss lse
        B_c = (1-eps) w_t [c == t] + eps/C w_c

Probability targets y (y' = (1-eps) y + eps/C):

    loss = (sum_c w_c y'_c) log s - sum_c w_c y'_c (z_c - m) + z_loss lse^2
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

from ._compat import mask_if


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
    return _upcast_logits(z, mask, softcap, has_softcap, IS_FP64)


@triton.jit
def _load_logits_hint(row_ptr, cols, mask, class_stride, softcap, has_softcap,
                      IS_FP64: tl.constexpr, EVICT: tl.constexpr):
    """_load_logits with an L2 eviction hint ("evict_last" keeps lines a second pass
    re-reads, "evict_first" streams, "" is the default policy)."""
    z = tl.load(row_ptr + cols * class_stride, mask=mask, other=0.0, eviction_policy=EVICT)
    return _upcast_logits(z, mask, softcap, has_softcap, IS_FP64)


@triton.jit
def _upcast_logits(z, mask, softcap, has_softcap, IS_FP64: tl.constexpr):
    """Logits as loaded -> accumulation dtype, soft-capped; padded lanes -inf."""
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
    w = tl.load(weight_ptr + cols, mask=mask_if(mask, has_weight), other=1.0)
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
def _shift_ref(m):
    """The value a partial's sums are shifted by: its max m, or 0 for an all -inf chunk
    (so z - ref is never -inf - -inf = NaN)."""
    return tl.where(m > -float("inf"), m, 0.0)


@triton.jit
def _chunk_max_sum(z):
    """(m, s, zs) of one chunk: m = max z, zs = z - ref(m), s = sum exp(zs)."""
    m = tl.max(z, axis=0)
    zs = z - _shift_ref(m)
    s = tl.sum(tl.exp(zs), axis=0)
    return m, s, zs


@triton.jit
def _chunk_linear(zs, mask, v):
    """(sum v (z - ref), sum v) of one chunk; v = w (class index) or w y' (probabilities),
    0 on padding. Padded lanes (zs = -inf) are excluded, not multiplied."""
    return tl.sum(tl.where(mask, v * zs, 0.0), axis=0), tl.sum(v, axis=0)


@triton.jit
def _merge_max_sum(m_a, s_a, m_b, s_b):
    """Merge two (m, s) partials; also returns each side's shift ref(m_x) - ref(m)
    (<= 0), which moves that side's linear sums onto the merged reference."""
    m = tl.maximum(m_a, m_b)
    ref = _shift_ref(m)
    d_a = _shift_ref(m_a) - ref
    d_b = _shift_ref(m_b) - ref
    # A side whose sum is 0 (empty, or all -inf) adds nothing (exp(d) may overflow for
    # it). Gated on s, not on m: a side with NaN logits has a NaN sum, which must reach
    # the result, while its max may be NaN or, on the GPU (max ignores NaN), -inf or finite.
    s = tl.where(s_a != 0.0, s_a * tl.exp(d_a), 0.0) \
        + tl.where(s_b != 0.0, s_b * tl.exp(d_b), 0.0)
    return m, s, d_a, d_b


@triton.jit
def _merge_linear(lin_a, v_a, d_a, lin_b, v_b, d_b):
    """Merge two linear partials onto the reference _merge_max_sum chose."""
    return lin_a + d_a * v_a + lin_b + d_b * v_b, v_a + v_b


@triton.jit
def _load_chunk(row_logits, row_target, weight_ptr, c, mask, class_stride, target_class_stride,
                softcap, has_softcap, has_weight, keep, add, IS_FP64: tl.constexpr,
                PROB_TARGET: tl.constexpr, EVICT: tl.constexpr):
    """(z, w, v) of one chunk: capped logits, weights, and the weights the linear sum
    uses (w for class indices, w y' for probabilities)."""
    z = _load_logits_hint(row_logits, c, mask, class_stride, softcap, has_softcap, IS_FP64, EVICT)
    w = _load_weights(weight_ptr, c, mask, has_weight, IS_FP64)
    if PROB_TARGET:
        y = _load_target_probs(row_target, c, mask, target_class_stride, keep, add, IS_FP64)
        v = w * y
    else:
        v = w
    return z, w, v


@triton.jit
def _row_stats_pass(row_logits, row_target, weight_ptr, lo, hi, cols, class_stride,
                    target_class_stride, softcap, has_softcap, has_weight, keep, add, acc_ty,
                    IS_FP64: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_LINEAR: tl.constexpr,
                    BLOCK_V: tl.constexpr, EVICT: tl.constexpr):
    """Streaming statistics of classes [lo, hi) of one row, one read of the logits (and
    of y for probabilities): (m, s, lin_w, w_sum, lin_v, v_sum) with
    lin_w = sum w (z - ref(m)), w_sum = sum w      (zeros unless HAS_LINEAR),
    lin_v = sum w y' (z - ref(m)), v_sum = sum w y' (zeros unless PROB_TARGET).
    Shared by the fused two-pass path and the vocab-parallel statistics kernel."""
    m = tl.full((), -float("inf"), acc_ty)
    s = tl.zeros((), acc_ty)
    lin_w = tl.zeros((), acc_ty)
    w_sum = tl.zeros((), acc_ty)
    lin_v = tl.zeros((), acc_ty)
    v_sum = tl.zeros((), acc_ty)
    for start in range(lo, hi, BLOCK_V):
        c = start + cols
        mask = c < hi
        z, w, v = _load_chunk(row_logits, row_target, weight_ptr, c, mask, class_stride,
                              target_class_stride, softcap, has_softcap, has_weight, keep, add,
                              IS_FP64, PROB_TARGET, EVICT)
        cm, cs, zs = _chunk_max_sum(z)
        m, s, d_a, d_b = _merge_max_sum(m, s, cm, cs)
        if HAS_LINEAR:
            clin, cw = _chunk_linear(zs, mask, w)
            lin_w, w_sum = _merge_linear(lin_w, w_sum, d_a, clin, cw, d_b)
        if PROB_TARGET:
            clin, cv = _chunk_linear(zs, mask, v)
            lin_v, v_sum = _merge_linear(lin_v, v_sum, d_a, clin, cv, d_b)
    return m, s, lin_w, w_sum, lin_v, v_sum


@triton.jit
def _grad_chunk(z, mask, cols, m, log_s, coef_a, coef_t, coef_smooth, target_col, w, v, scale,
                softcap, has_softcap, PROB_TARGET: tl.constexpr):
    """scale * (A p - B) * dcap for one chunk, in the accumulation dtype.

    p = exp((z - m) - log s): z - m is exact near the max and log s small, so a
    confident row's p_t - 1 keeps its digits (exp(z - lse) would not)."""
    p = tl.exp((z - m) - log_s)
    if PROB_TARGET:
        g = coef_a * p - v
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


@triton.jit
def _row_grad_pass(row_logits, row_grad, row_target, weight_ptr, lo, hi, cols, class_stride,
                   grad_class_stride, target_class_stride, softcap, has_softcap, has_weight,
                   keep, add, m, log_s, coef_a, coef_t, coef_smooth, target_col, scale,
                   IS_FP64: tl.constexpr, PROB_TARGET: tl.constexpr, BLOCK_V: tl.constexpr,
                   REVERSE: tl.constexpr, EVICT: tl.constexpr):
    """Write the gradient of classes [lo, hi) of one row: 1 read + 1 write per logit.
    REVERSE walks the chunks last to first: right after a statistics pass the row's
    tail is what L2 still holds. Shared by the fused two-pass path and the
    vocab-parallel gradient kernel."""
    out_ty = row_grad.dtype.element_ty
    n_iter = tl.cdiv(hi - lo, BLOCK_V)
    for i in range(0, n_iter):
        if REVERSE:
            start = lo + (n_iter - 1 - i) * BLOCK_V
        else:
            start = lo + i * BLOCK_V
        c = start + cols
        mask = c < hi
        z, w, v = _load_chunk(row_logits, row_target, weight_ptr, c, mask, class_stride,
                              target_class_stride, softcap, has_softcap, has_weight, keep, add,
                              IS_FP64, PROB_TARGET, EVICT)
        g = _grad_chunk(z, mask, c, m, log_s, coef_a, coef_t, coef_smooth, target_col, w, v,
                        scale, softcap, has_softcap, PROB_TARGET)
        tl.store(row_grad + c * grad_class_stride, g.to(out_ty), mask=mask, eviction_policy=EVICT)


@triton.jit
def _row_grad_scale(reduce_ptr, ignored, in_range, acc_ty: tl.constexpr,
                    PROB_TARGET: tl.constexpr):
    """The factor a row's gradient is scaled by: reduce_ptr[0] (the reduction's scale), and
    for class targets an exact 0 on ignored rows (not 0 * scale, which is NaN when the
    mean's divisor is 0) and NaN on rows whose target is out of range."""
    scale = tl.load(reduce_ptr).to(acc_ty)
    if not PROB_TARGET:
        scale = tl.where(ignored, 0.0, tl.where(in_range, scale, float("nan")))
    return scale


@triton.jit
def _row_loss(m, s, lin, vsum, z_t, w_t, ignored, in_range, weight_total, label_smoothing,
              z_loss, n_classes, PROB_TARGET: tl.constexpr):
    """(loss, lse, log s, A, coef_t, coef_smooth) of one row from its merged statistics.

    z_t - m and log s stay apart (see the module docstring). lin = sum v (z - m),
    vsum = sum v with v = w y' (probabilities) or w (class index; lin used only with
    smoothing)."""
    log_s = tl.log(s)
    lse = m + log_s
    if PROB_TARGET:
        loss = vsum * log_s - lin + z_loss * lse * lse
        coef_a = vsum + 2.0 * z_loss * lse
        coef_t = tl.zeros_like(lse)
        coef_smooth = tl.zeros_like(lse)
    else:
        eps_c = label_smoothing / n_classes
        coef_t = (1.0 - label_smoothing) * w_t
        coef_smooth = eps_c + tl.zeros_like(lse)
        # The smoothing terms only when eps != 0: with eps == 0 torch computes plain NLL, so
        # a -inf logit (masked vocabulary) or an inf weight must not turn 0 * inf into NaN.
        smooth = tl.where(eps_c != 0, eps_c * (weight_total * log_s - lin), 0.0)
        loss = coef_t * (log_s - (z_t - m)) + smooth + z_loss * lse * lse
        coef_a = coef_t + tl.where(eps_c != 0, eps_c * weight_total, 0.0) + 2.0 * z_loss * lse
        loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    return loss, lse, log_s, coef_a, coef_t, coef_smooth


@triton.jit(do_not_specialize=["has_weight", "has_softcap", "write_grad", "ignore_index"])
def cross_entropy_fwd_bwd_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, reduce_ptr,
    n_rows, n_classes, n_inner,
    logit_stride_outer, logit_stride_inner, logit_stride_class,
    grad_stride_outer, grad_stride_inner, grad_stride_class,
    target_stride_outer, target_stride_inner, target_stride_class,
    ignore_index, smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo,
    has_weight, has_softcap, write_grad,
    PROB_TARGET: tl.constexpr, IS_FP64: tl.constexpr, LARGE_OFFSETS: tl.constexpr,
    BLOCK_V: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """Per-row loss, logsumexp and (optionally) the gradient; a persistent grid: program
    p handles rows p, p + G, ... (G = n_rows for single blocks; for the two-pass path at
    most what the GPU holds at once, so a row's lines are still in L2 for pass 2).

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
    if IS_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    label_smoothing = _scalar(smoothing_hi, smoothing_lo, IS_FP64)
    z_loss = _scalar(z_loss_hi, z_loss_lo, IS_FP64)
    softcap = _scalar(softcap_hi, softcap_lo, IS_FP64)
    weight_total = tl.load(reduce_ptr + 1).to(acc_ty)
    # Persistent over rows: one row per program for single blocks (grid = n_rows), a grid
    # the GPU holds at once for the two-pass path (its rows stay in L2 between passes).
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        outer, inner = _coords_of(row, n_inner)
        row_logits = logits_ptr + outer * logit_stride_outer + inner * logit_stride_inner
        row_grad = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner
        row_target = target_ptr + outer * target_stride_outer + inner * target_stride_inner

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
        keep = 1.0 - label_smoothing
        add = label_smoothing / n_classes
        if SINGLE_BLOCK:
            mask = cols < n_classes
            z, w, v = _load_chunk(row_logits, row_target, weight_ptr, cols, mask,
                                  logit_stride_class, target_stride_class, softcap, has_softcap,
                                  has_weight, keep, add, IS_FP64, PROB_TARGET, "")
            m, s, zs = _chunk_max_sum(z)
            lin = tl.sum(tl.where(mask, v * zs, 0.0), axis=0)
            if PROB_TARGET:
                vsum = tl.sum(v, axis=0)
            else:
                vsum = weight_total  # unused: the class-index loss takes W from reduce_ptr
                z_t = tl.sum(tl.where(cols == safe_col, z, 0.0), axis=0)
        else:
            # Pass 1: streaming statistics (one read; evict_last keeps the lines in L2
            # for pass 2).
            m, s, lin, _, lin_v, v_sum = _row_stats_pass(
                row_logits, row_target, weight_ptr, 0, n_classes, cols, logit_stride_class,
                target_stride_class, softcap, has_softcap, has_weight, keep, add, acc_ty,
                IS_FP64, PROB_TARGET, not PROB_TARGET, BLOCK_V, "evict_last")
            if PROB_TARGET:
                lin = lin_v
                vsum = v_sum
            else:
                vsum = weight_total  # unused: the class-index loss takes W from reduce_ptr
            if not PROB_TARGET:
                z_t = _load_logits(row_logits, safe_col, in_range, logit_stride_class, softcap,
                                   has_softcap, IS_FP64)

        if PROB_TARGET:
            z_t = m
            w_t = 1.0
            ignored = False
            in_range = True
        else:
            w_t = tl.load(weight_ptr + safe_col, mask=mask_if(in_range, has_weight), other=1.0)
            w_t = w_t.to(acc_ty)
        loss, lse, log_s, coef_a, coef_t, coef_smooth = _row_loss(
            m, s, lin, vsum, z_t, w_t, ignored, in_range, weight_total, label_smoothing, z_loss,
            n_classes, PROB_TARGET)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)

        if write_grad != 0:
            scale = _row_grad_scale(reduce_ptr, ignored, in_range, acc_ty, PROB_TARGET)
            out_ty = grad_ptr.dtype.element_ty
            if SINGLE_BLOCK:
                # Reload the (cached, C-element) weights rather than keep them live across
                # the reductions: registers go to the row of logits.
                w = _load_weights(weight_ptr, cols, mask, has_weight, IS_FP64)
                g = _grad_chunk(z, mask, cols, m, log_s, coef_a, coef_t, coef_smooth,
                                target_col, w, v, scale, softcap, has_softcap, PROB_TARGET)
                tl.store(row_grad + cols * grad_stride_class, g.to(out_ty), mask=mask)
            else:
                # Pass 2: re-read the row last chunk first (what L2 still holds) and
                # write the gradient; evict_first: these lines are not needed again.
                _row_grad_pass(row_logits, row_grad, row_target, weight_ptr, 0, n_classes,
                               cols, logit_stride_class, grad_stride_class,
                               target_stride_class, softcap, has_softcap, has_weight, keep, add,
                               m, log_s, coef_a, coef_t, coef_smooth, target_col, scale, IS_FP64,
                               PROB_TARGET, BLOCK_V, True, "evict_first")


@triton.jit
def _coords_of(row, n_inner):
    """(outer, inner) of a row index, int64 for address arithmetic (32-bit division)."""
    return tl.cast(row // n_inner, tl.int64), tl.cast(row % n_inner, tl.int64)


@triton.jit
def _load_chunk_at(start, row_logits, row_target, weight_ptr, c, n_classes, class_stride,
                   target_class_stride, softcap, has_softcap, has_weight, keep, add,
                   IS_FP64: tl.constexpr, PROB_TARGET: tl.constexpr, EVICT: tl.constexpr):
    """The row's chunk of classes [start, start + len(c)) through _load_chunk: (start as
    int64, its mask, z, w, v). The split kernel's recomputed partials and SOLO gradient
    pass read chunks this way (the chunk's base in 64 bits, offsets within it in 32)."""
    start64 = tl.cast(start, tl.int64)
    mask = c < n_classes - start
    z, w, v = _load_chunk(row_logits + start64 * class_stride,
                          row_target + start64 * target_class_stride, weight_ptr + start, c,
                          mask, class_stride, target_class_stride, softcap, has_softcap,
                          has_weight, keep, add, IS_FP64, PROB_TARGET, EVICT)
    return start64, mask, z, w, v


@triton.jit
def _chunk_partial(z, mask, w, v, PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """(m, s, lin, vsum) of one chunk: the partial a split-row member publishes.

    lin, vsum = sum v (z - ref(m)), sum v with v = w y' (probabilities) or w (class index
    with smoothing); zeros otherwise (the reductions vanish at compile time)."""
    m, s, zs = _chunk_max_sum(z)
    if PROB_TARGET:
        lin, vsum = _chunk_linear(zs, mask, v)
    elif HAS_SMOOTHING:
        lin, vsum = _chunk_linear(zs, mask, w)
    else:
        lin = tl.zeros_like(s)
        vsum = tl.zeros_like(s)
    return m, s, lin, vsum


@triton.jit
def _combine_partials(m_a, s_a, lin_a, v_a, m_b, s_b, lin_b, v_b):
    """tl.reduce combine of (m, s, lin, vsum) partials (identity: -inf, 0, 0, 0)."""
    m, s, d_a, d_b = _merge_max_sum(m_a, s_a, m_b, s_b)
    lin, v = _merge_linear(lin_a, v_a, d_a, lin_b, v_b, d_b)
    return m, s, lin, v


@triton.jit
def _publish_partial(slot, flag, m, s, lin, vsum):
    """Store one member's partial at slot[0:4] and raise its flag (integer atomic,
    release): every thread's stores precede the flag (barrier; the release is cumulative)."""
    tl.store(slot, m)
    tl.store(slot + 1, s)
    tl.store(slot + 2, lin)
    tl.store(slot + 3, vsum)
    tl.debug_barrier()
    tl.atomic_xchg(flag, 1, sem="release", scope="gpu")


@triton.jit
def _gather_partials(slots, got):
    """The partials slots[k][0:4] as four vectors over the members k where got, the
    merge's identity (-inf, 0, 0, 0) elsewhere. L2 only (.cg): partners wrote them from
    other SMs."""
    m = tl.load(slots, mask=got, other=-float("inf"), cache_modifier=".cg")
    s = tl.load(slots + 1, mask=got, other=0.0, cache_modifier=".cg")
    lin = tl.load(slots + 2, mask=got, other=0.0, cache_modifier=".cg")
    vsum = tl.load(slots + 3, mask=got, other=0.0, cache_modifier=".cg")
    return m, s, lin, vsum


@triton.jit
def _set_partial(lane, m, s, lin, vsum, vm, vs, vlin, vv):
    """The partial vectors (vm, vs, vlin, vv) with (m, s, lin, vsum) put where lane."""
    return (tl.where(lane, m, vm), tl.where(lane, s, vs), tl.where(lane, lin, vlin),
            tl.where(lane, vsum, vv))


@triton.jit(do_not_specialize=["has_softcap", "write_grad", "ignore_index", "max_spin"])
def cross_entropy_split_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, reduce_ptr,
    partial_ptr, sync_ptr,
    n_rows, n_classes, n_inner, n_chunks,
    logit_stride_outer, logit_stride_inner, logit_stride_class,
    grad_stride_outer, grad_stride_inner, grad_stride_class,
    target_stride_outer, target_stride_inner, target_stride_class,
    ignore_index, smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo,
    has_softcap, write_grad, max_spin,
    PROB_TARGET: tl.constexpr, IS_FP64: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr,
    SOLO: tl.constexpr = False,
):
    """Loss and gradient with each row split over n_chunks co-resident programs: one read
    and one write per logit for rows far longer than one program can hold.

    SOLO (the two-pass path for rows this kernel covers, where no group of n_chunks
    programs can be co-resident): program p handles whole rows p, p + G, ... alone. It
    computes every chunk's partial from global memory with the code a member runs for a
    missing partner, merges them in the same tree, then re-reads the row (last chunk
    first: what L2 still holds) to write the gradient with the members' code. Two reads
    and one write per logit, no partials or flags touched, and bitwise the split path's
    results (same chunks, same reductions, same merge).

    Grid: (n_groups * n_chunks,), at most what the GPU holds at once (the launcher sizes
    it from the compiled kernel's occupancy and launches it cooperatively where it can).
    Program p is member k = p % n_chunks of group p // n_chunks; a group handles rows
    group, group + n_groups, ... Member k of a row loads classes [k CHUNK, (k+1) CHUNK)
    once, keeps them in registers, publishes its partial (m, s, lin, vsum), gathers all
    n_chunks partials of the row as vectors (one round trip for the flags, one for the
    values), merges them in a fixed tree over the member index (every member and every
    rerun gets bitwise the same row statistics), and writes its chunk's gradient from
    the registers.

    Waiting is bounded: a member spins at most max_spin rounds per row on its partners'
    flags; a partial still missing then is recomputed from global memory with the same
    code the partner runs (bitwise the same value), so the kernel cannot deadlock even if
    a group is not co-resident, and under the interpreter (programs run one after
    another) early members take the fallback and later ones the exchange.

    Pointers as in cross_entropy_fwd_bwd_kernel (logits, grad, target, weight, loss, lse,
    reduce; weight read only if HAS_WEIGHT), plus:
      partial_ptr (n_rows, n_chunks, 4) fp32/fp64 scratch, contiguous: published partials.
      sync_ptr    int32, zero before the launch and zero again after it: flags
                  (n_rows, n_chunks) at offset 0 (1 = member published) and per-row done
                  counters (n_rows,) at offset n_rows * n_chunks. The last member of a
                  row to finish resets that row's flags and counter, so no memset launch
                  is needed between calls (and CUDA-graph replays stay correct).
    Scalars as in cross_entropy_fwd_bwd_kernel; max_spin bounds the waiting.
    Offsets: rows and chunk starts are addressed in 64 bits, offsets within a chunk
      (column x class stride) in 32: the launcher keeps CHUNK x every class stride below
      2^31 (choose_path), so no 64-bit column vector is ever live.
    Constexprs: PROB_TARGET, IS_FP64, HAS_WEIGHT,
      HAS_SMOOTHING (class index with eps != 0: the smoothing sums), CHUNK (classes per
      member, power of 2; n_chunks = cdiv(n_classes, CHUNK)), MAX_CHUNKS (power of 2
      >= n_chunks: the width of the partial vectors).

    Bytes per logit: 1 read + 1 write (1 read without write_grad; probabilities add one
    read of y). Per row: n_chunks^2 partials of 4 values (L2-resident) and 2 scalars.
    """
    pid = tl.program_id(0)
    if SOLO:
        member = 0
        group = pid
        n_groups = tl.num_programs(0)
    else:
        member = pid % n_chunks
        group = pid // n_chunks
        n_groups = tl.num_programs(0) // n_chunks
    if IS_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    label_smoothing = _scalar(smoothing_hi, smoothing_lo, IS_FP64)
    z_loss = _scalar(z_loss_hi, z_loss_lo, IS_FP64)
    softcap = _scalar(softcap_hi, softcap_lo, IS_FP64)
    keep = 1.0 - label_smoothing
    add = label_smoothing / n_classes
    # This member's classes [start, start + CHUNK), addressed from 64-bit chunk bases by
    # 32-bit in-chunk offsets (see the docstring): a live int64 column vector would cost
    # 16 registers per thread, and two programs per SM leave none to spare.
    cols = tl.arange(0, CHUNK)
    start = member * CHUNK
    start64 = tl.cast(start, tl.int64)
    my_mask = cols < n_classes - start
    my_weights = weight_ptr + start
    flags = sync_ptr
    done = sync_ptr + n_rows * n_chunks
    # The shared loaders take a runtime flag; a constant one folds away at compile time.
    has_weight = tl.full((), HAS_WEIGHT, tl.int32)
    kidx = tl.arange(0, MAX_CHUNKS)
    kmask = kidx < n_chunks
    out_ty = grad_ptr.dtype.element_ty

    for row in range(group, n_rows, n_groups):
        row64 = tl.cast(row, tl.int64)
        outer, inner = _coords_of(row, n_inner)
        row_logits = logits_ptr + outer * logit_stride_outer + inner * logit_stride_inner
        row_grad = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner
        row_target = target_ptr + outer * target_stride_outer + inner * target_stride_inner
        my_logits = row_logits + start64 * logit_stride_class
        my_grad = row_grad + start64 * grad_stride_class
        my_target = row_target + start64 * target_stride_class
        if SOLO:
            # Nothing published, nothing to wait for: every partial is computed below.
            ready = tl.where(kmask, 0, 1)
            vm = tl.full([MAX_CHUNKS], -float("inf"), acc_ty)
            vs = tl.zeros([MAX_CHUNKS], acc_ty)
            vlin = tl.zeros([MAX_CHUNKS], acc_ty)
            vv = tl.zeros([MAX_CHUNKS], acc_ty)
        else:
            # The one read of this member's chunk; z (and v = w y' for probabilities) stay
            # in registers until the gradient is written.
            # Kept as loaded (16-bit logits stay packed, two per register) and upcast
            # (and soft-capped) again for the gradient: registers are the occupancy limit.
            z_raw = tl.load(my_logits + cols * logit_stride_class, mask=my_mask, other=0.0)
            z = _upcast_logits(z_raw, my_mask, softcap, has_softcap, IS_FP64)
            w = _load_weights(my_weights, cols, my_mask, has_weight, IS_FP64)
            if PROB_TARGET:
                y = _load_target_probs(my_target, cols, my_mask, target_stride_class, keep, add,
                                       IS_FP64)
                v = w * y
            else:
                v = w
            pm, ps, plin, pv = _chunk_partial(z, my_mask, w, v, PROB_TARGET, HAS_SMOOTHING)
            row_flags = flags + row64 * n_chunks
            _publish_partial(partial_ptr + (row64 * n_chunks + member) * 4, row_flags + member,
                             pm, ps, plin, pv)

            # Gather the row's partials as vectors over the members: one round trip for all
            # flags (integer atomic reads, add 0, acquire: pairs with each partner's
            # release), a bounded spin while some are missing, one vector load.
            flag_ptrs = row_flags + kidx
            ready = tl.atomic_add(flag_ptrs, 0, mask=kmask, sem="acquire", scope="gpu")
            ready = tl.where(kmask, ready, 1)
            spins = 0
            while (tl.min(ready, axis=0) == 0) & (spins < max_spin):
                ready = tl.atomic_add(flag_ptrs, 0, mask=kmask, sem="acquire", scope="gpu")
                ready = tl.where(kmask, ready, 1)
                spins += 1
            got = kmask & (ready != 0)
            vm, vs, vlin, vv = _gather_partials(partial_ptr + (row64 * n_chunks + kidx) * 4, got)
        if tl.min(ready, axis=0) == 0:
            # Fallback: recompute each missing partial from global memory with the
            # partner's own code (same chunk width, same reductions: the same bits).
            for j in range(0, n_chunks):
                if tl.sum(tl.where(kidx == j, ready, 0), axis=0) == 0:
                    _, jmask, jz, jw, jvv = _load_chunk_at(
                        j * CHUNK, row_logits, row_target, weight_ptr, cols, n_classes,
                        logit_stride_class, target_stride_class, softcap, has_softcap,
                        has_weight, keep, add, IS_FP64, PROB_TARGET, "")
                    jm, js, jlin, jv = _chunk_partial(jz, jmask, jw, jvv, PROB_TARGET,
                                                      HAS_SMOOTHING)
                    vm, vs, vlin, vv = _set_partial(kidx == j, jm, js, jlin, jv,
                                                    vm, vs, vlin, vv)
            if not SOLO:
                # This rare path reads its own chunk again: keeping it live through the
                # recomputation would spill (the offline compile shows it).
                z_raw = tl.load(my_logits + cols * logit_stride_class, mask=my_mask,
                                other=0.0)
                if PROB_TARGET:
                    w = _load_weights(my_weights, cols, my_mask, has_weight, IS_FP64)
                    v = w * _load_target_probs(my_target, cols, my_mask, target_stride_class,
                                               keep, add, IS_FP64)
        if not SOLO:
            # Integer atomic: counts the members done with this row's flags and partials;
            # the last one resets them for the next launch (no memset launch).
            n_done = tl.atomic_add(done + row, 1, sem="acq_rel", scope="gpu")
            if n_done == n_chunks - 1:
                # Integer atomics: clear the flags (nobody reads them any more in this
                # launch) and re-arm the counter.
                tl.atomic_xchg(flag_ptrs, 0, mask=kmask, sem="relaxed", scope="gpu")
                tl.atomic_xchg(done + row, 0, sem="relaxed", scope="gpu")
        # Merge in a fixed tree over the member index: every member of the row (and
        # every rerun) combines the same values in the same order.
        m, s, lin, vsum = tl.reduce((vm, vs, vlin, vv), 0, _combine_partials)

        if PROB_TARGET:
            target_col = 0
            z_t = m
            w_t = 1.0
            ignored = False
            in_range = True
            lin_row = lin
            vsum_row = vsum
        else:
            target_col = tl.load(row_target).to(tl.int64)
            ignored = target_col == ignore_index
            in_range = (target_col >= 0) & (target_col < n_classes)
            safe_col = tl.where(in_range, target_col, 0)
            z_t = _load_logits(row_logits, safe_col, in_range, logit_stride_class, softcap,
                               has_softcap, IS_FP64)
            if HAS_WEIGHT:
                w_t = tl.load(weight_ptr + safe_col, mask=in_range, other=1.0).to(acc_ty)
            else:
                w_t = tl.full((), 1.0, acc_ty)
            lin_row = lin
        # W = sum of the class weights, loaded per row rather than held through the loop
        # (registers go to the chunk).
        weight_total = tl.load(reduce_ptr + 1).to(acc_ty)
        if not PROB_TARGET:
            vsum_row = weight_total
        loss, lse, log_s, coef_a, coef_t, coef_smooth = _row_loss(
            m, s, lin_row, vsum_row, z_t, w_t, ignored, in_range, weight_total,
            label_smoothing, z_loss, n_classes, PROB_TARGET)
        if member == 0:
            tl.store(loss_ptr + row, loss)
            tl.store(lse_ptr + row, lse)
        if write_grad != 0:
            scale = _row_grad_scale(reduce_ptr, ignored, in_range, acc_ty, PROB_TARGET)
            if SOLO:
                # Second pass, last chunk first, each chunk as its member writes it.
                for jj in range(0, n_chunks):
                    j64, jmask, jz, jw, jv = _load_chunk_at(
                        (n_chunks - 1 - jj) * CHUNK, row_logits, row_target, weight_ptr, cols,
                        n_classes, logit_stride_class, target_stride_class, softcap,
                        has_softcap, has_weight, keep, add, IS_FP64, PROB_TARGET,
                        "evict_first")
                    g = _grad_chunk(jz, jmask, cols, m, log_s, coef_a, coef_t, coef_smooth,
                                    target_col - j64, jw, jv, scale, softcap, has_softcap,
                                    PROB_TARGET)
                    tl.store(row_grad + j64 * grad_stride_class + cols * grad_stride_class,
                             g.to(out_ty), mask=jmask)
            else:
                if HAS_WEIGHT:
                    # Reloaded (L2) rather than kept live: registers go to the chunk.
                    w = _load_weights(my_weights, cols, my_mask, has_weight, IS_FP64)
                z = _upcast_logits(z_raw, my_mask, softcap, has_softcap, IS_FP64)
                # (the target's column relative to this chunk: cols are chunk-local)
                g = _grad_chunk(z, my_mask, cols, m, log_s, coef_a, coef_t, coef_smooth,
                                target_col - start64, w, v, scale, softcap, has_softcap,
                                PROB_TARGET)
                tl.store(my_grad + cols * grad_stride_class, g.to(out_ty), mask=my_mask)


@triton.jit
def scale_grad_kernel(
    grad_ptr, grad_output_ptr,
    n_rows, n_classes, n_inner, n_tiles_per_row,
    grad_stride_outer, grad_stride_inner, grad_stride_class,
    go_stride_outer, go_stride_inner,
    PER_ROW: tl.constexpr, IS_FP64: tl.constexpr, LARGE_OFFSETS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Backward: grad *= grad_output in place; nothing is read or written where it is 1.

    Persistent grid (a few programs per SM): program p scales tiles p, p + G, ... of
    BLOCK_V classes, tile t = row * n_tiles_per_row + chunk. With a scalar grad_output of
    exactly 1 (a plain loss.backward()) every program reads it once and returns: O(#SM)
    programs and no pass over the gradient.
      grad_ptr         (n_outer, n_inner, n_classes), strides grad_stride_*; any float dtype.
      grad_output_ptr  scalar (PER_ROW=False) or (n_outer, n_inner) with strides
                       go_stride_{outer,inner} (0 for an expanded grad_output).
    Constexprs: PER_ROW (reduction='none'), IS_FP64 (multiply in fp64, else fp32),
      LARGE_OFFSETS (int64 class offsets), BLOCK_V (tile width, power of 2).
    Bytes per element: 0 when grad_output == 1, otherwise 1 read + 1 write.
    """
    if IS_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    if PER_ROW:
        any_work = True
    else:
        g_all = tl.load(grad_output_ptr).to(acc_ty)
        any_work = g_all != 1.0
    if any_work:
        cols0 = tl.arange(0, BLOCK_V)
        if LARGE_OFFSETS:
            cols0 = cols0.to(tl.int64)
        n_tiles = n_rows * n_tiles_per_row
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            row = tile // n_tiles_per_row
            chunk = tile % n_tiles_per_row
            outer, inner = _coords_of(row, n_inner)
            if PER_ROW:
                g_out = tl.load(grad_output_ptr + outer * go_stride_outer
                                + inner * go_stride_inner).to(acc_ty)
            else:
                g_out = g_all
            if g_out != 1.0:
                cols = chunk * BLOCK_V + cols0
                mask = cols < n_classes
                ptrs = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner \
                    + cols * grad_stride_class
                g = tl.load(ptrs, mask=mask, other=0.0)
                tl.store(ptrs, (g.to(acc_ty) * g_out).to(g.dtype), mask=mask)


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
      stats_ptr   (n_rows, 6) fp32/fp64, contiguous, written: [m = max z,
                  sum exp(z - r), sum w (z - r), sum w, sum w y, sum w y (z - r)] with
                  r = m (0 if m = -inf); the last two are 0 without PROB_TARGET. The
                  shifted sums stay accurate for confident rows (see the module docstring).
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
    m, s, wz, w_sum, wyz, wy = _row_stats_pass(
        row_logits, row_target, weight_ptr, 0, n_classes, cols, logit_stride_class,
        target_stride_class, softcap, has_softcap, has_weight, 1.0, 0.0, acc_ty,
        IS_FP64, PROB_TARGET, True, BLOCK_V, "")
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
      coef_ptr    (n_rows, 7) fp32/fp64 contiguous: [m, log s, A, coef_t, scale, keep,
                  add]: grad = scale * (A p - B) with p = exp((z - m) - log s) and
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
    coef = coef_ptr + row * 7
    m = tl.load(coef).to(acc_ty)
    log_s = tl.load(coef + 1).to(acc_ty)
    coef_a = tl.load(coef + 2).to(acc_ty)
    coef_t = tl.load(coef + 3).to(acc_ty)
    scale = tl.load(coef + 4).to(acc_ty)
    keep = tl.load(coef + 5).to(acc_ty)
    add = tl.load(coef + 6).to(acc_ty)
    if PROB_TARGET:
        target_col = 0
    else:
        target_col = tl.load(row_target).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    if LARGE_OFFSETS:
        cols = cols.to(tl.int64)
    _row_grad_pass(row_logits, row_grad, row_target, weight_ptr, 0, n_classes, cols,
                   logit_stride_class, grad_stride_class, target_stride_class, softcap,
                   has_softcap, has_weight, keep, add, m, log_s, coef_a, coef_t, add, target_col,
                   scale, IS_FP64, PROB_TARGET, BLOCK_V, False, "")
