"""BatchNorm launchers: layout planning, launch heuristics and one function per kernel step.

The steps compose into single-process BatchNorm (ops/batch_norm.py) and SyncBatchNorm:

    forward:  stats (split partials, merged by the last program) -> apply      2 launches
              (Sync: stats(local) -> all_gather -> merge_stats_final -> apply)
    backward: bwd_reduce (partials, merged by the last program) -> grad_input  2 launches
              (Sync: ... bwd_reduce -> all_reduce(sums) -> grad_input with the global count)

apply and grad_input carry the fused epilogue act(bn(x) + residual) and its gradient.
Plans are cached per (shape, strides, dtype, device, target programs); host floats are
packed once per value. Everything here runs on the host but never reads device data: no
synchronisation. `plan_batch_norm` states the kernels, launches and bytes of one call
(what `python -m bench plan --op bn` prints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import struct

import torch

from . import _alloc
from ._launch_util import MAX_REGS_PER_THREAD, maxnreg_option, resident_programs
from ._runtime import FP_FUSION, acc_dtype
from ._runtime import device_guard as _cuda_guard
from .kernels import batch_norm as bn_kernels

# Elements per tile: 2048 elements = 16 per thread at 4 warps (fp32: four 16-byte loads per
# thread per operand), enough bytes in flight per SM while the accumulators stay in registers.
TILE_ELEMS = 2048
NUM_WARPS = 4
# No software pipelining of the reduction loops: Triton's default (3 stages) keeps more tiles
# in registers; the loops do not need it (4 resident programs x 4 warps x 64 B per thread in
# flight), and the elementwise passes have no loop.
NUM_STAGES = 1
# Spatial-inner (NCHW-like) tiles, chosen by the spatial size S: (BLOCK_C, BLOCK_S).
S_INNER_TILES = ((32, 64), (8, 256), (2, 1024), (1, 2048))
# Channel-inner (channels_last-like) tiles, chosen by the channel count C: (BLOCK_C, BLOCK_S).
# Widest: 64 channels (a 128x16 tile spilled the statistics kernel's per-lane accumulators
# on sm_80 in fp32; rows of 64 channels are still 128-256 contiguous bytes).
C_INNER_TILES = ((4, 512), (16, 128), (32, 64), (64, 32))
# Flat tiles: when channels are innermost and each sample's (position x channel) block is one
# contiguous run (channels_last, channels_last_3d, (N, C) rows, C == 1 in any dense layout)
# and C <= FLAT_MAX_C, the kernels read that run as flat 16-byte vectors: a tile of
# [next_pow2(C) rows, FLAT_TILE_ELEMS / next_pow2(C)] lanes over C * BLOCK_S contiguous
# elements, each lane's channel = its flat offset % C (fixed across tiles), instead of
# [4 x 512] channel-inner tiles whose rows of C elements (6-12 bytes for C = 3) cannot be
# vectorised. Rows beyond C (C = 3, 5, 6, 7) are masked whole, so vectors stay whole.
# C <= 8: the per-lane parameters come from a static select over the C channels, and the
# reductions merge lanes once per channel; both costs grow with C.
FLAT_MAX_C = 8
FLAT_TILE_ELEMS = TILE_ELEMS
# C not a power of two (3, 5, 6, 7): a lane's channel varies along both tile axes, so the
# per-lane parameters take a register per element instead of one per column; half the
# lanes keep those kernels near the others' register counts (python -m bench static).
FLAT_TILE_ELEMS_NPOT = TILE_ELEMS // 2
# float64 is the gradcheck/correctness path: one tile per orientation keeps the compile list
# short; 1024 elements (2048 spill in the fp64 reductions; the shapes are those ptxas
# compiles spill-free, see test_static_compile_sm90).
FP64_TILES = {"s_inner": (4, 256), "c_inner": (32, 32)}
# Merges: [parts, channels] per step. SyncBatchNorm's merge of per-rank statistics takes
# [MERGE_BLOCK_P, MERGE_BLOCK_C]; the reductions' last program merges [merge_block_p(BLOCK_C),
# BLOCK_C] (at most MERGE_ELEMS values per field: wide channel blocks take fewer parts per
# step, so the merge never needs more registers than the loop before it).
MERGE_BLOCK_P = 32
MERGE_ELEMS = 1024
MERGE_BLOCK_C = 64
MERGE_NUM_WARPS = 4
# Activation names -> kernel codes (kernels/batch_norm.py ACT_*); all are fused.
ACTIVATION_CODES = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4,
                    "leaky_relu": 5, "hardswish": 6}
# Entries kept in the plan cache before it is cleared (bounds memory for dynamic shapes).
PLAN_CACHE_SIZE = 1024
# Upper bound on splits per channel block: bounds the partial buffers and the merge's work.
MAX_SPLITS = 512
# Programs per SM to aim for in the split reductions: as many as fit at once (one full
# wave, every program's partial ready for the last one's merge, no second partial wave), from
# what binds the compiled reductions (bn_stats_kernel, bn_bwd_reduce_kernel) at NUM_WARPS:
# registers. Left alone, ptxas gives the statistics kernel up to 161 registers (fp32, flat
# C = 1, sm_80; 149 at C = 8; 138-139 for the 64 x 32 fp32/fp16 tile on sm_90): 3
# programs per SM, so a grid of 4 per SM ran in 1.33 waves. Both reductions are therefore
# capped at REDUCTION_REGISTERS for every dtype but float64 (the correctness path, 158-236
# registers, uncapped), and the offline report (python -m bench static, sm_90 and sm_80,
# every tile and activation) shows them spill-free there; their shared memory
# (<= REDUCTION_SHARED_BYTES of reduction scratch) and 4-warp blocks never bind.
# tests/test_bn_flat_tiles.py pins the arithmetic.
REDUCTION_REGISTERS = 128
REDUCTION_SHARED_BYTES = 8192
# Shared memory per SM on sm_80 (sm_90 has more): the one limit ops/_launch_util.py leaves
# to the caller.
SM_SHARED_BYTES = 164 * 1024


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int = 0) -> int:
    """Programs of ``num_warps`` warps, ``registers`` per thread and ``shared_bytes`` of
    shared memory each that one SM holds at once (at least 1): registers, threads and
    blocks as _launch_util.resident_programs counts them, and shared memory."""
    fits = resident_programs(num_warps, registers)
    if shared_bytes:
        fits = min(fits, SM_SHARED_BYTES // shared_bytes)
    return max(1, fits)


PROGRAMS_PER_SM = programs_per_sm(REDUCTION_REGISTERS, NUM_WARPS, REDUCTION_SHARED_BYTES)
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
    orientation: str  # "s_inner" (stride_s == 1), "c_inner" (stride_c == 1) or "flat"
    block_c: int
    block_s: int
    splits: int = 1  # programs per channel block in the reductions
    tiles_per_split: int = 1
    flat_c: int = 0  # "flat": C (the kernels' FLAT_C), else 0
    max_registers: int = 0  # maxnreg of the statistics kernel (reduction_register_cap)
    # Per call-signature state of the ops built on this plan (ops/_bn_call.py), built on the
    # first call with that signature; it lives and dies with this plan's cache entry.
    calls: dict = dataclasses.field(default_factory=dict, init=False, compare=False,
                                    repr=False)

    def __hash__(self) -> int:
        # Computed once: plans key the launch caches below, hashed on every launch.
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.compare))

    # Derived sizes, computed once per (cached) plan.
    @functools.cached_property
    def tiles_per_n(self) -> int:
        return max(1, math.ceil(self.S / self.block_s))

    @functools.cached_property
    def n_tiles(self) -> int:
        return self.N * self.tiles_per_n

    @functools.cached_property
    def n_cblocks(self) -> int:
        return max(1, math.ceil(self.C / self.block_c))

    @functools.cached_property
    def strides(self) -> tuple[int, int, int]:
        return self.stride_n, self.stride_c, self.stride_s

    @functools.cached_property
    def reduce_grid(self) -> tuple[int]:
        """Grid of the split reductions: splits x channel blocks."""
        return (self.splits * self.n_cblocks,)

    @functools.cached_property
    def tile_grid(self) -> tuple[int]:
        """Grid of the elementwise passes: one program per tile."""
        return (self.n_tiles * self.n_cblocks,)


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
    elif stride_s == N * stride_n:
        # Positions outside samples ((L, N, C) or (L, N) storage, sequence-first): the
        # statistics do not depend on the order of (n, s), so the row runs n-fastest.
        N, S, stride_n, stride_s = 1, N * S, None, stride_n
    stride_n = 0 if stride_n is None else stride_n
    if stride_c == 1 and stride_s != 1:
        return N, C, S, stride_n, 1, (0 if stride_s is None else stride_s)
    if stride_s in (1, None):
        return N, C, S, stride_n, (0 if stride_c is None else stride_c), 1
    if stride_c is None:
        return N, C, S, stride_n, 1, stride_s
    return None


_SUPPORTED: dict = {}


def supported_layout(x: torch.Tensor) -> bool:
    """True if the kernels read ``x`` in place (metadata only: works on fake tensors).
    Cached per (shape, strides)."""
    key = (x.shape, x.stride())
    try:
        ok = _SUPPORTED.get(key)
    except TypeError:  # symbolic sizes (fake tensors under torch.compile): not cached
        return _is_dense(x) and _ncs(tuple(x.shape), tuple(x.stride())) is not None
    if ok is None:
        if len(_SUPPORTED) >= PLAN_CACHE_SIZE:
            _SUPPORTED.clear()
        ok = _SUPPORTED[key] = _is_dense(x) and _ncs(tuple(x.shape),
                                                     tuple(x.stride())) is not None
    return ok


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
    if like.is_contiguous():
        return t.contiguous()  # one call instead of two (an expanded dy, for instance)
    out = torch.empty_like(like, memory_format=torch.preserve_format)
    out.copy_(t)
    return out


_PLANS: dict = {}


def planned(x: torch.Tensor) -> Plan | None:
    """The cached plan of ``x`` if one was made for exactly its (shape, strides, dtype,
    device, target programs), else None: a dictionary lookup, for the ops' hot path."""
    # x.is_cuda rather than target_programs' device.type: a string built per read.
    target = target_programs(x.device) if x.is_cuda else PROGRAMS_PER_SM * INTERPRETER_SMS
    return _PLANS.get((x.shape, x.stride(), x.dtype, x.device, target))


def make_plan(x: torch.Tensor) -> Plan:
    """Plan for a prepared (supported-layout) input, cached per (shape, strides, dtype,
    device, target programs): the layout analysis and the split choice run once per shape."""
    target = target_programs(x.device)
    key = (x.shape, x.stride(), x.dtype, x.device, target)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= PLAN_CACHE_SIZE:
            _PLANS.clear()
        plan = _PLANS[key] = _new_plan(tuple(x.shape), tuple(x.stride()), x.dtype, target)
    return plan


def _new_plan(shape, strides, dtype, target) -> Plan:
    ncs = _ncs(shape, strides)
    assert ncs is not None, "prepare_input() first"
    N, C, S, stride_n, stride_c, stride_s = ncs
    flat = choose_flat_tile(C, stride_c, stride_s, dtype)
    if flat is not None:
        plan = Plan(N, C, S, stride_n, stride_c, stride_s, "flat", *flat, flat_c=C)
    else:
        orientation = "s_inner" if stride_s == 1 else "c_inner"
        block_c, block_s = choose_tile(orientation, C, S, dtype)
        plan = Plan(N, C, S, stride_n, stride_c, stride_s, orientation, block_c, block_s)
    splits, tiles_per_split = num_splits(plan, target)
    return dataclasses.replace(plan, splits=splits, tiles_per_split=tiles_per_split,
                               max_registers=reduction_register_cap(dtype))


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


def choose_flat_tile(C: int, stride_c: int, stride_s: int,
                     dtype: torch.dtype) -> tuple[int, int] | None:
    """(BLOCK_C, BLOCK_S) of a flat tile for a layout whose channels are innermost and whose
    positions step by exactly C (each sample one contiguous run of S * C elements; C == 1:
    any unit spatial stride), C <= FLAT_MAX_C; None otherwise. BLOCK_C = next power of two
    >= C rows of BLOCK_S contiguous lanes. float64 keeps the channel-inner tiles: its
    correctness path gains nothing from wider vectors."""
    if dtype == torch.float64 or C > FLAT_MAX_C or stride_s != C:
        return None
    if C > 1 and stride_c != 1:
        return None
    rows = 1 << (C - 1).bit_length()
    return rows, (FLAT_TILE_ELEMS if rows == C else FLAT_TILE_ELEMS_NPOT) // rows


def merge_block_p(block_c: int) -> int:
    """Parts per merge step in a reduction's last program (a power of two <= MERGE_BLOCK_P)."""
    return max(1, min(MERGE_BLOCK_P, MERGE_ELEMS // block_c))


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


@functools.lru_cache(maxsize=256)
def host_pair(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo fp32 (see kernels' _host_float), packed once per value."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    lo = struct.unpack("f", struct.pack("f", value - hi))[0]
    return hi, lo


_TICKETS: dict = {}
_WORKSPACES: dict = {}


def _stream_key(device: torch.device):
    if device.type == "cuda":
        return device.index, torch.cuda.current_stream(device).cuda_stream
    return device.type


def _tickets(device: torch.device, n: int, stream=None) -> torch.Tensor:
    """Zeroed int32 counters for the reductions' last-program merge, one per channel block.
    Each launch leaves them zero again, so one buffer per (device, stream) serves every
    launch in stream order (kept alive here: a CUDA graph replays with the same buffer).
    stream: _stream_key(device), if the caller has it."""
    key = _stream_key(device) if stream is None else stream
    t = _TICKETS.get(key)
    if t is None or t.numel() < n:
        t = _TICKETS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return t


def _workspace(device: torch.device, dtype: torch.dtype, n: int, stream=None,
               slot: str = "part") -> torch.Tensor:
    """Scratch that lives only between launches in stream order: a reduction's split partials
    (slot "part": its last program merges them) or the backward's sums (slot "sums": the next
    launch reads them). Launches in stream order share one buffer per (device, stream, dtype,
    slot); it only grows. Under test poisoning a fresh NaN-filled buffer every time."""
    if _alloc.poisoning():
        return _alloc.empty((n,), dtype=dtype, device=device)
    key = (_stream_key(device) if stream is None else stream, dtype, slot)
    t = _WORKSPACES.get(key)
    if t is None or t.numel() < n:
        t = _WORKSPACES[key] = torch.empty(max(n, 4096), dtype=dtype, device=device)
    return t


_SCRATCH: dict = {}


def scratch(x: torch.Tensor, dtype: torch.dtype, n_parts: int, n_tickets: int,
            n_sums: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(partials, tickets, sums) of a reduction launch over x on its device's current stream:
    the buffers of _workspace and _tickets (sums: the backward's, for when the next launch in
    stream order is their only reader), found with one lookup per (stream, dtype)."""
    device = x.device
    if _alloc.poisoning():
        stream = _stream_key(device)
        return (_workspace(device, dtype, n_parts, stream), _tickets(device, n_tickets, stream),
                _workspace(device, dtype, n_sums, stream, slot="sums"))
    # (x.is_cpu: _stream_key's device.type is a string built per read.)
    stream = "cpu" if x.is_cpu else _stream_key(device)
    key = (stream, dtype)
    got = _SCRATCH.get(key)
    if got is None or n_parts > got[3] or n_tickets > got[4] or n_sums > got[5]:
        bufs = (_workspace(device, dtype, n_parts, stream), _tickets(device, n_tickets, stream),
                _workspace(device, dtype, n_sums, stream, slot="sums"))
        got = _SCRATCH[key] = bufs + tuple(b.numel() for b in bufs)
    return got[0], got[1], got[2]


_NO_GUARD = contextlib.nullcontext()


def device_guard(x: torch.Tensor):
    """x's CUDA device made current around a launch (a shared no-op context elsewhere)."""
    return _cuda_guard(x) if x.is_cuda else _NO_GUARD


def reduction_register_cap(dtype: torch.dtype) -> int:
    """maxnreg of the split reductions (0: ptxas' choice): REDUCTION_REGISTERS, so that
    PROGRAMS_PER_SM of them fit on an SM, except for float64 (see REDUCTION_REGISTERS)."""
    return 0 if dtype == torch.float64 else REDUCTION_REGISTERS


def bwd_reduce_register_cap(dtype: torch.dtype) -> dict:
    """maxnreg for the backward reduction (reduction_register_cap). With 16-bit inputs ptxas
    left alone also settles at 80 registers for the hardswish epilogue on sm_90 and
    spills; every tile fits in 128 (the offline report checks it)."""
    return maxnreg_option(reduction_register_cap(dtype))


def _stats_options(plan: Plan) -> dict:
    return maxnreg_option(plan.max_registers)


def dx_register_cap(dtype: torch.dtype) -> dict:
    """maxnreg for the input-gradient kernel. In float64 ptxas left alone settles at 128
    registers on sm_80 for the gelu epilogue on the channel-inner tile and spills 8-16 B
    (Triton 3.8 and 3.9); that kernel needs ~180. float64 is the correctness path, so let it
    use up to the hardware's 255 per thread. Other dtypes keep ptxas' choice."""
    if dtype == torch.float64:
        return maxnreg_option(MAX_REGS_PER_THREAD)
    return {}


def apply_register_cap(plan: Plan) -> dict:
    """maxnreg for the forward epilogue on flat tiles. Left alone, ptxas (Triton 3.9, sm_80)
    settles at 48 registers for fp32 with C = 7 and spills 8-16 B; capped at 128 it takes
    what it needs, spill-free (python -m bench static). Other tiles keep ptxas' choice."""
    return maxnreg_option(REDUCTION_REGISTERS if plan.flat_c else None)


def _meta(plan: Plan) -> dict:
    return dict(BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, FLAT_C=plan.flat_c,
                num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)


@dataclasses.dataclass(frozen=True, eq=False)
class Launch:
    """One kernel launch with everything but its tensor arguments decided, built once per
    (plan, configuration) by the ``*_launch`` functions below: the kernel's name in
    kernels/batch_norm.py (looked up at each launch, so that tests may wrap it), its grid,
    the arguments that follow the tensors (scalars, flags, constexprs, in the kernel's
    parameter order) and the options of Triton's ``run`` (what ``kernel[grid](...)``
    calls): grid, num_warps, compile options."""

    kernel: str
    grid: tuple
    args: tuple
    options: dict

    def __call__(self, *tensors) -> None:
        getattr(bn_kernels, self.kernel).run(*tensors, *self.args, **self.options)


# Keywords of Triton's run that are not kernel parameters.
_RUN_OPTIONS = frozenset({"num_warps", "num_stages", "enable_fp_fusion", "maxnreg"})


def _launch(kernel: str, grid: tuple, scalars: tuple, **keywords) -> Launch:
    """A Launch whose flags and constexprs are named here (for the reader) and passed by
    position (a keyword argument costs Triton a dictionary entry and a lookup per launch):
    they are the kernel's last parameters, after the tensors and ``scalars``."""
    names = list(getattr(bn_kernels, kernel).arg_names)
    tail = [n for n in names if n in keywords and n not in _RUN_OPTIONS]
    assert tail == names[len(names) - len(tail):], (kernel, tail)
    args = scalars + tuple(keywords.pop(n) for n in tail)
    return Launch(kernel, grid, args, dict(keywords, grid=grid, warmup=False))


# The launch builders are cached per argument values (plans hash once, see Plan.__hash__):
# a launch's arguments are assembled on the first call with a configuration.
_launch_cache = functools.lru_cache(maxsize=PLAN_CACHE_SIZE)


@_launch_cache
def stats_launch(plan: Plan, eps: float, momentum: float, update_running: bool,
                 cumulative: bool, final: bool) -> Launch:
    """bn_stats_kernel; tensors: x, part, tickets, out, running_mean, running_var, nbt."""
    return _launch("bn_stats_kernel", plan.reduce_grid, (
        plan.C, plan.S, *plan.strides, plan.tiles_per_n, plan.tiles_per_split, plan.n_tiles,
        plan.splits, plan.splits * plan.C, *host_pair(float(momentum)),
        *host_pair(float(eps))),
        final=int(final), update_running=int(update_running), cumulative=int(cumulative),
        BLOCK_P=merge_block_p(plan.block_c), **_meta(plan), **_stats_options(plan))


@_launch_cache
def apply_launch(plan: Plan, scale_is_var: bool, has_weight: bool, has_bias: bool,
                 has_residual: bool, eps: float, activation: str, slope: float,
                 reverse: bool) -> Launch:
    """bn_apply_kernel; tensors: x, residual, y, mean, scale, weight, bias."""
    return _launch("bn_apply_kernel", plan.tile_grid, (
        plan.C, plan.S, *plan.strides, plan.tiles_per_n, plan.n_tiles,
        *host_pair(float(eps)), *host_pair(float(slope))),
        scale_is_var=int(scale_is_var), has_weight=int(has_weight), has_bias=int(has_bias),
        has_residual=int(has_residual), reverse=int(reverse),
        ACTIVATION=ACTIVATION_CODES[activation], **_meta(plan), **apply_register_cap(plan))


@_launch_cache
def bwd_reduce_launch(plan: Plan, dtype: torch.dtype, scale_is_var: bool, eps: float,
                      want_grads: bool, has_weight: bool, has_bias: bool, has_residual: bool,
                      activation: str, slope: float) -> Launch:
    """bn_bwd_reduce_kernel; tensors: x, dy, residual, mean, scale, weight, bias, part,
    tickets, sums, grad_weight, grad_bias."""
    return _launch("bn_bwd_reduce_kernel", plan.reduce_grid, (
        plan.C, plan.S, *plan.strides, plan.tiles_per_n, plan.tiles_per_split, plan.n_tiles,
        plan.splits, plan.splits * plan.C, *host_pair(float(eps)),
        *host_pair(float(slope))),
        scale_is_var=int(scale_is_var), has_weight=int(has_weight), has_bias=int(has_bias),
        has_residual=int(has_residual), reverse=0, write_grads=int(want_grads),
        ACTIVATION=ACTIVATION_CODES[activation], BLOCK_P=merge_block_p(plan.block_c),
        **_meta(plan), **bwd_reduce_register_cap(dtype))


@_launch_cache
def grad_input_launch(plan: Plan, dtype: torch.dtype, count: int | None, scale_is_var: bool,
                      has_weight: bool, has_bias: bool, has_residual: bool, training: bool,
                      eps: float, activation: str, slope: float, want_dx: bool,
                      want_dres: bool, reverse: bool) -> Launch:
    """bn_bwd_dx_kernel; tensors: x, dy, residual, dx, dres, mean, scale, weight, bias, sums,
    count_tensor. count: the element count m, or None when it is read from count_tensor."""
    return _launch("bn_bwd_dx_kernel", plan.tile_grid, (
        0 if count is None else int(count), plan.C, plan.S, *plan.strides, plan.tiles_per_n,
        plan.n_tiles, *host_pair(float(eps)), *host_pair(float(slope))),
        scale_is_var=int(scale_is_var), has_weight=int(has_weight), has_bias=int(has_bias),
        has_residual=int(has_residual), reverse=int(reverse), training=int(training),
        count_from_ptr=int(count is None), write_dx=int(want_dx), write_dres=int(want_dres),
        ACTIVATION=ACTIVATION_CODES[activation], **_meta(plan), **dx_register_cap(dtype))


def stats(x: torch.Tensor, plan: Plan, eps: float, running_mean=None, running_var=None,
          num_batches_tracked=None, momentum: float = 0.0, cumulative: bool = False,
          final: bool = True) -> torch.Tensor:
    """Batch statistics in one launch. final: [2, C] acc (mean, invstd), updating the running
    buffers (acc dtype, in place) if given (cumulative: factor 1 / num_batches_tracked, read
    on the device); not final: [3, C] acc (count, mean, M2), a rank's local statistics."""
    acc = acc_dtype(x.dtype)
    dev = x.device
    part, tickets, _ = scratch(x, acc, 3 * plan.splits * plan.C, plan.n_cblocks)
    out = _alloc.empty((2 if final else 3, plan.C), dtype=acc, device=dev)
    update = final and running_mean is not None
    nbt = num_batches_tracked if (update and cumulative) else None
    launch = stats_launch(plan, eps, momentum, update, nbt is not None, final)
    with device_guard(x):
        launch(x, part, tickets, out, running_mean if update else out,
               running_var if update else out, nbt if nbt is not None else dummy_i64(dev))
    return out


def stats_local(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """[3, C] acc: this rank's (count, mean, M2), one launch (SyncBatchNorm)."""
    return stats(x, plan, 0.0, final=False)


def _merge_grid(C: int):
    return (max(1, math.ceil(C / MERGE_BLOCK_C)),)


def merge_stats_final(part: torch.Tensor, part_stride: int, field_stride: int, n_parts: int,
                      C: int, eps: float, running_mean=None, running_var=None,
                      num_batches_tracked=None, momentum: float = 0.0,
                      cumulative: bool = False, want_count: bool = False):
    """(mean, invstd[, count]) [C] acc, merged over per-rank (count, mean, M2) parts in order
    (part p, field f, channel c at p * part_stride + f * field_stride + c); updates the
    running buffers (acc dtype, in place) if given."""
    dev = part.device
    out = _alloc.empty((3 if want_count else 2, C), dtype=part.dtype, device=dev)
    update = running_mean is not None
    nbt = num_batches_tracked if (cumulative and num_batches_tracked is not None) else None
    with device_guard(part):
        bn_kernels.bn_merge_final_kernel[_merge_grid(C)](
            part, n_parts, C, part_stride, field_stride, out,
            running_mean if update else out, running_var if update else out,
            nbt if nbt is not None else dummy_i64(dev), *host_pair(float(momentum)),
            *host_pair(float(eps)), update_running=int(update),
            cumulative=int(nbt is not None), write_count=int(want_count),
            BLOCK_P=MERGE_BLOCK_P, BLOCK_C=MERGE_BLOCK_C, num_warps=MERGE_NUM_WARPS,
            enable_fp_fusion=FP_FUSION)
    return tuple(out.unbind(0))


def apply(x: torch.Tensor, plan: Plan, mean, scale, scale_is_var: bool, weight, bias,
          eps: float, residual=None, activation: str = "identity", slope: float = 0.0,
          reverse: bool = False) -> torch.Tensor:
    """y = act((x - mean) * invstd * weight + bias + residual) in x's layout and dtype.
    weight/bias: acc or None; residual: x's strides and dtype, or None. reverse: visit tiles
    from the end (right after a reduction over x, whose last tiles are still in L2)."""
    y = output_like(x)
    launch = apply_launch(plan, scale_is_var, weight is not None, bias is not None,
                          residual is not None, eps, activation, slope, reverse)
    with device_guard(x):
        launch(x, residual if residual is not None else x, y, mean, scale,
               weight if weight is not None else mean, bias if bias is not None else mean)
    return y


def bwd_reduce(x: torch.Tensor, dy: torch.Tensor, plan: Plan, mean, scale, scale_is_var: bool,
               eps: float, want_grads: bool, weight=None, bias=None, residual=None,
               activation: str = "identity", slope: float = 0.0):
    """(sums [2, C], grad_weight [C], grad_bias [C]) acc in one launch: sum g and
    sum g * x_hat with g = dy * act'(z). Without want_grads the two gradients are empty."""
    acc = acc_dtype(x.dtype)
    dev = x.device
    C = plan.C
    part, tickets, _ = scratch(x, acc, 2 * plan.splits * C, plan.n_cblocks)
    sums = _alloc.empty((2, C), dtype=acc, device=dev)
    if want_grads:
        gw = _alloc.new_empty(sums, C)
        gb = _alloc.new_empty(sums, C)
    else:
        gw = gb = sums.new_empty((0,))
    launch = bwd_reduce_launch(plan, x.dtype, scale_is_var, eps, want_grads,
                               weight is not None, bias is not None, residual is not None,
                               activation, slope)
    with device_guard(x):
        launch(x, dy, residual if residual is not None else x, mean, scale,
               weight if weight is not None else mean, bias if bias is not None else mean,
               part, tickets, sums, gw if want_grads else sums, gb if want_grads else sums)
    return sums, gw, gb


def grad_input(x: torch.Tensor, dy: torch.Tensor, plan: Plan, mean, scale, scale_is_var: bool,
               weight, sums, count, training: bool, eps: float, bias=None, residual=None,
               activation: str = "identity", slope: float = 0.0, want_dx: bool = True,
               want_dres: bool = False, reverse: bool = False):
    """(dx, d(residual)) in x's layout and dtype (each None unless asked for). count: an
    integer (m, passed exactly), or a [C] acc tensor holding a count known only on the
    device (SyncBatchNorm). sums: [2, C] acc from bwd_reduce (ignored in eval). residual:
    read when an activation needs z (pass it whenever the forward had one)."""
    dx_out = output_like(x) if want_dx else None
    dres = output_like(x) if want_dres else None
    count_is_tensor = isinstance(count, torch.Tensor)
    launch = grad_input_launch(plan, x.dtype, None if count_is_tensor else count, scale_is_var,
                               weight is not None, bias is not None, residual is not None,
                               training, eps, activation, slope, want_dx, want_dres, reverse)
    with device_guard(x):
        launch(x, dy, residual if residual is not None else x,
               dx_out if want_dx else x, dres if want_dres else x, mean, scale,
               weight if weight is not None else mean, bias if bias is not None else mean,
               sums if sums is not None else mean, count if count_is_tensor else mean)
    return dx_out, dres


def dx(x: torch.Tensor, dy: torch.Tensor, plan: Plan, mean, scale, scale_is_var: bool, weight,
       sums, count, training: bool, eps: float) -> torch.Tensor:
    """Input gradient of plain BatchNorm (no epilogue): grad_input's dx."""
    return grad_input(x, dy, plan, mean, scale, scale_is_var, weight, sums, count, training,
                      eps)[0]


_DUMMIES: dict = {}


def dummy_i64(device: torch.device) -> torch.Tensor:
    """A never-dereferenced int64 pointer argument (keeps the kernel signature fixed)."""
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return t


# ----------------------------------------------------------------------------- plan and bytes


def kernel_accesses(kernel: str, training: bool, activation: str, residual: bool) -> int:
    """Tensor-sized accesses (reads + writes of one element) a kernel makes per element: the
    bytes model of each kernel's docstring, in one place."""
    act = activation != "identity"
    if kernel == "stats":
        return 1                                    # read x
    if kernel == "apply":
        return 2 + residual                         # read x [+ residual], write y
    if kernel == "bwd_reduce":
        return 2 + (act and residual)               # read x, dy [+ residual under act]
    if kernel == "bwd_dx":
        return (1 + (training or act)               # read dy, x (if needed)
                + (act and residual)                # read residual (z needs it)
                + 1 + residual)                     # write dx [and d(residual)]
    raise ValueError(kernel)


def torch_accesses(training: bool, activation: str, residual: bool) -> int:
    """The same count for torch's eager ops (separate BatchNorm, add and activation kernels):
    BN forward 3 (training: statistics read + normalise read/write) or 2, add 3, activation
    2; backward: activation 3 (read dy and its input/output, write), add 0 (the gradient is
    passed on), BN 5 (training: reduction read x, dy + dx read x, dy, write) or 2."""
    act = activation != "identity"
    fwd = (3 if training else 2) + 3 * residual + 2 * act
    bwd = 3 * act + (5 if training else 2)
    return fwd + bwd


@dataclasses.dataclass
class BNPlan:
    """What one fg.batch_norm call does: the launcher's own choices, for the bench plan and
    the benchmarks' bytes models."""

    layout: Plan
    kernels_fwd: list  # [(kernel name, grid, constexprs)]
    kernels_bwd: list
    accesses_fwd: int  # per element, in units of the element size
    accesses_bwd: int
    torch_accesses_fwd_bwd: int

    @property
    def launches_fwd(self) -> int:
        return len(self.kernels_fwd)

    @property
    def launches_bwd(self) -> int:
        return len(self.kernels_bwd)

    @property
    def bytes_per_elem_fwd_bwd(self) -> int:
        """Accesses per element of a forward + backward (units of the element size)."""
        return self.accesses_fwd + self.accesses_bwd

    def hbm_bytes(self, elem_size: int, fwd_only: bool = False) -> int:
        n = self.layout.N * self.layout.C * self.layout.S
        acc = self.accesses_fwd if fwd_only else self.bytes_per_elem_fwd_bwd
        return n * acc * elem_size


def plan_batch_norm(shape, dtype, *, channels_last: bool = False, training: bool = True,
                    activation: str = "identity", residual: bool = False,
                    sm_count: int | None = None) -> BNPlan:
    """The kernels, grids and bytes of one forward + backward (all gradients) of
    fg.batch_norm on an input of ``shape`` (channels_last: the NHWC / NDHWC layout).
    sm_count: the GPU's SMs (default: this machine's device, else 132, an H100)."""
    memory_format = torch.contiguous_format
    if channels_last:
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=memory_format)
    if sm_count is None:
        sm_count = _sm_count(torch.cuda.current_device()) if torch.cuda.is_available() else 132
    lay = _new_plan(tuple(x.shape), tuple(x.stride()), dtype, PROGRAMS_PER_SM * sm_count)
    code = ACTIVATION_CODES[activation]
    tile = dict(BLOCK_C=lay.block_c, BLOCK_S=lay.block_s, FLAT_C=lay.flat_c)
    red = dict(tile, BLOCK_P=merge_block_p(lay.block_c))
    fwd, bwd = [], []
    if training:
        fwd.append(("bn_stats_kernel", lay.reduce_grid, red))
    fwd.append(("bn_apply_kernel", lay.tile_grid, dict(tile, ACTIVATION=code)))
    bwd.append(("bn_bwd_reduce_kernel", lay.reduce_grid, dict(red, ACTIVATION=code)))
    bwd.append(("bn_bwd_dx_kernel", lay.tile_grid, dict(tile, ACTIVATION=code)))
    names = {"bn_stats_kernel": "stats", "bn_apply_kernel": "apply",
             "bn_bwd_reduce_kernel": "bwd_reduce", "bn_bwd_dx_kernel": "bwd_dx"}

    def total(kernels):
        return sum(kernel_accesses(names[k], training, activation, residual)
                   for k, _, _ in kernels)

    return BNPlan(lay, fwd, bwd, total(fwd), total(bwd),
                  torch_accesses(training, activation, residual))
