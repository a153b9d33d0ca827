"""BatchNorm device code: split per-channel reductions merged in a fixed order by the last
program, and elementwise passes with a fused residual add and activation.

The math (per channel c, over the m = N * prod(spatial) values x_i of that channel):

    forward    mean = sum x_i / m,  var = sum (x_i - mean)^2 / m,  invstd = 1 / sqrt(var + eps)
               x_hat = (x - mean) * invstd,  z = weight * x_hat + bias [+ residual]
               y = act(z)
               running_mean <- (1 - f) running_mean + f mean
               running_var  <- (1 - f) running_var  + f var * m / (m - 1)
               (f = momentum, or 1 / num_batches_tracked for the cumulative average)
    backward   g = dL/dz = dy * act'(z)   (z recomputed from x and the saved statistics:
               the pre-activation is never stored)
               dbias = sum g,  dweight = sum g * x_hat,  dresidual = g
               dx = weight * invstd / m * (m g - sum g - x_hat * sum g * x_hat)

Statistics use Welford's update per lane of a tile (each register lane keeps its own count,
mean and M2 of the values it saw, shifted by the channel's first element) and merge lanes
once per program, then programs' partials in increasing split order (exact multi-way merge
within chunks, Chan's pairwise formula between chunks). Training moves the data four times
(forward: read x for the statistics, read x + write y; backward: read x + dy for the two
sums, read x + dy + write dx), plus one read of the residual in forward, and with an
activation one read of the residual in each backward pass and a write of its gradient.

Every data tensor is addressed as a strided (N, C, S) view: element (n, c, s) lives at
``n * stride_n + c * stride_c + s * stride_s`` (int64 arithmetic). The launcher collapses the
spatial dims into S, and when n and s step through memory uniformly (channels_last, or S == 1)
it folds N into S as well, so the kernels see N == 1 and one long row index. One of
``stride_s`` / ``stride_c`` is 1 (the launcher guarantees it): Triton specialises that stride
to the constant 1, the pointer becomes contiguous along that axis of the [BLOCK_C, BLOCK_S]
tile, and the coalescing pass orders the tile's layout accordingly — the same source serves
NCHW (spatial-inner) and channels_last (channel-inner) without transposing copies. The data
tensors of one launch (x, dy, residual, outputs) share those strides.

A *tile* is [BLOCK_C channels, BLOCK_S spatial positions of one n]. Tiles of a channel block
are numbered t = n * tiles_per_n + s_block. Reductions give each program (split p, channel
block) the contiguous tile range [p * tiles_per_split, (p + 1) * tiles_per_split) and write one
partial per (p, channel); then each program takes an integer ticket on its channel block's
counter, and the program that draws the last ticket merges every partial of the block in
increasing p and resets the counter for the next launch. The result depends only on the split
count, never on scheduling: deterministic, no float atomics. (Triton's interpreter runs
programs in order, so there the last program is always the one that merges.)

*Flat* tiles (constexpr FLAT_C = C > 0; the launcher picks them for C <= 8 when channels
are innermost and positions step by exactly C, so each sample's positions x channels are one
contiguous run): a tile covers positions [s0, s0 + BLOCK_S) of one n, i.e. the C * BLOCK_S
elements from n * stride_n + s0 * C, held in [BLOCK_C = next_pow2(C), BLOCK_S] lanes where
lane (j, i) holds flat element f = j * BLOCK_S + i (lanes with f >= C * BLOCK_S, the padded
rows, are masked whole). Contiguous along i, every load and store is a 16-byte vector, and
lane (j, i)'s channel f % C is the same in every tile (tiles start at multiples of C). The
reductions keep per-lane accumulators exactly as the channel-inner tiles do and merge them
per channel once (a static loop over the C channels); the elementwise passes build each
lane's per-channel constants once per program by a static select over the C channels.
Tiling, grids, splits and merges are otherwise the same (one channel block).

Elementwise passes can visit tiles in reverse program order (``reverse``): the reduction
before them ended with the highest channel blocks and tiles, which are then still in L2.

"acc" below is the accumulation dtype: float32, or float64 for float64 input. It is read from
the element type of a statistics pointer, which the launcher allocates in that dtype.
Integer flags that are not strides are runtime values (``do_not_specialize``) so that a flag
or a size equal to 1 does not produce another compiled variant; the activation is a
constexpr (each is a different instruction sequence).
"""

import triton
import triton.language as tl

from ._compat import mask_if

# Activation codes (constexpr ACTIVATION); the launcher maps names to them.
ACT_IDENTITY: tl.constexpr = tl.constexpr(0)
ACT_RELU: tl.constexpr = tl.constexpr(1)
ACT_SILU: tl.constexpr = tl.constexpr(2)
ACT_GELU: tl.constexpr = tl.constexpr(3)
ACT_GELU_TANH: tl.constexpr = tl.constexpr(4)
ACT_LEAKY_RELU: tl.constexpr = tl.constexpr(5)
ACT_HARDSWISH: tl.constexpr = tl.constexpr(6)

# Integer arguments never specialised on their value (equal to 1, or divisible by 16): tile
# counts and part counts gain nothing from it. C and S stay specialisable: divisibility of
# the inner extent by 16 is what lets the masked loads along it become 16-byte vectors.
_RUNTIME_INTS = ["tiles_per_n", "tiles_per_split", "n_tiles", "n_splits"]
_FLAGS = ["scale_is_var", "has_weight", "has_bias", "has_residual", "reverse"]


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


@triton.jit
def _flat_lanes(FLAT_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(f, ch) of a flat tile: lane (j, i) of [BLOCK_C, BLOCK_S] holds the tile's flat element
    f = j * BLOCK_S + i (int32), of channel ch = f % FLAT_C. A tile starts at a multiple of
    FLAT_C elements, so a lane's channel is the same in every tile. When FLAT_C divides
    BLOCK_S (C = 1, 2, 4, 8) the channel depends on i alone and ch is one row [1, BLOCK_S]
    (per-lane parameters are then computed once per row, not per element)."""
    i = tl.arange(0, BLOCK_S)[None, :]
    f = tl.arange(0, BLOCK_C)[:, None] * BLOCK_S + i
    if BLOCK_S % FLAT_C == 0:
        ch = i % FLAT_C
    else:
        ch = f % FLAT_C
    return f, ch


@triton.jit
def _flat_tile(t, tiles_per_n, S, f, stride_n, FLAT_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets (int64) and mask of flat tile ``t``: positions [s0, s0 + BLOCK_S) of sample n,
    i.e. the FLAT_C * BLOCK_S contiguous elements from n * stride_n + s0 * FLAT_C (channels
    innermost, stride_c = 1, stride_s = FLAT_C). Lanes with f >= FLAT_C * n_valid (the rows
    j >= FLAT_C of a padded tile, and the end of a sample) are masked. The mask compares in
    int32 against a multiple of 16 when S is one, so 16-byte vectors stay whole."""
    n = t // tiles_per_n
    s0 = (t - n * tiles_per_n).to(tl.int64) * BLOCK_S
    n_valid = tl.minimum(S - s0, BLOCK_S).to(tl.int32)
    offs = n.to(tl.int64) * stride_n + s0 * FLAT_C + f
    return offs, f < n_valid * FLAT_C


@triton.jit
def _lanes_sum(v, ch, k: tl.constexpr):
    """Sum of v [BLOCK_C, BLOCK_S] over the lanes of channel k (ch == k) of a flat tile."""
    return tl.sum(tl.sum(tl.where(ch == k, v, 0.0), axis=1), axis=0)


@triton.jit
def _tanh(u):
    # tanh from one exp, odd-symmetric: no overflow for large |u|.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _act(z, slope, ACTIVATION: tl.constexpr):
    """act(z) in z's dtype; slope: leaky_relu's negative slope (acc dtype), else unused.
    NaN stays NaN, as in torch."""
    if ACTIVATION == ACT_RELU:
        y = tl.where(z < 0, 0.0, z)
    elif ACTIVATION == ACT_SILU:
        y = z * tl.sigmoid(z)
    elif ACTIVATION == ACT_GELU:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == ACT_GELU_TANH:
        y = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == ACT_LEAKY_RELU:
        y = tl.where(z < 0, z * slope, z)
    elif ACTIVATION == ACT_HARDSWISH:
        y = z * (tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0)
    else:
        y = z
    return y


@triton.jit
def _act_grad(z, g, slope, ACTIVATION: tl.constexpr):
    """g * act'(z), with torch's conventions at the kinks (relu' (0) = 0, leaky_relu' (0) =
    slope, hardswish' = 0 below -3, z / 3 + 1 / 2 on [-3, 3], 1 above)."""
    if ACTIVATION == ACT_RELU:
        d = tl.where(z <= 0, 0.0, g)
    elif ACTIVATION == ACT_SILU:
        s = tl.sigmoid(z)
        d = g * (s * (1.0 + z * (1.0 - s)))
    elif ACTIVATION == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d = g * (cdf + z * pdf)
    elif ACTIVATION == ACT_GELU_TANH:
        # d/dz of 0.5 z (1 + tanh(k (z + 0.044715 z^3))), k = sqrt(2 / pi).
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        d = g * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654
                 * (1.0 + 0.134145 * z * z))
    elif ACTIVATION == ACT_LEAKY_RELU:
        d = tl.where(z > 0, g, g * slope)
    elif ACTIVATION == ACT_HARDSWISH:
        d = tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, g * (z / 3.0 + 0.5), g))
    else:
        d = g
    return d


@triton.jit
def _channel_affine(mean_ptr, scale_ptr, weight_ptr, bias_ptr, c, c_mask, eps, scale_is_var,
                    has_weight, has_bias):
    """Per-channel mean, invstd, a = weight * invstd and bias (acc dtype). scale holds invstd
    (batch statistics) or a variance (running statistics, scale_is_var)."""
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=1.0)
    invstd = tl.where(scale_is_var != 0, _inv_sqrt(scale + eps), scale)
    w = tl.load(weight_ptr + c, mask=mask_if(c_mask, has_weight), other=1.0)
    b = tl.load(bias_ptr + c, mask=mask_if(c_mask, has_bias), other=0.0)
    return mean, invstd, w * invstd, b


@triton.jit
def _elementwise_tile(n_tiles, reverse, BLOCK_C: tl.constexpr):
    """(channel index vector, tile index) of this program of an elementwise pass; programs
    = channel block * n_tiles + tile, taken from the end if ``reverse``."""
    pid = tl.program_id(0)
    pid = tl.where(reverse != 0, tl.num_programs(0) - 1 - pid, pid)
    pid_c = pid // n_tiles
    t = pid - pid_c * n_tiles
    return pid_c * BLOCK_C + tl.arange(0, BLOCK_C), t


@triton.jit
def _last_ticket(ticket_ptr, pid_c, n_splits):
    """True in the program that finishes its channel block's reduction last. Every program's
    partial stores are made visible (barrier, then release) before its ticket; the winner
    acquires them and resets the counter for the next launch."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + pid_c, 1, sem="acq_rel", scope="gpu")
    return ticket == n_splits - 1


@triton.jit
def _merge_parts(part_ptr, n_parts, part_stride, field_stride, c, c_mask, acc_ty: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean, M2) [BLOCK_C] merged over parts 0..n_parts-1 in increasing order.

    part p, field f (0 count, 1 mean, 2 M2), channel c at p * part_stride + f * field_stride
    + c. Chunks of BLOCK_P parts merge with the exact multi-way formula
        n = sum n_i, mean = sum n_i mean_i / n, M2 = sum (M2_i + n_i (mean_i - mean)^2),
    chunks join the running result by Chan's pairwise formula. Parts with count 0 contribute
    nothing. Loads bypass L1 (.cg): the parts may come from other programs of this launch."""
    count = tl.zeros([BLOCK_C], dtype=acc_ty)
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < n_parts)[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * part_stride + c[None, :]
        pc = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        pm = tl.load(part_ptr + field_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
        pm2 = tl.load(part_ptr + 2 * field_stride + offs, mask=mask, other=0.0,
                      cache_modifier=".cg")
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
    return count, mean, m2


@triton.jit
def _finish_stats(count, mean, m2, c, c_mask, out_ptr, out_stride, running_mean_ptr,
                  running_var_ptr, nbt_ptr, momentum, eps, update_running, cumulative):
    """From merged (count, mean, M2): out[0] = mean, out[1] = invstd = 1/sqrt(M2/count + eps)
    (out field f of channel c at f * out_stride + c); running
    buffers updated in place with factor momentum, or 1 / num_batches_tracked (nbt_ptr: int64
    [1], read on the device) if cumulative; running_var receives the unbiased M2/(count - 1)."""
    acc_ty = mean.dtype
    invstd = _inv_sqrt(m2 / tl.maximum(count, 1.0) + eps)
    tl.store(out_ptr + c, mean, mask=c_mask)
    tl.store(out_ptr + out_stride + c, invstd, mask=c_mask)
    if update_running != 0:
        factor = momentum
        if cumulative != 0:
            factor = 1.0 / tl.load(nbt_ptr).to(acc_ty)
        running_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0)
        running_var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0)
        unbiased = m2 / (count - 1.0)
        tl.store(running_mean_ptr + c, (1.0 - factor) * running_mean + factor * mean,
                 mask=c_mask)
        tl.store(running_var_ptr + c, (1.0 - factor) * running_var + factor * unbiased,
                 mask=c_mask)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _flat_welford(x_ptr, t_begin, t_end, tiles_per_n, S, stride_n, c, acc_ty: tl.constexpr,
                  FLAT_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean - shift, M2) [BLOCK_C] per channel c of flat tiles t_begin..t_end-1 (see
    _flat_tile): each lane keeps its own Welford state (its channel never changes), shifted
    by its channel's first element; lanes merge per channel once at the end (exact
    multi-way formula, a static loop over the FLAT_C channels)."""
    f, ch = _flat_lanes(FLAT_C, BLOCK_C, BLOCK_S)
    lane_shift = tl.load(x_ptr + ch).to(acc_ty)
    lane_count = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
    lane_mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
    lane_m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
    for t in range(t_begin, t_end):
        offs, mask = _flat_tile(t, tiles_per_n, S, f, stride_n, FLAT_C, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty) - lane_shift
        lane_count += tl.where(mask, 1.0, 0.0)
        delta = x - lane_mean
        lane_mean += tl.where(mask, delta / tl.maximum(lane_count, 1.0), 0.0)
        lane_m2 += tl.where(mask, delta * (x - lane_mean), 0.0)
    count = tl.zeros([BLOCK_C], dtype=acc_ty)
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    for k in tl.static_range(FLAT_C):
        count_k = _lanes_sum(lane_count, ch, k)
        mean_k = _lanes_sum(lane_count * lane_mean, ch, k) / tl.maximum(count_k, 1.0)
        dev = lane_mean - mean_k
        m2_k = _lanes_sum(lane_m2 + lane_count * dev * dev, ch, k)
        count = tl.where(c == k, count_k, count)
        mean = tl.where(c == k, mean_k, mean)
        m2 = tl.where(c == k, m2_k, m2)
    return count, mean, m2




@triton.jit(do_not_specialize=_RUNTIME_INTS + ["final", "update_running", "cumulative"])
def bn_stats_kernel(
    x_ptr, part_ptr, ticket_ptr, out_ptr, running_mean_ptr, running_var_ptr, nbt_ptr,
    C, S, stride_n, stride_c, stride_s,
    tiles_per_n, tiles_per_split, n_tiles, n_splits, part_field_stride,
    momentum_hi, momentum_lo, eps_hi, eps_lo, final, update_running, cumulative,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
    FLAT_C: tl.constexpr = 0,
):
    """Batch statistics of x per channel in one launch: split partials, merged by the last
    program of each channel block.

    x_ptr: input, strided (N, C, S) view (strides stride_n, stride_c, stride_s, in elements).
    part_ptr: [3, P, C] acc workspace; field f of split p, channel c at
        f * part_field_stride + p * C + c (part_field_stride = P * C): count, mean - shift, M2.
    ticket_ptr: int32 [>= cdiv(C, BLOCK_C)], zero on entry, left zero on exit.
    out_ptr: final != 0: [2, C] acc, mean then invstd, and the running buffers
        (running_mean_ptr/running_var_ptr [C] acc, nbt_ptr int64 [1]) updated as in
        _finish_stats if update_running (cumulative: factor 1 / num_batches_tracked);
        final == 0: [3, C] acc, count, mean, M2 (a rank's local statistics, SyncBatchNorm).
    momentum, eps: host floats as fp32 pairs hi + lo (see _host_float).
    grid: (n_splits * cdiv(C, BLOCK_C),), program = channel block * n_splits + split (1-D: no
    65535 limit on either count). tiles_per_n = cdiv(S, BLOCK_S); n_tiles = N * tiles_per_n;
    tiles_per_split: tiles each split reduces (the last split may get fewer). BLOCK_P: parts
    per merge step. FLAT_C: 0 (tiles [BLOCK_C channels, BLOCK_S positions]) or C (flat
    tiles, see the module docstring; stride_c = 1, stride_s = C, BLOCK_C = next_pow2(C)).
    Numerics: values are shifted by the channel's first element (every program reads the same
    one), so data with a large mean (100 + 0.01 * randn) accumulates small numbers; each lane
    runs Welford's update over its own values (no cross-lane reduction, hence no barrier,
    inside the loop); lanes merge once, exactly, at the end.
    Bytes per element: one read of x (elem_size); partials O(P * C).
    """
    pid = tl.program_id(0)
    pid_c = pid // n_splits
    pid_p = pid - pid_c * n_splits
    acc_ty = part_ptr.dtype.element_ty
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c_off = c.to(tl.int64) * stride_c
    shift = tl.load(x_ptr + c_off, mask=c_mask, other=0.0).to(acc_ty)
    t_begin = pid_p * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    if FLAT_C > 0:
        count, mean, m2 = _flat_welford(x_ptr, t_begin, t_end, tiles_per_n, S, stride_n, c,
                                        acc_ty, FLAT_C, BLOCK_C, BLOCK_S)
    else:
        lane_count = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
        lane_mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
        lane_m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
        for t in range(t_begin, t_end):
            offs, mask, n_valid = _tile(t, tiles_per_n, S, c_off, c_mask, stride_n, stride_s,
                                        BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty) - shift[:, None]
            lane_count += tl.where(mask, 1.0, 0.0)
            delta = x - lane_mean
            lane_mean += tl.where(mask, delta / tl.maximum(lane_count, 1.0), 0.0)
            lane_m2 += tl.where(mask, delta * (x - lane_mean), 0.0)
        # Lanes merge exactly (multi-way formula); empty lanes have count 0 and contribute
        # nothing.
        count = tl.sum(lane_count, axis=1)
        mean = tl.sum(lane_count * lane_mean, axis=1) / tl.maximum(count, 1.0)
        dev = lane_mean - mean[:, None]
        m2 = tl.sum(lane_m2 + lane_count * dev * dev, axis=1)
    out = part_ptr + pid_p * C + c
    tl.store(out, count, mask=c_mask)
    tl.store(out + part_field_stride, mean, mask=c_mask)
    tl.store(out + 2 * part_field_stride, m2, mask=c_mask)
    if _last_ticket(ticket_ptr, pid_c, n_splits):
        count, mean, m2 = _merge_parts(part_ptr, n_splits, C, part_field_stride, c, c_mask,
                                       acc_ty, BLOCK_P, BLOCK_C)
        mean += shift
        if final != 0:
            _finish_stats(count, mean, m2, c, c_mask, out_ptr, C, running_mean_ptr,
                          running_var_ptr, nbt_ptr, _host_float(momentum_hi, momentum_lo,
                                                                acc_ty),
                          _host_float(eps_hi, eps_lo, acc_ty), update_running, cumulative)
        else:
            tl.store(out_ptr + c, count, mask=c_mask)
            tl.store(out_ptr + C + c, mean, mask=c_mask)
            tl.store(out_ptr + 2 * C + c, m2, mask=c_mask)
        tl.store(ticket_ptr + pid_c, 0)


@triton.jit(do_not_specialize=["n_parts", "C", "part_stride", "field_stride", "update_running",
                               "cumulative", "write_count"])
def bn_merge_final_kernel(
    part_ptr, n_parts, C, part_stride, field_stride, out_ptr,
    running_mean_ptr, running_var_ptr, nbt_ptr, momentum_hi, momentum_lo, eps_hi, eps_lo,
    update_running, cumulative, write_count,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Global statistics from per-rank (count, mean, M2) (SyncBatchNorm's all-gathered
    [R, 3, C]: part_stride 3C, field_stride C), merged in rank order (_merge_parts), then
    finished as _finish_stats: out_ptr [3, C] acc = mean, invstd and, if write_count, count;
    running buffers updated if update_running.
    grid: (cdiv(C, BLOCK_C),). Bytes: O(ranks * C), independent of the input size.
    """
    pid = tl.program_id(0)
    acc_ty = part_ptr.dtype.element_ty
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count, mean, m2 = _merge_parts(part_ptr, n_parts, part_stride, field_stride, c, c_mask,
                                   acc_ty, BLOCK_P, BLOCK_C)
    _finish_stats(count, mean, m2, c, c_mask, out_ptr, C, running_mean_ptr, running_var_ptr,
                  nbt_ptr, _host_float(momentum_hi, momentum_lo, acc_ty),
                  _host_float(eps_hi, eps_lo, acc_ty), update_running, cumulative)
    tl.store(out_ptr + 2 * C + c, count, mask=mask_if(c_mask, write_count))


@triton.jit(do_not_specialize=_RUNTIME_INTS + _FLAGS)
def bn_apply_kernel(
    x_ptr, res_ptr, y_ptr, mean_ptr, scale_ptr, weight_ptr, bias_ptr,
    C, S, stride_n, stride_c, stride_s, tiles_per_n, n_tiles, eps_hi, eps_lo, slope_hi,
    slope_lo, scale_is_var, has_weight, has_bias, has_residual, reverse,
    ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    FLAT_C: tl.constexpr = 0,
):
    """y = act((x - mean) * invstd * weight + bias + residual), one tile per program.

    x_ptr, res_ptr, y_ptr: (N, C, S) views sharing the strides stride_n/c/s, x's dtype;
        res_ptr read only if has_residual (otherwise any pointer of that dtype).
    mean_ptr, scale_ptr: [C] acc; scale is invstd, or a variance if scale_is_var
        (eval: invstd = 1/sqrt(running_var + eps), eps = eps_hi + eps_lo: see _host_float).
    weight_ptr, bias_ptr: [C] acc, read only if has_weight / has_bias.
    ACTIVATION: one of the ACT_* codes; slope_hi + slope_lo: leaky_relu's negative slope.
    grid: (n_tiles * cdiv(C, BLOCK_C),), program = channel block * n_tiles + tile (counted
    from the end if reverse); n_tiles = N * tiles_per_n. FLAT_C: as bn_stats_kernel.
    Bytes per element: read x + write y = 2 * elem_size, + elem_size with a residual.
    """
    c, t = _elementwise_tile(n_tiles, reverse, BLOCK_C)
    c_mask = c < C
    acc_ty = mean_ptr.dtype.element_ty
    eps = _host_float(eps_hi, eps_lo, acc_ty)
    if FLAT_C > 0:
        # Per-lane a and b: each channel's pair computed once, selected by the lane's channel.
        f, ch = _flat_lanes(FLAT_C, BLOCK_C, BLOCK_S)
        a = tl.zeros(ch.shape, dtype=acc_ty)
        b = tl.zeros(ch.shape, dtype=acc_ty)
        for k in tl.static_range(FLAT_C):
            ck = tl.arange(0, 1) + k
            mean_k, invstd_k, a_k, bias_k = _channel_affine(
                mean_ptr, scale_ptr, weight_ptr, bias_ptr, ck, ck < C, eps, scale_is_var,
                has_weight, has_bias)
            a = tl.where(ch == k, a_k[:, None], a)
            b = tl.where(ch == k, (bias_k - mean_k * a_k)[:, None], b)
        offs, mask = _flat_tile(t, tiles_per_n, S, f, stride_n, FLAT_C, BLOCK_S)
    else:
        mean, invstd, a, bias = _channel_affine(
            mean_ptr, scale_ptr, weight_ptr, bias_ptr, c, c_mask, eps, scale_is_var, has_weight,
            has_bias)
        b = (bias - mean * a)[:, None]
        a = a[:, None]
        offs, mask, n_valid = _tile(t, tiles_per_n, S, c.to(tl.int64) * stride_c, c_mask,
                                    stride_n, stride_s, BLOCK_S)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    z = x * a + b
    z += tl.load(res_ptr + offs, mask=mask_if(mask, has_residual), other=0.0).to(acc_ty)
    y = _act(z, _host_float(slope_hi, slope_lo, acc_ty), ACTIVATION)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _grad_z(x, dy, res_ptr, offs, mask, mean, a, bias, slope, has_residual,
            ACTIVATION: tl.constexpr):
    """dL/dz = dy * act'(z), z recomputed as a * (x - mean) + bias [+ residual] (centred
    first: no cancellation for a large mean). Identity: dy itself, nothing recomputed.
    mean, a, bias: per channel [BLOCK_C, 1], or per lane (flat tiles)."""
    if ACTIVATION == ACT_IDENTITY:
        g = dy
    else:
        z = a * (x - mean) + bias
        z += tl.load(res_ptr + offs, mask=mask_if(mask, has_residual), other=0.0).to(x.dtype)
        g = _act_grad(z, dy, slope, ACTIVATION)
    return g


@triton.jit(do_not_specialize=_RUNTIME_INTS + _FLAGS + ["write_grads"])
def bn_bwd_reduce_kernel(
    x_ptr, dy_ptr, res_ptr, mean_ptr, scale_ptr, weight_ptr, bias_ptr,
    part_ptr, ticket_ptr, sums_ptr, grad_weight_ptr, grad_bias_ptr,
    C, S, stride_n, stride_c, stride_s,
    tiles_per_n, tiles_per_split, n_tiles, n_splits, part_field_stride,
    eps_hi, eps_lo, slope_hi, slope_lo,
    scale_is_var, has_weight, has_bias, has_residual, reverse, write_grads,
    ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr, FLAT_C: tl.constexpr = 0,
):
    """Per channel: sum g and sum g * x_hat (g = dy * act'(z)) in one launch: split partials
    merged in split order by the last program of each channel block.

    x_ptr, dy_ptr, res_ptr: (N, C, S) views sharing strides (res_ptr read only with an
        activation and has_residual: it enters z). mean_ptr, scale_ptr, weight_ptr,
        bias_ptr: [C] acc as in bn_apply_kernel (weight and bias enter z; identity reads
        neither). `reverse` is accepted for a uniform signature and ignored.
    part_ptr: [2, P, C] acc workspace (field stride P * C). ticket_ptr: as bn_stats_kernel.
    sums_ptr: [2, C] acc: sum g then sum g * x_hat (the dx kernel's input; what
        SyncBatchNorm all-reduces). If write_grads: grad_bias = sum g and grad_weight =
        sum g * x_hat ([C] acc each).
    Tiling, grid and FLAT_C as bn_stats_kernel. Accumulates per lane and reduces the tile axis once
    at the end; invstd is applied once per channel.
    Bytes per element: read x + read dy = 2 * elem_size (+ the residual with an activation).
    """
    pid = tl.program_id(0)
    pid_c = pid // n_splits
    pid_p = pid - pid_c * n_splits
    acc_ty = part_ptr.dtype.element_ty
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c_off = c.to(tl.int64) * stride_c
    eps = _host_float(eps_hi, eps_lo, acc_ty)
    mean, invstd, a, bias = _channel_affine(
        mean_ptr, scale_ptr, weight_ptr, bias_ptr, c, c_mask, eps, scale_is_var, has_weight,
        has_bias)
    slope = _host_float(slope_hi, slope_lo, acc_ty)
    sum_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
    sum_g_xmu = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
    t_begin = pid_p * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    if FLAT_C > 0:
        # Flat tiles: per-lane parameters (a lane's channel never changes), loaded once.
        f, ch = _flat_lanes(FLAT_C, BLOCK_C, BLOCK_S)
        lane_mean, lane_invstd, lane_a, lane_bias = _channel_affine(
            mean_ptr, scale_ptr, weight_ptr, bias_ptr, ch, ch < C, eps, scale_is_var,
            has_weight, has_bias)
        for t in range(t_begin, t_end):
            offs, mask = _flat_tile(t, tiles_per_n, S, f, stride_n, FLAT_C, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            g = _grad_z(x, dy, res_ptr, offs, mask, lane_mean, lane_a, lane_bias, slope,
                        has_residual, ACTIVATION)
            sum_g += g
            sum_g_xmu += g * (x - lane_mean)
        part_g = tl.zeros([BLOCK_C], dtype=acc_ty)
        part_g_xmu = tl.zeros([BLOCK_C], dtype=acc_ty)
        for k in tl.static_range(FLAT_C):
            part_g = tl.where(c == k, _lanes_sum(sum_g, ch, k), part_g)
            part_g_xmu = tl.where(c == k, _lanes_sum(sum_g_xmu, ch, k), part_g_xmu)
    else:
        for t in range(t_begin, t_end):
            offs, mask, n_valid = _tile(t, tiles_per_n, S, c_off, c_mask, stride_n, stride_s,
                                        BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            g = _grad_z(x, dy, res_ptr, offs, mask, mean[:, None], a[:, None], bias[:, None],
                        slope, has_residual, ACTIVATION)
            # Masked lanes: dy = 0 gives g = 0 for every activation's derivative.
            sum_g += g
            sum_g_xmu += g * (x - mean[:, None])
        part_g = tl.sum(sum_g, axis=1)
        part_g_xmu = tl.sum(sum_g_xmu, axis=1)
    out = part_ptr + pid_p * C + c
    tl.store(out, part_g, mask=c_mask)
    tl.store(out + part_field_stride, part_g_xmu * invstd, mask=c_mask)
    if _last_ticket(ticket_ptr, pid_c, n_splits):
        total_g = tl.zeros([BLOCK_C], dtype=acc_ty)
        total_g_xhat = tl.zeros([BLOCK_C], dtype=acc_ty)
        for p0 in range(0, n_splits, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pmask = (p < n_splits)[:, None] & c_mask[None, :]
            poffs = p.to(tl.int64)[:, None] * C + c[None, :]
            total_g += tl.sum(tl.load(part_ptr + poffs, mask=pmask, other=0.0,
                                      cache_modifier=".cg"), axis=0)
            total_g_xhat += tl.sum(tl.load(part_ptr + part_field_stride + poffs, mask=pmask,
                                           other=0.0, cache_modifier=".cg"), axis=0)
        tl.store(sums_ptr + c, total_g, mask=c_mask)
        tl.store(sums_ptr + C + c, total_g_xhat, mask=c_mask)
        tl.store(grad_bias_ptr + c, total_g, mask=mask_if(c_mask, write_grads))
        tl.store(grad_weight_ptr + c, total_g_xhat, mask=mask_if(c_mask, write_grads))
        tl.store(ticket_ptr + pid_c, 0)


@triton.jit
def _dx_constants(mean_ptr, scale_ptr, weight_ptr, bias_ptr, sums_ptr, count_ptr, count, c,
                  c_mask, C, eps, scale_is_var, has_weight, has_bias, training,
                  count_from_ptr):
    """(mean, a, bias, q, r) of channels c for bn_bwd_dx_kernel (see there)."""
    acc_ty = mean_ptr.dtype.element_ty
    mean, invstd, a, bias = _channel_affine(
        mean_ptr, scale_ptr, weight_ptr, bias_ptr, c, c_mask, eps, scale_is_var, has_weight,
        has_bias)
    stat_mask = mask_if(c_mask, training)
    m = tl.load(count_ptr + c, mask=mask_if(stat_mask, count_from_ptr), other=0.0).to(acc_ty)
    m = tl.where(count_from_ptr != 0, m, tl.cast(count, acc_ty))
    m = tl.maximum(m, 1.0)
    sum_g = tl.load(sums_ptr + c, mask=stat_mask, other=0.0)
    sum_g_xhat = tl.load(sums_ptr + C + c, mask=stat_mask, other=0.0)
    q = -a * invstd * sum_g_xhat / m
    r = -a * sum_g / m
    return mean, a, bias, q, r


@triton.jit(do_not_specialize=_RUNTIME_INTS + _FLAGS + ["count", "training", "count_from_ptr",
                                                        "write_dx", "write_dres"])
def bn_bwd_dx_kernel(
    x_ptr, dy_ptr, res_ptr, dx_ptr, dres_ptr, mean_ptr, scale_ptr, weight_ptr, bias_ptr,
    sums_ptr, count_ptr, count,
    C, S, stride_n, stride_c, stride_s, tiles_per_n, n_tiles, eps_hi, eps_lo, slope_hi,
    slope_lo, scale_is_var, has_weight, has_bias, has_residual, reverse, training,
    count_from_ptr, write_dx, write_dres,
    ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    FLAT_C: tl.constexpr = 0,
):
    """dx = w * invstd / m * (m * g - sum g - x_hat * sum g * x_hat) and d(residual) = g,
    g = dy * act'(z), one tile per program.

    Folded per channel into dx = a * g + q * (x - mean) + r with a = w * invstd,
    q = -a * invstd * sum_g_xhat / m and r = -a * sum_g / m (a subtraction and two FMAs per
    element). x - mean is centred before the multiply: folding q * mean into r would cancel
    q * x against it and lose the digits of a large mean (x = 100 + 0.01 * randn).
    Eval (training == 0): statistics are constants, dx = a * g; x is read only when an
    activation needs z.
    x_ptr, dy_ptr, res_ptr, dx_ptr, dres_ptr: (N, C, S) views sharing strides, x's dtype;
        dx written if write_dx, dres (= g) if write_dres; res read if has_residual and an
        activation needs z.
    mean_ptr, scale_ptr, weight_ptr, bias_ptr: [C] acc as in bn_apply_kernel. sums_ptr:
        [2, C] acc (sum g, sum g * x_hat) from bn_bwd_reduce_kernel (all-reduced for
        SyncBatchNorm).
    m: `count` (an integer: exact, unlike a Python float, which compiled Triton passes as
    fp32), or count_ptr [C] acc if count_from_ptr (a global count that only exists on the
    device, SyncBatchNorm).
    grid and FLAT_C: as bn_apply_kernel (reverse: tiles from the end, where the reduction
    ended).
    Bytes per element: training: read x + read dy + write dx = 3 * elem_size; eval: 2 (3 with
    an activation); + read residual with an activation, + write d(residual) with a residual.
    """
    c, t = _elementwise_tile(n_tiles, reverse, BLOCK_C)
    c_mask = c < C
    acc_ty = mean_ptr.dtype.element_ty
    eps = _host_float(eps_hi, eps_lo, acc_ty)
    if FLAT_C > 0:
        # Per-lane constants: each channel's computed once, selected by the lane's channel.
        f, ch = _flat_lanes(FLAT_C, BLOCK_C, BLOCK_S)
        mean = tl.zeros(ch.shape, dtype=acc_ty)
        a = tl.zeros(ch.shape, dtype=acc_ty)
        bias = tl.zeros(ch.shape, dtype=acc_ty)
        q = tl.zeros(ch.shape, dtype=acc_ty)
        r = tl.zeros(ch.shape, dtype=acc_ty)
        for k in tl.static_range(FLAT_C):
            ck = tl.arange(0, 1) + k
            mean_k, a_k, bias_k, q_k, r_k = _dx_constants(
                mean_ptr, scale_ptr, weight_ptr, bias_ptr, sums_ptr, count_ptr, count, ck,
                ck < C, C, eps, scale_is_var, has_weight, has_bias, training, count_from_ptr)
            sel = ch == k
            mean = tl.where(sel, mean_k[:, None], mean)
            a = tl.where(sel, a_k[:, None], a)
            if ACTIVATION != ACT_IDENTITY:  # bias enters only the recomputed z
                bias = tl.where(sel, bias_k[:, None], bias)
            q = tl.where(sel, q_k[:, None], q)
            r = tl.where(sel, r_k[:, None], r)
        offs, mask = _flat_tile(t, tiles_per_n, S, f, stride_n, FLAT_C, BLOCK_S)
    else:
        mean, a, bias, q, r = _dx_constants(
            mean_ptr, scale_ptr, weight_ptr, bias_ptr, sums_ptr, count_ptr, count, c, c_mask, C,
            eps, scale_is_var, has_weight, has_bias, training, count_from_ptr)
        mean = mean[:, None]
        a = a[:, None]
        bias = bias[:, None]
        q = q[:, None]
        r = r[:, None]
        offs, mask, n_valid = _tile(t, tiles_per_n, S, c.to(tl.int64) * stride_c, c_mask,
                                    stride_n, stride_s, BLOCK_S)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    # Eval without an activation: q = r = 0 and the masked-off load of x touches no memory.
    if ACTIVATION == ACT_IDENTITY:
        x_mask = mask_if(mask, training)
    else:
        x_mask = mask
    x = tl.load(x_ptr + offs, mask=x_mask, other=0.0).to(acc_ty)
    g = _grad_z(x, dy, res_ptr, offs, mask, mean, a, bias,
                _host_float(slope_hi, slope_lo, acc_ty), has_residual, ACTIVATION)
    tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask_if(mask, write_dres))
    dx = a * g + q * (x - mean) + r
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask_if(mask, write_dx))
