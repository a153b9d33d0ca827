"""BatchNorm device code: split per-channel reductions, fixed-order merges, elementwise passes.

Every data tensor is addressed as a strided (N, C, S) view: element (n, c, s) lives at
``n * stride_n + c * stride_c + s * stride_s`` (int64 arithmetic). The launcher collapses the
spatial dims into S, and when n and s step through memory uniformly (channels_last, or S == 1)
it folds N into S as well, so the kernels see N == 1 and one long row index. One of
``stride_s`` / ``stride_c`` is 1 (the launcher guarantees it): Triton specialises that stride
to the constant 1, the pointer becomes contiguous along that axis of the [BLOCK_C, BLOCK_S]
tile, and the coalescing pass orders the tile's layout accordingly — the same source serves
NCHW (spatial-inner) and channels_last (channel-inner) without transposing copies.

A *tile* is [BLOCK_C channels, BLOCK_S spatial positions of one n]. Tiles of a channel block
are numbered t = n * tiles_per_n + s_block. Reductions give each program (split p, channel
block) the contiguous tile range [p * tiles_per_split, (p + 1) * tiles_per_split) and write one
partial per (p, channel); a second, tiny kernel merges the partials in increasing p. The result
depends only on the split count, never on scheduling: deterministic, no atomics.

"acc" below is the accumulation dtype: float32, or float64 for float64 input. It is read from
the element type of a statistics pointer, which the launcher allocates in that dtype.
Integer flags that are not strides are runtime values (``do_not_specialize``) so that a flag
or a size equal to 1 does not produce another compiled variant.
"""

import triton
import triton.language as tl

from ._compat import mask_if

# Integer arguments never specialised on their value (equal to 1, or divisible by 16): tile
# counts and part counts gain nothing from it. C and S stay specialisable: divisibility of
# the inner extent by 16 is what lets the masked loads along it become 16-byte vectors.
_RUNTIME_INTS = ["tiles_per_n", "tiles_per_split", "n_tiles", "n_splits"]
_MERGE_RUNTIME_INTS = ["n_parts", "C", "part_stride", "field_stride"]


@triton.jit
def _inv_sqrt(v):
    # Correctly rounded: tl.sqrt is an approximation for fp32; fp64 sqrt is always exact.
    if v.dtype == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = 1.0 / tl.sqrt_rn(v)
    return r


@triton.jit
def _host_float(hi, lo, acc_ty: tl.constexpr):
    """A host float passed as an fp32 pair hi + lo (compiled Triton types every Python float
    argument fp32), in the accumulation dtype: ~48 significant bits for float64."""
    return tl.cast(hi, acc_ty) + tl.cast(lo, acc_ty)


@triton.jit
def _tile(t, tiles_per_n, S, c_off, c_mask, stride_n, stride_s, BLOCK_S: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_S] (int64), mask and valid-position count of tile ``t``.

    The row index is int64 from the start: with N folded into S (channels_last, C == 1,
    (N, C) inputs) S = N * H * W may pass 2^31 while the tile index t stays int32."""
    n = t // tiles_per_n
    s0 = (t - n * tiles_per_n).to(tl.int64) * BLOCK_S
    # Positions left in the row, at most BLOCK_S: the mask compares in int32.
    n_valid = tl.minimum(S - s0, BLOCK_S).to(tl.int32)
    s = s0 + tl.arange(0, BLOCK_S)
    mask = c_mask[:, None] & (tl.arange(0, BLOCK_S) < n_valid)[None, :]
    offs = n.to(tl.int64) * stride_n + c_off[:, None] + s[None, :] * stride_s
    return offs, mask, n_valid


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def bn_stats_partial_kernel(
    x_ptr, part_ptr, shift_ptr,
    C, S, stride_n, stride_c, stride_s,
    tiles_per_n, tiles_per_split, n_tiles, n_splits, part_field_stride,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per (split, channel): count, mean and M2 (sum of squared deviations) of x.

    x_ptr: input, strided (N, C, S) view (strides stride_n, stride_c, stride_s, in elements).
    part_ptr: [3, P, C] acc, contiguous; field f of split p, channel c at
        f * part_field_stride + p * C + c (part_field_stride = P * C); fields count,
        mean - shift, M2.
    shift_ptr: [C] acc: the shift (x[0, c, 0]) of each channel, written by split 0. Partial
        means stay relative to it, so merging them never rounds a large offset.
    grid: (n_splits * cdiv(C, BLOCK_C),), program = channel block * n_splits + split (1-D: no
    65535 limit on either count). tiles_per_n = cdiv(S, BLOCK_S); n_tiles = N * tiles_per_n;
    tiles_per_split: tiles each split reduces (the last split may get fewer, or none).
    Numerics: values are shifted by the channel's first element; each tile's mean and M2
    come from two passes over registers (exact centring), then the tile joins the running
    (count, mean, M2) by Chan's parallel formula — stable for data with a large mean
    (x = 100 + 0.01 * randn keeps its variance in fp32).
    Bytes per element: one read of x (elem_size); partials and shifts are O(P * C).
    """
    pid = tl.program_id(0)
    pid_c = pid // n_splits
    pid_p = pid - pid_c * n_splits
    acc_ty = part_ptr.dtype.element_ty
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c_off = c.to(tl.int64) * stride_c
    # Every program of a channel shifts by the same value, the channel's first element: data
    # far from zero (100 + 0.01 * randn) then sums exactly-subtracted small numbers, so the
    # tile means carry no rounding of the large offset into M2.
    shift = tl.load(x_ptr + c_off, mask=c_mask, other=0.0).to(acc_ty)
    count = tl.zeros([BLOCK_C], dtype=acc_ty)
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    t_begin = pid_p * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        offs, mask, n_valid = _tile(t, tiles_per_n, S, c_off, c_mask, stride_n, stride_s,
                                    BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        x = tl.where(mask, x - shift[:, None], 0.0)
        tile_count = n_valid.to(acc_ty)
        tile_mean = tl.sum(x, axis=1) / tile_count
        centred = tl.where(mask, x - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=1)
        # Chan et al.: merge (count, mean, m2) with (tile_count, tile_mean, tile_m2).
        new_count = count + tile_count
        frac = tile_count / new_count
        delta = tile_mean - mean
        mean = mean + delta * frac
        m2 = m2 + tile_m2 + delta * delta * count * frac
        count = new_count
    out = part_ptr + pid_p * C + c
    tl.store(out, count, mask=c_mask)
    tl.store(out + part_field_stride, mean, mask=c_mask)
    tl.store(shift_ptr + c, shift, mask=mask_if(c_mask, pid_p == 0))
    tl.store(out + 2 * part_field_stride, m2, mask=c_mask)


@triton.jit(do_not_specialize=_MERGE_RUNTIME_INTS + ["has_shift", "final",
                                               "update_running", "cumulative", "write_count"])
def bn_merge_stats_kernel(
    part_ptr, n_parts, C, part_stride, field_stride, shift_ptr, has_shift,
    out0_ptr, out1_ptr, out2_ptr,
    running_mean_ptr, running_var_ptr, nbt_ptr, momentum_hi, momentum_lo, eps_hi, eps_lo,
    final, update_running, cumulative, write_count,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge per-part (count, mean, M2) in increasing part order; optionally finish BN stats.

    part_ptr: acc; part p, field f (0 count, 1 mean, 2 M2), channel c at
        p * part_stride + f * field_stride + c. Serves the split partials ([3, P, C]:
        part_stride C, field_stride P * C) and all-gathered per-rank stats ([R, 3, C]:
        part_stride 3C, field_stride C). Parts with count 0 contribute nothing.
    shift_ptr: [C] acc, read if has_shift: part means are relative to it (split partials);
        the merged mean adds it back once.
    Chunks of BLOCK_P parts merge with the exact multi-way formula
        n = sum n_i, mean = sum n_i mean_i / n, M2 = sum (M2_i + n_i (mean_i - mean)^2),
    and chunks join the running result by Chan's pairwise formula, in order.
    final == 0: out0/out1/out2 [C] acc receive count, mean, M2 (a rank's local statistics).
    final != 0: out0 = mean, out1 = invstd = 1/sqrt(M2/count + eps) and, if write_count, out2 =
        count; if update_running, running_mean/var [C] acc are updated in place with factor
        `momentum`, or 1/num_batches_tracked (nbt_ptr: int64 [1], read on the device) if
        cumulative; running_var receives the unbiased variance M2/(count - 1).
    momentum, eps: host floats as fp32 pairs hi + lo (see _host_float).
    grid: (cdiv(C, BLOCK_C),). Bytes: O(parts * C), independent of the input size.
    """
    pid = tl.program_id(0)
    acc_ty = part_ptr.dtype.element_ty
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = tl.zeros([BLOCK_C], dtype=acc_ty)
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < n_parts)[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * part_stride + c[None, :]
        pc = tl.load(part_ptr + offs, mask=mask, other=0.0)
        pm = tl.load(part_ptr + field_stride + offs, mask=mask, other=0.0)
        pm2 = tl.load(part_ptr + 2 * field_stride + offs, mask=mask, other=0.0)
        chunk_count = tl.sum(pc, axis=0)
        # Counts are whole numbers: max(count, 1) only guards the all-empty case.
        chunk_mean = tl.sum(pc * pm, axis=0) / tl.maximum(chunk_count, 1.0)
        dev = tl.where(pc > 0, pm - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(pm2 + pc * dev * dev, axis=0)
        new_count = count + chunk_count
        frac = chunk_count / tl.maximum(new_count, 1.0)
        delta = chunk_mean - mean
        mean = mean + delta * frac
        m2 = m2 + chunk_m2 + delta * delta * count * frac
        count = new_count
    mean += tl.load(shift_ptr + c, mask=mask_if(c_mask, has_shift), other=0.0)
    if final != 0:
        eps = _host_float(eps_hi, eps_lo, acc_ty)
        invstd = _inv_sqrt(m2 / tl.maximum(count, 1.0) + eps)
        tl.store(out0_ptr + c, mean, mask=c_mask)
        tl.store(out1_ptr + c, invstd, mask=c_mask)
        if write_count != 0:
            tl.store(out2_ptr + c, count, mask=c_mask)
        if update_running != 0:
            factor = _host_float(momentum_hi, momentum_lo, acc_ty)
            if cumulative != 0:
                factor = 1.0 / tl.load(nbt_ptr).to(acc_ty)
            running_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0)
            running_var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0)
            unbiased = m2 / (count - 1.0)
            tl.store(running_mean_ptr + c, (1.0 - factor) * running_mean + factor * mean,
                     mask=c_mask)
            tl.store(running_var_ptr + c, (1.0 - factor) * running_var + factor * unbiased,
                     mask=c_mask)
    else:
        tl.store(out0_ptr + c, count, mask=c_mask)
        tl.store(out1_ptr + c, mean, mask=c_mask)
        tl.store(out2_ptr + c, m2, mask=c_mask)


@triton.jit
def _channel_affine(mean_ptr, scale_ptr, weight_ptr, c, c_mask, eps_hi, eps_lo, scale_is_var,
                    has_weight):
    """Per-channel mean, invstd and weight * invstd (acc dtype)."""
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=1.0)
    # scale holds invstd (batch statistics) or a variance (running statistics).
    eps = _host_float(eps_hi, eps_lo, scale.dtype)
    invstd = tl.where(scale_is_var != 0, _inv_sqrt(scale + eps), scale)
    w = tl.load(weight_ptr + c, mask=mask_if(c_mask, has_weight), other=1.0)
    return mean, invstd, w * invstd


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["scale_is_var", "has_weight", "has_bias"])
def bn_apply_kernel(
    x_ptr, y_ptr, mean_ptr, scale_ptr, weight_ptr, bias_ptr,
    C, S, stride_n, stride_c, stride_s, tiles_per_n, n_tiles, eps_hi, eps_lo,
    scale_is_var, has_weight, has_bias,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """y = (x - mean) * invstd * weight + bias, one tile per program.

    x_ptr, y_ptr: (N, C, S) views sharing the strides stride_n/c/s; y in x's dtype.
    mean_ptr, scale_ptr: [C] acc; scale is invstd, or a variance if scale_is_var
        (eval: invstd = 1/sqrt(running_var + eps), eps = eps_hi + eps_lo: see _host_float).
        weight_ptr, bias_ptr: [C] acc, read only if has_weight / has_bias (otherwise any acc
        pointer).
    grid: (n_tiles * cdiv(C, BLOCK_C),), program = channel block * n_tiles + tile;
    n_tiles = N * tiles_per_n.
    Bytes per element: read x + write y = 2 * elem_size.
    """
    pid = tl.program_id(0)
    pid_c = pid // n_tiles
    t = pid - pid_c * n_tiles
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, invstd, a = _channel_affine(mean_ptr, scale_ptr, weight_ptr, c, c_mask, eps_hi,
                                      eps_lo, scale_is_var, has_weight)
    b = tl.load(bias_ptr + c, mask=mask_if(c_mask, has_bias), other=0.0) - mean * a
    offs, mask, n_valid = _tile(t, tiles_per_n, S, c.to(tl.int64) * stride_c, c_mask, stride_n,
                                stride_s, BLOCK_S)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(a.dtype)
    y = x * a[:, None] + b[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["scale_is_var"])
def bn_bwd_partial_kernel(
    x_ptr, dy_ptr, mean_ptr, scale_ptr, part_ptr,
    C, S, stride_n, stride_c, stride_s,
    tiles_per_n, tiles_per_split, n_tiles, n_splits, part_field_stride, eps_hi, eps_lo,
    scale_is_var, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per (split, channel): sum(dy) and sum(dy * x_hat), x_hat = (x - mean) * invstd.

    x_ptr, dy_ptr: (N, C, S) views sharing strides. mean_ptr, scale_ptr: [C] acc (scale as in
    bn_apply_kernel, eps as eps_hi + eps_lo). part_ptr: [2, P, C] acc (field stride P * C):
    sum_dy, sum_dy_xhat.
    Tiling and grid as bn_stats_partial_kernel. Accumulates elementwise in acc registers and
    reduces the tile axis once at the end; invstd is applied once per channel.
    Bytes per element: read x + read dy = 2 * elem_size.
    """
    pid = tl.program_id(0)
    pid_c = pid // n_splits
    pid_p = pid - pid_c * n_splits
    acc_ty = part_ptr.dtype.element_ty
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c_off = c.to(tl.int64) * stride_c
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=1.0)
    eps = _host_float(eps_hi, eps_lo, acc_ty)
    invstd = tl.where(scale_is_var != 0, _inv_sqrt(scale + eps), scale)
    sum_dy = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
    sum_dy_xmu = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
    t_begin = pid_p * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        offs, mask, n_valid = _tile(t, tiles_per_n, S, c_off, c_mask, stride_n, stride_s,
                                    BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        sum_dy += dy
        sum_dy_xmu += dy * (x - mean[:, None])
    out = part_ptr + pid_p * C + c
    tl.store(out, tl.sum(sum_dy, axis=1), mask=c_mask)
    tl.store(out + part_field_stride, tl.sum(sum_dy_xmu, axis=1) * invstd, mask=c_mask)


@triton.jit(do_not_specialize=_MERGE_RUNTIME_INTS + ["write_grads"])
def bn_bwd_merge_kernel(
    part_ptr, n_parts, C, part_stride, field_stride,
    sums_ptr, grad_weight_ptr, grad_bias_ptr, write_grads,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum per-part (sum_dy, sum_dy_xhat) in a fixed order.

    part_ptr: acc; part p, field f, channel c at p * part_stride + f * field_stride + c.
    sums_ptr: [2, C] acc, contiguous: sum_dy then sum_dy_xhat (the dx kernel's input; what
        SyncBatchNorm all-reduces). If write_grads: grad_bias = sum_dy and
        grad_weight = sum_dy_xhat ([C] acc each).
    grid: (cdiv(C, BLOCK_C),). Bytes: O(parts * C).
    """
    pid = tl.program_id(0)
    acc_ty = part_ptr.dtype.element_ty
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sum_dy = tl.zeros([BLOCK_C], dtype=acc_ty)
    sum_dy_xhat = tl.zeros([BLOCK_C], dtype=acc_ty)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < n_parts)[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * part_stride + c[None, :]
        sum_dy += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=0)
        sum_dy_xhat += tl.sum(tl.load(part_ptr + field_stride + offs, mask=mask, other=0.0),
                              axis=0)
    tl.store(sums_ptr + c, sum_dy, mask=c_mask)
    tl.store(sums_ptr + C + c, sum_dy_xhat, mask=c_mask)
    if write_grads != 0:
        tl.store(grad_bias_ptr + c, sum_dy, mask=c_mask)
        tl.store(grad_weight_ptr + c, sum_dy_xhat, mask=c_mask)


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["count", "scale_is_var", "has_weight",
                                               "training", "count_from_ptr"])
def bn_bwd_dx_kernel(
    x_ptr, dy_ptr, dx_ptr, mean_ptr, scale_ptr, weight_ptr, sums_ptr, count_ptr, count,
    C, S, stride_n, stride_c, stride_s, tiles_per_n, n_tiles, eps_hi, eps_lo,
    scale_is_var, has_weight, training, count_from_ptr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx = w * invstd / m * (m * dy - sum_dy - x_hat * sum_dy_xhat), one tile per program.

    Folded per channel into dx = a * dy + q * (x - mean) + r with a = w * invstd,
    q = -a * invstd * sum_dy_xhat / m and r = -a * sum_dy / m (a subtraction and two
    FMAs per element). x - mean is centred before the multiply: folding q * mean into r
    would cancel q * x against it and lose the digits of a large mean (x = 100 + 0.01 * randn).
    Eval (training == 0): statistics are constants, dx = a * dy and x is not read.
    x_ptr, dy_ptr, dx_ptr: (N, C, S) views sharing strides; dx in x's dtype.
    mean_ptr, scale_ptr, weight_ptr: [C] acc as in bn_apply_kernel. sums_ptr: [2, C] acc
    (sum_dy, sum_dy_xhat) from bn_bwd_merge_kernel (all-reduced for SyncBatchNorm).
    m: `count` (an integer: exact, unlike a Python float, which compiled Triton passes as
    fp32), or count_ptr [C] acc if count_from_ptr (a global count that only exists on the
    device, SyncBatchNorm). eps = eps_hi + eps_lo (see _host_float).
    grid: as bn_apply_kernel.
    Bytes per element: training: read x + read dy + write dx = 3 * elem_size; eval: 2 * elem_size.
    """
    pid = tl.program_id(0)
    pid_c = pid // n_tiles
    t = pid - pid_c * n_tiles
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, invstd, a = _channel_affine(mean_ptr, scale_ptr, weight_ptr, c, c_mask, eps_hi,
                                      eps_lo, scale_is_var, has_weight)
    acc_ty = a.dtype
    stat_mask = mask_if(c_mask, training)
    m = tl.load(count_ptr + c, mask=mask_if(stat_mask, count_from_ptr), other=0.0).to(acc_ty)
    m = tl.where(count_from_ptr != 0, m, tl.cast(count, acc_ty))
    m = tl.maximum(m, 1.0)
    sum_dy = tl.load(sums_ptr + c, mask=stat_mask, other=0.0)
    sum_dy_xhat = tl.load(sums_ptr + C + c, mask=stat_mask, other=0.0)
    q = -a * invstd * sum_dy_xhat / m
    r = -a * sum_dy / m
    offs, mask, n_valid = _tile(t, tiles_per_n, S, c.to(tl.int64) * stride_c, c_mask, stride_n,
                                stride_s, BLOCK_S)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    # In eval q = r = 0 and the masked-off load of x touches no memory.
    x = tl.load(x_ptr + offs, mask=mask_if(mask, training), other=0.0).to(acc_ty)
    dx = a[:, None] * dy + q[:, None] * (x - mean[:, None]) + r[:, None]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
