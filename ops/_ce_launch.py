"""Launchers and launch heuristics for the cross-entropy kernels.

Logits of shape (C,), (N, C) or (N, C, d1, ..., dk) are addressed as
(n_outer, n_inner, n_classes) with three strides, without copying: the class
axis is dim 1, the rows are (sample, flattened spatial position).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton

from . import _alloc
from ._launch_record import NO_LAUNCH, Launch, cached_plan, make_launch, watch
from ._launch_util import maxnreg_option, register_cap, resident_programs
from ._runtime import FP_FUSION, split_f64
from .kernels import cross_entropy as ce_kernels

# Rows up to this many classes stay in registers: 1 read + 1 write per logit. Larger
# single blocks spill (checked by the offline compile test): at 32 warps ptxas caps a
# thread at 64 registers, so 32768 fp32 values per row do not fit. Probability
# targets keep a second row (y) live, fp64 doubles every value.
MAX_SINGLE_BLOCK_V = {(False, False): 16384, (False, True): 8192,
                      (True, False): 4096, (True, True): 2048}  # (is_fp64, prob_target)


def _triton_at_least(major: int, minor: int) -> bool:
    parts = triton.__version__.split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


# Triton >= 3.9 needs a few more registers for the 16384-wide class-index row at 32 warps:
# it spills 4-8 B (python -m bench static). There, rows above 8192 classes stream instead
# (the two-pass path: one more read of the logits, no spill); 3.6-3.8 keep 16384.
if _triton_at_least(3, 9):
    MAX_SINGLE_BLOCK_V[(False, False)] = 8192
# Chunk width of the two-pass (online logsumexp, then gradient) path for longer rows.
LOOP_BLOCK_V = {(False, False): 4096, (False, True): 2048,
                (True, False): 2048, (True, True): 1024}
# Rows of at most this many classes use the smallest block (one warp).
SMALL_BLOCK_V = 128
# Below SMALL_BLOCK_V..MEDIUM_BLOCK_V one block size serves all widths: fewer compiled variants.
MEDIUM_BLOCK_V = 1024
# Chunk width of the backward rescale kernel.
SCALE_BLOCK_V = 1024

_INT32_LIMIT = 2**31


# ---- long rows: the split-row path (one read + one write per logit) --------------------
# Classes per member program of the split-row kernel, by element size: at
# SPLIT_NUM_WARPS warps, 16 logits per thread (32 bytes of 16-bit logits in flight per
# thread), 8 for fp32 and 2 for fp64; 96-128 registers, no spills on sm_80/sm_90 (the
# offline compile checks), so two 8-warp programs fit an SM's 65536 registers: at few
# rows a row's members spread over twice the SMs' slots, and one program's exchange
# (flag spin, partial merge) overlaps the other's loads. Per SM that is as many warps and
# bytes in flight as one 16-warp program of twice the chunk.
# Capping registers at 64 spills already at 8 values per thread (the bounded-wait
# fallback keeps a second chunk live); fp32 at 16 values per thread spills at 128.
SPLIT_CHUNK = {2: 4096, 4: 2048, 8: 512}  # by element size, class-index targets;
# probability targets keep w y' on chip too: half the chunk.
SPLIT_NUM_WARPS = 8
SPLIT_PROGRAMS_PER_SM = 2
# Passed explicitly (maxnreg): left alone, ptxas sometimes settles below what a program
# may use and spills (fp32 probabilities on sm_90); 128 keeps two programs per SM.
SPLIT_MAX_REGISTERS = register_cap(SPLIT_NUM_WARPS, SPLIT_PROGRAMS_PER_SM)
# Longest row of the split path: 262144 classes (64 x 4096 for 16-bit logits, 128 x 2048
# for fp32; probabilities 131072 in fp32, fp64 65536, fp64 probabilities 32768: at most
# MAX_SPLIT_CHUNKS members). Longer rows, or groups the GPU cannot hold at once, take
# the two-pass path. The kernel's vectors of partials are MAX_SPLIT_CHUNKS wide: 128 lanes
# over 256 threads compile without spills (at 16 warps 64 lanes were the most that fit).
MAX_SPLIT_CLASSES = 262144
MAX_SPLIT_CHUNKS = 128
# Total spins per row a member may spend waiting for partners' partials before it
# recomputes the missing ones from global memory (each spin is one L2 atomic, ~1 us).
SPLIT_MAX_SPIN = 4096
# Under the interpreter programs run one after another: never spin (early members
# recompute, later ones find the partials), and pretend a GPU holding this many
# split-row programs at once (small, so tests exercise the persistent row loop).
INTERPRET_SPLIT_CAPACITY = 32
# Where no device is at hand (plans, benchmarks' bytes models): an H100 SXM.
MODEL_SMS = 132

# Tests and benchmarks may route calls through one path ("single", "split", "two_pass");
# None lets choose_path decide.
FORCE_PATH: str | None = None
PATHS = ("single", "split", "two_pass")


def fused_block_v(n_classes: int, dtype: torch.dtype, prob_target: bool) -> tuple[int, bool]:
    """(BLOCK_V, SINGLE_BLOCK) for the fused kernel: whole row on chip when it fits."""
    key = (dtype == torch.float64, prob_target)
    if FORCE_PATH in ("two_pass", "split"):
        return LOOP_BLOCK_V[key], False
    if n_classes <= SMALL_BLOCK_V:
        return SMALL_BLOCK_V, True
    if n_classes <= MEDIUM_BLOCK_V:
        return MEDIUM_BLOCK_V, True
    if n_classes <= MAX_SINGLE_BLOCK_V[key]:
        return triton.next_power_of_2(n_classes), True
    return LOOP_BLOCK_V[key], False


def fused_num_warps(block_v: int) -> int:
    """Warps per row: one warp per 512 classes (16 values per thread), capped at 32 warps
    (so 32 per thread at BLOCK_V=32768): whole rows stay in registers without spills."""
    return max(1, min(32, block_v // 512))


def streaming_num_warps(block_v: int) -> int:
    """Warps for kernels that stream a row in chunks (the two-pass fused path and the
    vocab-parallel kernels): 8 values per thread. They keep running sums and 64-bit
    addresses live across the loop, and ptxas spills a few bytes at 16 per thread."""
    return max(1, min(32, block_v // 256))


def fwd_bwd_num_warps(block_v: int, single_block: bool, is_fp64: bool = False) -> int:
    """Warps of the fused kernel: 16 values per thread (8 in fp64 on the two-pass path).
    The persistent two-pass loop keeps more state live across chunks than the shard
    kernels; at 8 values per thread (twice the warps) ptxas settles at 64 registers and
    spills, at 16 it takes ~100-128 registers without spills (two programs per SM)."""
    if is_fp64 and not single_block:
        return max(1, min(32, block_v // 256))
    return fused_num_warps(block_v)


def fwd_bwd_max_registers(block_v: int, single_block: bool, is_fp64: bool = False) -> int | None:
    """Register cap (maxnreg) of the fused kernel. The two-pass loop has its own cap. A
    16-warp single block may use 65536 / 512 = 128 registers, but left alone ptxas settles
    at 64 for 16-bit probability rows of 8192 and spills; other widths keep ptxas' choice."""
    if not single_block:
        return TWO_PASS_MAX_REGISTERS
    if fwd_bwd_num_warps(block_v, single_block, is_fp64) == 16:
        return register_cap(16)
    return None


def scale_block_v(n_classes: int) -> int:
    return SMALL_BLOCK_V if n_classes <= SMALL_BLOCK_V else SCALE_BLOCK_V


def scale_num_warps(block_v: int) -> int:
    return 1 if block_v <= SMALL_BLOCK_V else 4


def needs_large_offsets(*tensors: torch.Tensor) -> bool:
    """True when some element offset in these tensors can reach 2^31 (use int64 columns)."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        span = sum((size - 1) * abs(stride)
                   for size, stride in zip(t.shape, t.stride(), strict=True))
        if span >= _INT32_LIMIT:
            return True
    return False


def rows_view(t: torch.Tensor, class_dim: bool) -> torch.Tensor:
    """View ``t`` as (n_outer, n_inner[, n_classes]) without copying.

    With class_dim the input is logits-like ((C,), (N, C) or (N, C, d1..dk));
    otherwise target-like ((), (N,) or (N, d1..dk)). Spatial dims are flattened
    into n_inner: always a view for contiguous, channels-last-free layouts and any
    slicing of the class or batch axes. Spatial dims whose strides cannot be merged
    (e.g. a transposed H and W) are rejected by ``spatial_dims_mergeable``, and the
    caller makes them contiguous first.
    """
    if class_dim:
        if t.dim() == 1:
            return t.view(1, 1, -1)
        moved = t.movedim(1, -1)  # (N, d1..dk, C): a view
        return moved.view(moved.shape[0], math.prod(moved.shape[1:-1]), moved.shape[-1])
    if t.dim() == 0:
        return t.view(1, 1)
    return t.view(t.shape[0], math.prod(t.shape[1:]))


def spatial_dims_mergeable(t: torch.Tensor, class_dim: bool) -> bool:
    """Whether rows_view(t, class_dim) is possible as a view."""
    try:
        rows_view(t, class_dim)
    except RuntimeError:
        return False
    return True


def split_chunk(dtype: torch.dtype, prob_target: bool) -> int:
    chunk = SPLIT_CHUNK[dtype.itemsize]
    return chunk // 2 if prob_target else chunk


def split_chunks(n_classes: int, dtype: torch.dtype, prob_target: bool) -> int:
    """Members per row of the split-row kernel."""
    return triton.cdiv(n_classes, split_chunk(dtype, prob_target))


def split_max_chunks(dtype: torch.dtype, prob_target: bool) -> int:
    """MAX_CHUNKS of the split-row kernel (the width of its vectors of partials, one
    compiled variant per dtype/target kind) and the most members a row may have:
    MAX_SPLIT_CLASSES worth of chunks, at most MAX_SPLIT_CHUNKS (the widest vectors the
    offline compile takes without spills)."""
    return min(MAX_SPLIT_CHUNKS, MAX_SPLIT_CLASSES // split_chunk(dtype, prob_target))


def split_capacity(device: torch.device | None) -> int:
    """Split-row programs the device holds at once (the cooperative grid's ceiling)."""
    if device is None:
        return MODEL_SMS * split_programs_per_sm()
    if device.type != "cuda":
        return INTERPRET_SPLIT_CAPACITY
    return sm_count(device) * split_programs_per_sm()


def split_programs_per_sm() -> int:
    """Resident split-row programs per SM, from what bounds the compiled kernel: its
    warps, and its registers per thread, which ptxas keeps within SPLIT_MAX_REGISTERS
    (or within its own 65536 / threads when uncapped, the worst case taken here: the
    variants compile at 96-128 registers on sm_80/sm_90, `python -m bench static`).
    Shared memory (a few hundred bytes of reduction scratch) never binds. Derived from
    the compile, not queried per call: no compilation on the hot path."""
    regs = SPLIT_MAX_REGISTERS or register_cap(SPLIT_NUM_WARPS)
    return resident_programs(SPLIT_NUM_WARPS, regs)


def split_grid(n_rows: int, n_chunks: int, device: torch.device | None) -> int:
    """Programs of the split-row kernel: whole groups, no more than the device holds at
    once (so the cooperative launch is legal and every group is co-resident), no more
    groups than rows. 0 when not even one group fits."""
    groups = min(n_rows, split_capacity(device) // n_chunks)
    return groups * n_chunks


def choose_path(n_rows: int, n_classes: int, dtype: torch.dtype, prob_target: bool,
                device: torch.device | None = None, class_stride: int = 1) -> str:
    """THE decision which kernel computes a forward: "single" (the row fits one
    program's registers), "split" (one read: the row split over co-resident programs) or
    "two_pass" (a streaming pass, then a gradient pass). The first GPU measurement may
    flip the long-row default with a one-line change here.

    class_stride: the largest class stride (in elements) of the logits, the gradient
    and probability targets. The split kernel addresses within a chunk in 32 bits, so a
    chunk times that stride must stay below 2^31 (only layouts with the class axis
    strided by >= 2^19 elements miss it; they stream)."""
    if FORCE_PATH is not None:
        return FORCE_PATH
    if fused_block_v(n_classes, dtype, prob_target)[1]:
        return "single"
    if split_covers(n_classes, dtype, prob_target, class_stride) \
            and split_grid(n_rows, split_chunks(n_classes, dtype, prob_target), device) > 0:
        return "split"
    return "two_pass"


# The two-pass path runs the split kernel's SOLO variant where that kernel covers the row
# (bitwise the split path's results); False: always the streaming fused kernel (tests and
# benchmarks compare the two).
TWO_PASS_SOLO = True


def split_covers(n_classes: int, dtype: torch.dtype, prob_target: bool,
                 class_stride: int = 1) -> bool:
    """Whether the split-row kernel's code handles such rows: at most MAX_CHUNKS members
    and in-chunk offsets below 2^31. Then the two-pass path runs that kernel's SOLO
    variant (one program per row, the same chunks and merge tree), so the split and
    two-pass results are bitwise the same; longer rows stream through the fused kernel."""
    return (split_chunks(n_classes, dtype, prob_target) <= split_max_chunks(dtype, prob_target)
            and split_chunk(dtype, prob_target) * class_stride < _INT32_LIMIT)


def solo_grid(n_rows: int, device: torch.device | None) -> int:
    """Programs of the split kernel's SOLO variant: persistent, at most what the device
    holds at once (so a row's lines are still in L2 for the second pass)."""
    return min(n_rows, split_capacity(device))


_SYNC_BUFFERS: dict = {}
# Every sync buffer ever handed out stays alive: a captured CUDA graph may still use it.
_SYNC_KEEP: list = []


def split_sync_buffer(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 flags/counters for the split-row kernel, reused across calls: the
    kernel leaves them zero again, so no memset launch per call. One per device and
    stream (two streams must not share flags)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _SYNC_BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _SYNC_BUFFERS[key] = buf
        _SYNC_KEEP.append(buf)
    return buf


def _meta(shape, strides) -> torch.Tensor:
    """A tensor of this geometry without memory: what needs_large_offsets reads at plan time."""
    return torch.empty_strided(tuple(shape), tuple(strides), device="meta")


def _scalar_args(ignore_index: int, label_smoothing: float, z_loss: float,
                 softcap: float | None) -> tuple:
    """The fused kernels' scalar arguments: fp64-exact (hi, lo) pairs of the host floats."""
    return (ignore_index, *split_f64(label_smoothing), *split_f64(z_loss),
            *split_f64(softcap if softcap is not None else 1.0))


# The fused kernels' tensor arguments (the split-row kernel adds its partials and flags).
_FWD_TENSORS = ("logits", "grad", "target", "weight", "loss_rows", "lse_rows", "reduce_buf")


def _split_launch(rows_shape, logit_strides, grad_strides, t_strides, dtype, device, *,
                  prob_target, has_weight, write_grad, scalars, label_smoothing,
                  softcap, solo: bool = False) -> tuple[Launch, int]:
    """(launch, n_chunks) of the split-row kernel; its tensors: logits, grad, target,
    weight (or any acc buffer), loss_rows, lse_rows, reduce_buf, partials, sync (with
    solo, the SOLO variant: partials and sync are never touched, any buffers will do)."""
    n_outer, n_inner, n_classes = rows_shape
    n_rows = n_outer * n_inner
    chunk = split_chunk(dtype, prob_target)
    n_chunks = triton.cdiv(n_classes, chunk)
    grid = solo_grid(n_rows, device) if solo else split_grid(n_rows, n_chunks, device)
    max_chunks = split_max_chunks(dtype, prob_target)
    if grid == 0 or n_chunks > max_chunks:
        raise RuntimeError(f"split-row path: {n_chunks} programs per row do not fit")
    if chunk * max(logit_strides[2], grad_strides[2], t_strides[2]) >= _INT32_LIMIT:
        # (choose_path routes such layouts to the two-pass path; see the kernel's offsets)
        raise RuntimeError("split-row path: in-chunk offsets would pass 2^31")
    cuda = device is None or device.type == "cuda"  # None: the modelled GPU (plans)
    # Cooperative: the driver refuses the launch rather than run a grid that is not
    # co-resident (the grid never exceeds split_capacity, so it never refuses). The SOLO
    # variant's programs never wait for each other.
    extra = {"launch_cooperative_grid": True} if cuda and not solo else {}
    if solo:
        extra["SOLO"] = True
    extra.update(maxnreg_option(SPLIT_MAX_REGISTERS))
    launch = make_launch(ce_kernels.cross_entropy_split_kernel, (grid,), _FWD_TENSORS + (
        "partials", "sync"), (
        n_rows, n_classes, n_inner, n_chunks,
        *logit_strides, *grad_strides, *t_strides, *scalars,
        int(softcap is not None), int(write_grad), SPLIT_MAX_SPIN if cuda else 0,
    ), dict(
        PROB_TARGET=prob_target, IS_FP64=dtype == torch.float64,
        HAS_WEIGHT=has_weight, HAS_SMOOTHING=label_smoothing != 0.0 and not prob_target,
        CHUNK=chunk, MAX_CHUNKS=max_chunks, num_warps=SPLIT_NUM_WARPS,
        enable_fp_fusion=FP_FUSION, **extra,
    ))
    return launch, n_chunks


def launch_split(logits3, grad3, target_v, weight, loss_rows, lse_rows, reduce_buf, *,
                 ignore_index, label_smoothing, z_loss, softcap, prob_target, write_grad,
                 t_strides, partials=None, sync=None):
    """The split-row kernel over every row; returns its (partials, sync) buffers.
    Tests may pass their own (e.g. flags already set, to force the exchange)."""
    n_outer, n_inner, _ = logits3.shape
    n_rows = n_outer * n_inner
    dtype = logits3.dtype
    device = logits3.device
    launch, n_chunks = _split_launch(
        tuple(logits3.shape), logits3.stride(), grad3.stride(), tuple(t_strides), dtype,
        device, prob_target=prob_target, has_weight=weight is not None,
        write_grad=write_grad, scalars=_scalar_args(ignore_index, label_smoothing, z_loss, softcap),
        label_smoothing=label_smoothing, softcap=softcap)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if partials is None:
        partials = _alloc.empty((n_rows, n_chunks, 4), dtype=acc, device=device)
    if sync is None:
        sync = split_sync_buffer(device, n_rows * (n_chunks + 1))
    launch(logits3, grad3, target_v, weight if weight is not None else reduce_buf,
           loss_rows, lse_rows, reduce_buf, partials, sync)
    return partials, sync


# Programs per SM of the persistent two-pass path: enough to keep HBM busy, few enough
# that the rows in flight mostly stay in L2 between the passes.
TWO_PASS_PROGRAMS_PER_SM = 2
# Register cap of the two-pass kernel, passed explicitly (maxnreg): ptxas' own choice
# spills a few bytes on some variants (fp32 probabilities on sm_80); 128 keeps two
# 8-warp programs (the widest two-pass program) per SM.
TWO_PASS_MAX_REGISTERS = register_cap(8, TWO_PASS_PROGRAMS_PER_SM)


def two_pass_grid(n_rows: int, device: torch.device | None) -> int:
    return min(n_rows, TWO_PASS_PROGRAMS_PER_SM * sm_count(device))


@dataclasses.dataclass(frozen=True, eq=False)
class FwdBwdLaunches:
    """What plan_fwd_bwd decided for one call signature: the forward and the backward's
    launch for a 0-dim grad_output.

    ``run(logits, grad, target, weight, loss_rows, lse_rows, reduce_buf)`` launches the
    forward; every tensor is given (the logits for an unwritten gradient, any acc-dtype
    buffer for absent weights), any view with the planned geometry (see make_launch). The
    split path allocates its partials per call. Calling the record itself does the same
    with None for an unwritten gradient or absent weights.
    """

    path: str
    rows_shape: tuple                # logits as (n_outer, n_inner, n_classes)
    grad_strides: tuple              # the gradient's rows strides (the backward's)
    dtype: torch.dtype
    device: torch.device
    run: Launch                      # the forward
    scale_grad: Launch               # backward, 0-dim grad_output (NO_LAUNCH: nothing)
    kernel: Launch = NO_LAUNCH       # the kernel launch `run` issues (fused, split or SOLO
                                     # record, with its grid and options: plan_cross_entropy)

    def __call__(self, logits, grad, target, weight, loss_rows, lse_rows, reduce_buf) -> None:
        self.run(logits, grad if grad is not None else logits, target,
                 weight if weight is not None else reduce_buf, loss_rows, lse_rows, reduce_buf)

    def rescale(self, grad, grad_output) -> None:
        """Backward: grad *= grad_output in place; grad_output is 0-dim or (n_outer,
        n_inner)."""
        if grad_output.dim() == 0:
            self.scale_grad(grad, grad_output)
        else:
            plan_scale_grad(self.rows_shape, self.grad_strides, self.dtype, self.device,
                            grad_output.stride())(grad, grad_output)


@cached_plan
def plan_fwd_bwd(rows_shape: tuple, logit_strides: tuple, grad_strides: tuple | None,
                 target_strides: tuple, dtype: torch.dtype, device: torch.device, *,
                 ignore_index: int, label_smoothing: float, z_loss: float,
                 softcap: float | None, prob_target: bool, has_weight: bool) -> FwdBwdLaunches:
    """The launches of launch_fwd_bwd for logits of rows_shape (n_outer, n_inner,
    n_classes) and these rows strides (grad_strides None: no gradient written; target:
    (outer, inner) for class indices, three strides for probabilities)."""
    n_outer, n_inner, n_classes = rows_shape
    n_rows = n_outer * n_inner
    write_grad = grad_strides is not None
    if grad_strides is None:
        grad_strides = logit_strides  # the logits stand in for the unwritten gradient
    scale = (plan_scale_grad(rows_shape, grad_strides, dtype, device, None) if write_grad
             else NO_LAUNCH)
    if n_rows == 0:
        return FwdBwdLaunches("none", rows_shape, grad_strides, dtype, device, NO_LAUNCH,
                              scale)
    t_strides = tuple(target_strides) if prob_target else (*target_strides, 0)
    class_stride = max(logit_strides[2], grad_strides[2], t_strides[2])
    path = choose_path(n_rows, n_classes, dtype, prob_target, device, class_stride)
    target_shape = rows_shape if prob_target else rows_shape[:2]
    large = needs_large_offsets(_meta(rows_shape, logit_strides),
                                _meta(rows_shape, grad_strides),
                                _meta(target_shape, target_strides))
    scalars = _scalar_args(ignore_index, label_smoothing, z_loss, softcap)
    if path == "split":
        forward, n_chunks = _split_launch(
            rows_shape, logit_strides, grad_strides, t_strides, dtype, device,
            prob_target=prob_target, has_weight=has_weight, write_grad=write_grad,
            scalars=scalars, label_smoothing=label_smoothing, softcap=softcap)
        run = functools.partial(_run_split, forward, (n_rows, n_chunks, 4),
                                torch.float64 if dtype == torch.float64 else torch.float32,
                                device, n_rows * (n_chunks + 1))
        return FwdBwdLaunches(path, rows_shape, grad_strides, dtype, device, run, scale,
                              forward)
    if path == "two_pass" and TWO_PASS_SOLO \
            and split_covers(n_classes, dtype, prob_target, class_stride):
        forward, _ = _split_launch(
            rows_shape, logit_strides, grad_strides, t_strides, dtype, device,
            prob_target=prob_target, has_weight=has_weight, write_grad=write_grad,
            scalars=scalars, label_smoothing=label_smoothing, softcap=softcap, solo=True)
        # (partials and flags: the lse rows stand in, never read or written by SOLO)
        run = functools.partial(_run_solo, forward)
        return FwdBwdLaunches(path, rows_shape, grad_strides, dtype, device, run, scale,
                              forward)
    block_v, single = fused_block_v(n_classes, dtype, prob_target)
    grid = n_rows if single else two_pass_grid(n_rows, device)
    max_registers = fwd_bwd_max_registers(block_v, single, dtype == torch.float64)
    extra = maxnreg_option(max_registers)
    # num_stages=1: the persistent row loop must not be software-pipelined (prefetching
    # the next row doubles the registers a row on chip needs; 16-bit probability rows of
    # 8192 spill at Triton's default 3 stages on sm_90).
    extra["num_stages"] = 1
    forward = make_launch(ce_kernels.cross_entropy_fwd_bwd_kernel, (grid,), _FWD_TENSORS, (
        n_rows, n_classes, n_inner, *logit_strides, *grad_strides, *t_strides, *scalars,
        int(has_weight), int(softcap is not None), int(write_grad),
    ), dict(
        PROB_TARGET=prob_target, IS_FP64=dtype == torch.float64, LARGE_OFFSETS=large,
        BLOCK_V=block_v, SINGLE_BLOCK=single,
        num_warps=fwd_bwd_num_warps(block_v, single, dtype == torch.float64),
        enable_fp_fusion=FP_FUSION, **extra,
    ))
    return FwdBwdLaunches(path, rows_shape, grad_strides, dtype, device, forward, scale,
                          forward)


def _run_split(forward: Launch, partials_shape: tuple, acc: torch.dtype, device: torch.device,
               sync_numel: int, *tensors) -> None:
    """FwdBwdLaunches.run of the split path: the launch with this call's partials (n_rows,
    n_chunks, 4) and the reused zeroed flags."""
    partials = _alloc.empty(partials_shape, dtype=acc, device=device)
    forward(*tensors, partials, split_sync_buffer(device, sync_numel))


def _run_solo(forward: Launch, *tensors) -> None:
    """FwdBwdLaunches.run of the split kernel's SOLO variant: no partials, no flags."""
    forward(*tensors, tensors[5], tensors[5])


def launch_fwd_bwd(logits3, grad3, target_v, weight, loss_rows, lse_rows, reduce_buf, *,
                   ignore_index: int, label_smoothing: float, z_loss: float,
                   softcap: float | None, prob_target: bool, write_grad: bool) -> None:
    """Run the forward (loss and gradient) over every row on the path choose_path picks.
    Shapes as in the kernels' docstrings."""
    plan = plan_fwd_bwd(
        tuple(logits3.shape), logits3.stride(),
        grad3.stride() if write_grad else None, target_v.stride(), logits3.dtype,
        logits3.device, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, prob_target=prob_target,
        has_weight=weight is not None)
    plan(logits3, grad3 if write_grad else None, target_v, weight, loss_rows, lse_rows,
         reduce_buf)


# Programs per SM of the persistent backward kernel, and the SM count the interpreter
# pretends (small: the tile loop runs in tests).
SCALE_PROGRAMS_PER_SM = 8
INTERPRET_SMS = 4


def sm_count(device: torch.device | None) -> int:
    """Streaming multiprocessors of ``device`` (MODEL_SMS without one, INTERPRET_SMS on CPU)."""
    if device is None:
        return MODEL_SMS
    if device.type != "cuda":
        return INTERPRET_SMS
    return _cuda_sm_count(device.index if device.index is not None
                          else torch.cuda.current_device())


_SM_CACHE: dict = {}


def _cuda_sm_count(index: int) -> int:
    if index not in _SM_CACHE:
        _SM_CACHE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_CACHE[index]


def scale_grid(n_rows: int, n_classes: int, device: torch.device | None) -> tuple[int, int]:
    """(programs, tiles per row) of the persistent backward kernel: O(#SM) programs."""
    tiles_per_row = triton.cdiv(n_classes, scale_block_v(n_classes))
    return min(n_rows * tiles_per_row, SCALE_PROGRAMS_PER_SM * sm_count(device)), tiles_per_row


@cached_plan
def plan_scale_grad(rows_shape: tuple, grad_strides: tuple, dtype: torch.dtype,
                    device: torch.device, go_strides: tuple | None) -> Launch:
    """The backward's launch (tensors: grad, grad_output) for a gradient of rows_shape
    (n_outer, n_inner, n_classes) and these strides; go_strides: grad_output's (outer,
    inner) strides, None for a 0-dim grad_output."""
    n_outer, n_inner, n_classes = rows_shape
    n_rows = n_outer * n_inner
    if n_rows == 0 or n_classes == 0:
        return NO_LAUNCH
    block_v = scale_block_v(n_classes)
    per_row = go_strides is not None
    programs, tiles_per_row = scale_grid(n_rows, n_classes, device)
    return make_launch(ce_kernels.scale_grad_kernel, (programs,), ("grad", "grad_output"), (
        n_rows, n_classes, n_inner, tiles_per_row, *grad_strides,
        *(go_strides if per_row else (0, 0)),
    ), dict(
        PER_ROW=per_row, IS_FP64=dtype == torch.float64,
        LARGE_OFFSETS=needs_large_offsets(_meta(rows_shape, grad_strides)), BLOCK_V=block_v,
        num_warps=scale_num_warps(block_v), enable_fp_fusion=FP_FUSION,
    ))


def launch_scale_grad(grad3, grad_output_v) -> None:
    """grad3 *= grad_output in place; grad_output_v is 0-dim or (n_outer, n_inner)."""
    go_strides = grad_output_v.stride() if grad_output_v.dim() > 0 else None
    plan_scale_grad(tuple(grad3.shape), grad3.stride(), grad3.dtype, grad3.device,
                    go_strides)(grad3, grad_output_v)


def shard_block_v(n_classes: int, dtype: torch.dtype, prob_target: bool) -> int:
    """Chunk width of the vocab-parallel kernels (always a loop over chunks). float64 streams
    MEDIUM_BLOCK_V chunks for both target kinds: the 2048-wide class-index chunk (8 warps)
    of the gradient kernel spills 16 B on sm_80 with Triton >= 3.9 (ptxas settles at 128
    registers with int64 offsets); 1024 (4 warps) keeps the same 8 values per thread in
    ~126 registers (python -m bench static)."""
    if n_classes <= SMALL_BLOCK_V:
        return SMALL_BLOCK_V
    if n_classes <= MEDIUM_BLOCK_V or dtype == torch.float64:
        return MEDIUM_BLOCK_V
    return LOOP_BLOCK_V[(False, prob_target)]


def launch_shard_stats(logits3, probs_v, weight, stats, *, softcap: float | None) -> None:
    """stats (n_rows, 6) of this shard; probs_v is None for class-index targets."""
    n_outer, n_inner, n_classes = logits3.shape
    n_rows = n_outer * n_inner
    if n_rows == 0:
        return
    prob = probs_v is not None
    target = probs_v if prob else stats
    t_strides = probs_v.stride() if prob else (0, 0, 0)
    block_v = shard_block_v(n_classes, logits3.dtype, prob)
    sc_hi, sc_lo = split_f64(softcap if softcap is not None else 1.0)
    ce_kernels.cross_entropy_shard_stats_kernel[(n_rows,)](
        logits3, target, weight if weight is not None else stats, stats,
        n_classes, n_inner, *logits3.stride(), *t_strides,
        sc_hi, sc_lo, int(weight is not None), int(softcap is not None),
        PROB_TARGET=prob, IS_FP64=logits3.dtype == torch.float64,
        LARGE_OFFSETS=needs_large_offsets(logits3, probs_v), BLOCK_V=block_v,
        num_warps=streaming_num_warps(block_v), enable_fp_fusion=FP_FUSION,
    )


def launch_shard_grad(logits3, grad3, target_v, weight, coef, *, softcap: float | None,
                      prob_target: bool) -> None:
    """Write this shard's gradient from the global per-row coefficients ``coef``."""
    n_outer, n_inner, n_classes = logits3.shape
    n_rows = n_outer * n_inner
    if n_rows == 0:
        return
    t_strides = target_v.stride() if prob_target else (*target_v.stride(), 0)
    block_v = shard_block_v(n_classes, logits3.dtype, prob_target)
    sc_hi, sc_lo = split_f64(softcap if softcap is not None else 1.0)
    ce_kernels.cross_entropy_shard_grad_kernel[(n_rows,)](
        logits3, grad3, target_v, weight if weight is not None else coef, coef,
        n_classes, n_inner, *logits3.stride(), *grad3.stride(), *t_strides,
        sc_hi, sc_lo, int(weight is not None), int(softcap is not None),
        PROB_TARGET=prob_target, IS_FP64=logits3.dtype == torch.float64,
        LARGE_OFFSETS=needs_large_offsets(logits3, grad3, target_v), BLOCK_V=block_v,
        num_warps=streaming_num_warps(block_v), enable_fp_fusion=FP_FUSION,
    )


# --- the plan: what a call does, read off the launch records a real call uses -----------

@dataclasses.dataclass(frozen=True)
class CEPlan:
    """What the cross-entropy launchers do for one call (forward kernel + backward).

    path: "single", "split" or "two_pass" (choose_path).
    kernels: (kernel name, grid, constexprs and launch options) in launch order: the
        forward kernel, then the backward kernel.
    launches_fwd / launches_bwd_go1: kernel launches of this module per forward, and per
        backward with grad_output == 1 (the host path may add its own small launches).
    bytes_per_logit_fwd_bwd: HBM traffic over the logits (and gradient, and
        probabilities) per logit for forward + backward(grad_output == 1), in units of
        the element size: 2.0 = one read + one write.
    """

    path: str
    n_rows: int
    n_classes: int
    kernels: list
    launches_fwd: int
    launches_bwd_go1: int
    bytes_per_logit_fwd_bwd: float
    per_row_bytes: int

    def hbm_bytes(self, elem_size: int) -> int:
        """Modelled HBM bytes of forward + backward(grad_output == 1) over the logits,
        gradient and probabilities, plus the kernels' per-row scratch (split partials)."""
        logits = self.bytes_per_logit_fwd_bwd * self.n_rows * self.n_classes * elem_size
        return int(logits) + self.n_rows * self.per_row_bytes


def plan_cross_entropy(n_rows: int, n_classes: int, dtype: torch.dtype, *,
                       prob_target: bool = False, write_grad: bool = True,
                       has_weight: bool = False, smoothing: bool = False,
                       device: torch.device | None = None) -> CEPlan:
    """What the launchers do for contiguous (n_rows, n_classes) logits of ``dtype``, read off
    the Launch records plan_fwd_bwd builds for that call (the same function, and cache,
    a real call uses); ``device=None`` models an H100 (MODEL_SMS)."""
    rows_shape = (n_rows, 1, n_classes)
    strides = (n_classes, n_classes, 1)
    launches = plan_fwd_bwd(
        rows_shape, strides, strides if write_grad else None,
        strides if prob_target else (1, 1), dtype, device, ignore_index=-100,
        label_smoothing=0.1 if smoothing else 0.0, z_loss=0.0, softcap=None,
        prob_target=prob_target, has_weight=has_weight)
    forward = launches.kernel
    kernels = [_kernel_entry(k) for k in (forward, launches.scale_grad) if k is not NO_LAUNCH]
    options = getattr(forward, "options", {})
    acc_size = 8 if dtype == torch.float64 else 4
    # Per-row scratch of the kernels themselves (targets, loss and lse are the host
    # path's part of the model: bench/plan_ce.py adds them).
    per_row = 0
    if launches.path == "split":
        # Published partials: n_chunks x 4 values per row written (L2-resident).
        per_row = triton.cdiv(n_classes, options["CHUNK"]) * 4 * acc_size
        logit_passes = 1
    elif options.get("SINGLE_BLOCK") or not write_grad:
        logit_passes = 1  # the row stays on chip, or no gradient pass
    else:
        logit_passes = 2  # two-pass: SOLO or streaming, the gradient pass re-reads the row
    per_logit = float(logit_passes) + (1.0 if write_grad else 0.0)
    if prob_target:
        per_logit += logit_passes  # y is read alongside the logits in every pass
    return CEPlan(path=launches.path, n_rows=n_rows, n_classes=n_classes, kernels=kernels,
                  launches_fwd=int(forward is not NO_LAUNCH),
                  launches_bwd_go1=int(launches.scale_grad is not NO_LAUNCH),
                  bytes_per_logit_fwd_bwd=per_logit, per_row_bytes=per_row)


def _kernel_entry(launch: Launch) -> tuple[str, tuple, dict]:
    """(kernel name, grid, constexprs and launch options) of a planned launch."""
    kernel = getattr(launch.kernel, "fn", launch.kernel)
    return kernel.__name__, launch.grid, dict(launch.options)


# Every plan above reads this module's tunables: setting one drops the cached plans.
watch(__name__)
