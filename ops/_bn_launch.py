"""BatchNorm launchers: layout planning, launch heuristics and one function per kernel step.

The steps compose into single-process BatchNorm (ops/batch_norm.py) and SyncBatchNorm:

    forward:  stats_partials -> merge_stats(final) -> apply
              (Sync: stats_partials -> merge_stats(local) -> all_gather -> merge_stats(final))
    backward: bwd_partials -> bwd_merge -> dx
              (Sync: ... bwd_merge -> all_reduce(sums) -> dx with the global count)

Everything here runs on the host but never reads device data: no synchronisation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import _alloc
from ._runtime import FP_FUSION, acc_dtype, device_guard, split_f64
from .kernels import batch_norm as bn_kernels

# Elements per tile: 2048 elements = 16 per thread at 4 warps (fp32: four 16-byte loads per
# thread per operand), enough bytes in flight per SM while the accumulators stay in registers.
TILE_ELEMS = 2048
NUM_WARPS = 4
# Spatial-inner (NCHW-like) tiles, chosen by the spatial size S: (BLOCK_C, BLOCK_S).
S_INNER_TILES = ((32, 64), (8, 256), (2, 1024), (1, 2048))
# Channel-inner (channels_last-like) tiles, chosen by the channel count C: (BLOCK_C, BLOCK_S).
C_INNER_TILES = ((4, 512), (16, 128), (32, 64), (64, 32), (128, 16))
# float64 is the gradcheck/correctness path: one tile per orientation keeps the compile list
# short; 1024 elements (2048 spill in the fp64 reductions; the shapes are those ptxas
# compiles spill-free, see test_static_compile_sm90).
FP64_TILES = {"s_inner": (4, 256), "c_inner": (32, 32)}
# Merge kernels: [MERGE_BLOCK_P parts, MERGE_BLOCK_C channels] per step.
MERGE_BLOCK_P = 32
MERGE_BLOCK_C = 64
MERGE_NUM_WARPS = 4
# Upper bound on splits per channel block: bounds the partial buffers and the merge's work.
MAX_SPLITS = 512
# Programs per SM to aim for in the split reductions (several waves hide the tail).
PROGRAMS_PER_SM = 4
# Under the interpreter programs run one after another; pretend a small GPU so that the
# split/merge path is still exercised by small test shapes.
INTERPRETER_SMS = 2

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the kernels address one (N, C, *) tensor layout, and how they tile it."""

    N: int
    C: int
    S: int
    stride_n: int
    stride_c: int
    stride_s: int
    orientation: str  # "s_inner" (stride_s == 1) or "c_inner" (stride_c == 1)
    block_c: int
    block_s: int

    @property
    def tiles_per_n(self) -> int:
        return max(1, math.ceil(self.S / self.block_s))

    @property
    def n_tiles(self) -> int:
        return self.N * self.tiles_per_n

    @property
    def n_cblocks(self) -> int:
        return max(1, math.ceil(self.C / self.block_c))

    @property
    def strides(self) -> tuple[int, int, int]:
        return self.stride_n, self.stride_c, self.stride_s


# ----------------------------------------------------------------------------- layout


def _collapsed_spatial(shape, strides):
    """(S, stride_s) if the spatial dims step uniformly through memory, else None."""
    dims = [(n, st) for n, st in zip(shape, strides, strict=True) if n != 1]
    S = math.prod(shape)
    if not dims:
        return S, 1
    for (_, st_outer), (n_inner, st_inner) in zip(dims, dims[1:], strict=False):
        if st_outer != st_inner * n_inner:
            return None
    return S, dims[-1][1]


def _ncs(shape, strides):
    """(N, C, S, stride_n, stride_c, stride_s) of the strided view, or None if unsupported.

    Strides of size-1 dims carry no information and are normalised (0, or 1 where the
    orientation needs a unit stride), so a kernel specialisation never depends on them."""
    N, C = shape[0], shape[1]
    sp = _collapsed_spatial(shape[2:], strides[2:])
    if sp is None:
        return None
    S, stride_s = sp
    stride_n = strides[0] if N != 1 else None
    stride_c = strides[1] if C != 1 else None
    if S == 1:
        stride_s = None
    # Fold n into the row index when rows step uniformly (channels_last, (N, C) inputs):
    # one long row range per channel balances better than N short ones.
    if N == 1:
        pass
    elif S == 1:
        N, S, stride_n, stride_s = 1, N, None, stride_n
    elif stride_n == S * stride_s:
        N, S, stride_n = 1, N * S, None
    stride_n = 0 if stride_n is None else stride_n
    if stride_c == 1 and stride_s != 1:
        return N, C, S, stride_n, 1, (0 if stride_s is None else stride_s)
    if stride_s in (1, None):
        return N, C, S, stride_n, (0 if stride_c is None else stride_c), 1
    if stride_c is None:
        return N, C, S, stride_n, 1, stride_s
    return None


def supported_layout(x: torch.Tensor) -> bool:
    """True if the kernels read ``x`` in place (metadata only: works on fake tensors)."""
    if not _is_dense(x):
        return False
    return _ncs(tuple(x.shape), tuple(x.stride())) is not None


def _is_dense(x: torch.Tensor) -> bool:
    # Non-overlapping and dense: some permutation of the dims is contiguous.
    if x.numel() <= 1:
        return True
    dims = sorted((st, n) for n, st in zip(x.shape, x.stride(), strict=True) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True


def prepare_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when the kernels can read it in place, else a contiguous copy."""
    return x if supported_layout(x) else x.contiguous()


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised output with exactly the strides of (prepared) ``x``."""
    return _alloc.empty_like(x, memory_format=torch.preserve_format)


def match_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s strides (a copy only if they differ, e.g. a contiguous dy for a
    channels_last x), so that one set of strides addresses every tensor of a kernel."""
    if t.stride() == like.stride() or t.numel() <= 1:
        return t
    out = torch.empty_like(like, memory_format=torch.preserve_format)
    out.copy_(t)
    return out


def make_plan(x: torch.Tensor) -> Plan:
    """Plan for a prepared (supported-layout) input."""
    ncs = _ncs(tuple(x.shape), tuple(x.stride()))
    assert ncs is not None, "prepare_input() first"
    N, C, S, stride_n, stride_c, stride_s = ncs
    orientation = "s_inner" if stride_s == 1 else "c_inner"
    block_c, block_s = choose_tile(orientation, C, S, x.dtype)
    return Plan(N, C, S, stride_n, stride_c, stride_s, orientation, block_c, block_s)


# ----------------------------------------------------------------------------- heuristics


def choose_tile(orientation: str, C: int, S: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) for a layout: the smallest tile of the table that covers the inner
    extent (S for spatial-inner, C for channel-inner), else the widest one."""
    if dtype == torch.float64:
        return FP64_TILES[orientation]
    if orientation == "s_inner":
        for block_c, block_s in S_INNER_TILES:
            if S <= block_s:
                return block_c, block_s
        return S_INNER_TILES[-1]
    for block_c, block_s in C_INNER_TILES:
        if C <= block_c:
            return block_c, block_s
    return C_INNER_TILES[-1]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs a split reduction should launch to fill the device several times over."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return PROGRAMS_PER_SM * _sm_count(index)
    return PROGRAMS_PER_SM * INTERPRETER_SMS


def num_splits(plan: Plan, target: int) -> tuple[int, int]:
    """(splits, tiles_per_split): split each channel block's tiles into contiguous ranges so
    that splits * channel blocks reaches target_programs (few channels with huge spatial
    size get many splits; many channels with tiny spatial size get few). No split is empty."""
    want = math.ceil(target / plan.n_cblocks)
    splits = max(1, min(want, plan.n_tiles, MAX_SPLITS))
    tiles_per_split = math.ceil(plan.n_tiles / splits)
    return math.ceil(plan.n_tiles / tiles_per_split), tiles_per_split


# ----------------------------------------------------------------------------- launchers


def _meta(plan: Plan) -> dict:
    return dict(BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=NUM_WARPS,
                enable_fp_fusion=FP_FUSION)


def stats_partials(x: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(part [3, P, C], shift [C]) acc: per-split (count, mean - shift, M2). One read of x."""
    splits, tiles_per_split = num_splits(plan, target_programs(x.device))
    part = _alloc.empty((3, splits, plan.C), dtype=acc_dtype(x.dtype), device=x.device)
    shift = _alloc.empty((plan.C,), dtype=acc_dtype(x.dtype), device=x.device)
    with device_guard(x):
        bn_kernels.bn_stats_partial_kernel[(splits * plan.n_cblocks,)](
            x, part, shift, plan.C, plan.S, *plan.strides,
            plan.tiles_per_n, tiles_per_split, plan.n_tiles, splits, splits * plan.C,
            **_meta(plan))
    return part, shift


def _merge_grid(C: int):
    return (max(1, math.ceil(C / MERGE_BLOCK_C)),)


def merge_stats_local(part: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """[3, C] acc: (count, mean, M2) merged over stats_partials' parts in order (a rank's
    local statistics)."""
    _, n_parts, C = part.shape
    out = _alloc.empty((3, C), dtype=part.dtype, device=part.device)
    with device_guard(part):
        bn_kernels.bn_merge_stats_kernel[_merge_grid(C)](
            part, n_parts, C, C, n_parts * C, shift, 1, out[0], out[1], out[2],
            out, out, _dummy_i64(part.device), 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0,
            BLOCK_P=MERGE_BLOCK_P, BLOCK_C=MERGE_BLOCK_C, num_warps=MERGE_NUM_WARPS,
            enable_fp_fusion=FP_FUSION)
    return out


def merge_stats_final(part: torch.Tensor, part_stride: int, field_stride: int, n_parts: int,
                      C: int, eps: float, running_mean=None, running_var=None,
                      num_batches_tracked=None, momentum: float = 0.0,
                      cumulative: bool = False, want_count: bool = False, shift=None):
    """(mean, invstd[, count]) [C] acc, merged over the parts in order; updates the running
    buffers (acc dtype, in place) if given. shift: [C] the part means are relative to."""
    dev = part.device
    mean = _alloc.empty((C,), dtype=part.dtype, device=dev)
    invstd = _alloc.empty((C,), dtype=part.dtype, device=dev)
    count = _alloc.empty((C,), dtype=part.dtype, device=dev) if want_count else mean
    update = running_mean is not None
    nbt = num_batches_tracked if (cumulative and num_batches_tracked is not None) else None
    with device_guard(part):
        bn_kernels.bn_merge_stats_kernel[_merge_grid(C)](
            part, n_parts, C, part_stride, field_stride,
            shift if shift is not None else mean, int(shift is not None), mean, invstd, count,
            running_mean if update else mean, running_var if update else mean,
            nbt if nbt is not None else _dummy_i64(dev), *split_f64(float(momentum)),
            *split_f64(float(eps)), 1, int(update), int(nbt is not None), int(want_count),
            BLOCK_P=MERGE_BLOCK_P, BLOCK_C=MERGE_BLOCK_C, num_warps=MERGE_NUM_WARPS,
            enable_fp_fusion=FP_FUSION)
    return (mean, invstd, count) if want_count else (mean, invstd)


def apply(x: torch.Tensor, plan: Plan, mean, scale, scale_is_var: bool, weight, bias,
          eps: float) -> torch.Tensor:
    """y = (x - mean) * invstd * weight + bias in x's layout and dtype. weight/bias: acc or None."""
    y = output_like(x)
    with device_guard(x):
        bn_kernels.bn_apply_kernel[(plan.n_tiles * plan.n_cblocks,)](
            x, y, mean, scale, weight if weight is not None else mean,
            bias if bias is not None else mean,
            plan.C, plan.S, *plan.strides, plan.tiles_per_n, plan.n_tiles,
            *split_f64(float(eps)), int(scale_is_var), int(weight is not None),
            int(bias is not None), **_meta(plan))
    return y


def bwd_partials(x: torch.Tensor, dy: torch.Tensor, plan: Plan, mean, scale,
                 scale_is_var: bool, eps: float) -> torch.Tensor:
    """[2, P, C] acc: per-split (sum dy, sum dy * x_hat). One read of x and dy."""
    splits, tiles_per_split = num_splits(plan, target_programs(x.device))
    part = _alloc.empty((2, splits, plan.C), dtype=acc_dtype(x.dtype), device=x.device)
    with device_guard(x):
        bn_kernels.bn_bwd_partial_kernel[(splits * plan.n_cblocks,)](
            x, dy, mean, scale, part, plan.C, plan.S, *plan.strides,
            plan.tiles_per_n, tiles_per_split, plan.n_tiles, splits, splits * plan.C,
            *split_f64(float(eps)), int(scale_is_var), **_meta(plan))
    return part


def bwd_merge(part: torch.Tensor, want_grads: bool):
    """(sums [2, C], grad_weight [C], grad_bias [C]) acc from [2, P, C] partials, in order.
    Without want_grads the two gradients are empty."""
    _, n_parts, C = part.shape
    dev = part.device
    sums = _alloc.empty((2, C), dtype=part.dtype, device=dev)
    gw = _alloc.empty((C if want_grads else 0,), dtype=part.dtype, device=dev)
    gb = _alloc.empty((C if want_grads else 0,), dtype=part.dtype, device=dev)
    with device_guard(part):
        bn_kernels.bn_bwd_merge_kernel[_merge_grid(C)](
            part, n_parts, C, C, n_parts * C, sums,
            gw if want_grads else sums, gb if want_grads else sums, int(want_grads),
            BLOCK_P=MERGE_BLOCK_P, BLOCK_C=MERGE_BLOCK_C, num_warps=MERGE_NUM_WARPS,
            enable_fp_fusion=FP_FUSION)
    return sums, gw, gb


def dx(x: torch.Tensor, dy: torch.Tensor, plan: Plan, mean, scale, scale_is_var: bool, weight,
       sums, count, training: bool, eps: float) -> torch.Tensor:
    """Input gradient in x's layout and dtype. count: an integer (m, passed exactly), or a [C]
    acc tensor holding a count known only on the device (SyncBatchNorm). sums: [2, C] acc
    (ignored in eval)."""
    out = output_like(x)
    count_is_tensor = isinstance(count, torch.Tensor)
    with device_guard(x):
        bn_kernels.bn_bwd_dx_kernel[(plan.n_tiles * plan.n_cblocks,)](
            x, dy, out, mean, scale, weight if weight is not None else mean,
            sums if sums is not None else mean, count if count_is_tensor else mean,
            0 if count_is_tensor else int(count),
            plan.C, plan.S, *plan.strides, plan.tiles_per_n, plan.n_tiles,
            *split_f64(float(eps)), int(scale_is_var), int(weight is not None),
            int(training), int(count_is_tensor), **_meta(plan))
    return out


_DUMMIES: dict = {}


def _dummy_i64(device: torch.device) -> torch.Tensor:
    """A never-dereferenced int64 pointer argument (keeps the kernel signature fixed)."""
    key = str(device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=torch.int64, device=device)
    return _DUMMIES[key]


# ----------------------------------------------------------------------------- static configs

_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
       torch.float64: "fp64"}


def _tiles_for(dtype: torch.dtype, orientation: str):
    if dtype == torch.float64:
        return [FP64_TILES[orientation]]
    return list(S_INNER_TILES if orientation == "s_inner" else C_INNER_TILES)


def static_configs():
    """Every kernel configuration the heuristics above can choose (for offline compilation):
    4 tiled kernels x dtype x orientation x tile table, plus the two merges per acc dtype."""
    from .static_check import KernelConfig

    k = bn_kernels
    configs = []
    for dtype in DTYPES:
        x, acc = "*" + _TL[dtype], "*" + _TL[acc_dtype(dtype)]
        for orientation in ("s_inner", "c_inner"):
            unit = "stride_s" if orientation == "s_inner" else "stride_c"
            strides = {"stride_n": "i32", "stride_c": "i32", "stride_s": "i32"}
            strides[unit] = "constexpr"
            tiled = {
                "stats_partial": (k.bn_stats_partial_kernel, {
                    "x_ptr": x, "part_ptr": acc, "shift_ptr": acc, "C": "i32", "S": "i32",
                    **strides,
                    "tiles_per_n": "i32", "tiles_per_split": "i32", "n_tiles": "i32",
                    "n_splits": "i32", "part_field_stride": "i32"}),
                "apply": (k.bn_apply_kernel, {
                    "x_ptr": x, "y_ptr": x, "mean_ptr": acc, "scale_ptr": acc,
                    "weight_ptr": acc, "bias_ptr": acc, "C": "i32", "S": "i32", **strides,
                    "tiles_per_n": "i32", "n_tiles": "i32", "eps_hi": "fp32", "eps_lo": "fp32",
                    "scale_is_var": "i32",
                    "has_weight": "i32", "has_bias": "i32"}),
                "bwd_partial": (k.bn_bwd_partial_kernel, {
                    "x_ptr": x, "dy_ptr": x, "mean_ptr": acc, "scale_ptr": acc,
                    "part_ptr": acc, "C": "i32", "S": "i32", **strides,
                    "tiles_per_n": "i32", "tiles_per_split": "i32", "n_tiles": "i32",
                    "n_splits": "i32", "part_field_stride": "i32", "eps_hi": "fp32",
                    "eps_lo": "fp32", "scale_is_var": "i32"}),
                "bwd_dx": (k.bn_bwd_dx_kernel, {
                    "x_ptr": x, "dy_ptr": x, "dx_ptr": x, "mean_ptr": acc, "scale_ptr": acc,
                    "weight_ptr": acc, "sums_ptr": acc, "count_ptr": acc, "count": "i32",
                    "C": "i32", "S": "i32", **strides, "tiles_per_n": "i32", "n_tiles": "i32",
                    "eps_hi": "fp32", "eps_lo": "fp32",
                    "scale_is_var": "i32", "has_weight": "i32", "training": "i32",
                    "count_from_ptr": "i32"}),
            }
            for block_c, block_s in _tiles_for(dtype, orientation):
                for name, (fn, sig) in tiled.items():
                    sig = dict(sig, BLOCK_C="constexpr", BLOCK_S="constexpr")
                    aligned = tuple(a for a in sig if a.endswith("_ptr"))
                    # Sizes and strides divisible by 16: the widest-vector variant. Triton
                    # also builds variants for other divisibilities; they differ only in
                    # load width.
                    aligned += tuple(s for s in ("C", "S", "stride_n", "stride_c", "stride_s")
                                     if sig[s] != "constexpr")
                    configs.append(KernelConfig(
                        name=f"bn_{name}[{_TL[dtype]},{orientation},{block_c}x{block_s}]",
                        fn=fn, signature=sig,
                        constexprs={unit: 1, "BLOCK_C": block_c, "BLOCK_S": block_s},
                        num_warps=NUM_WARPS, aligned=aligned))
    for acc_dt in (torch.float32, torch.float64):
        acc = "*" + _TL[acc_dt]
        merges = {
            "merge_stats": (k.bn_merge_stats_kernel, {
                "part_ptr": acc, "n_parts": "i32", "C": "i32", "part_stride": "i32",
                "field_stride": "i32", "shift_ptr": acc, "has_shift": "i32",
                "out0_ptr": acc, "out1_ptr": acc, "out2_ptr": acc,
                "running_mean_ptr": acc, "running_var_ptr": acc, "nbt_ptr": "*i64",
                "momentum_hi": "fp32", "momentum_lo": "fp32", "eps_hi": "fp32",
                "eps_lo": "fp32", "final": "i32", "update_running": "i32",
                "cumulative": "i32", "write_count": "i32"}),
            "bwd_merge": (k.bn_bwd_merge_kernel, {
                "part_ptr": acc, "n_parts": "i32", "C": "i32", "part_stride": "i32",
                "field_stride": "i32", "sums_ptr": acc, "grad_weight_ptr": acc,
                "grad_bias_ptr": acc, "write_grads": "i32"}),
        }
        for name, (fn, sig) in merges.items():
            sig = dict(sig, BLOCK_P="constexpr", BLOCK_C="constexpr")
            configs.append(KernelConfig(
                name=f"bn_{name}[{_TL[acc_dt]}]", fn=fn, signature=sig,
                constexprs={"BLOCK_P": MERGE_BLOCK_P, "BLOCK_C": MERGE_BLOCK_C},
                num_warps=MERGE_NUM_WARPS,
                aligned=tuple(a for a in sig if a.endswith("_ptr"))))
    return configs
