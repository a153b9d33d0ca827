"""Launchers and launch heuristics for the cross-entropy kernels.

Logits of shape (C,), (N, C) or (N, C, d1, ..., dk) are addressed as
(n_outer, n_inner, n_classes) with three strides, without copying: the class
axis is dim 1, the rows are (sample, flattened spatial position).
"""

from __future__ import annotations

import math

import torch
import triton

from ._runtime import FP_FUSION, split_f64
from .kernels import cross_entropy as ce_kernels
from .static_check import KernelConfig

# Rows up to this many classes stay in registers: 1 read + 1 write per logit. Larger
# single blocks spill (checked by the offline compile test): at 32 warps ptxas caps a
# thread at 64 registers, so 32768 fp32 values per row do not fit. Probability
# targets keep a second row (y) live, fp64 doubles every value.
MAX_SINGLE_BLOCK_V = {(False, False): 16384, (False, True): 8192,
                      (True, False): 4096, (True, True): 2048}  # (is_fp64, prob_target)
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


# Tests and benchmarks may route calls through one path ("single", "two_pass"); None lets
# choose_path decide.
FORCE_PATH: str | None = None


def fused_block_v(n_classes: int, dtype: torch.dtype, prob_target: bool) -> tuple[int, bool]:
    """(BLOCK_V, SINGLE_BLOCK) for the fused kernel: whole row on chip when it fits."""
    key = (dtype == torch.float64, prob_target)
    if FORCE_PATH == "two_pass":
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


def fwd_bwd_num_warps(block_v: int, single_block: bool) -> int:
    return fused_num_warps(block_v) if single_block else streaming_num_warps(block_v)


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


def launch_fwd_bwd(logits3, grad3, target_v, weight, loss_rows, lse_rows, reduce_buf, *,
                   ignore_index: int, label_smoothing: float, z_loss: float,
                   softcap: float | None, prob_target: bool, write_grad: bool) -> None:
    """Run the fused kernel over every row. Shapes as in its docstring."""
    n_outer, n_inner, n_classes = logits3.shape
    n_rows = n_outer * n_inner
    if n_rows == 0:
        return
    dtype = logits3.dtype
    block_v, single = fused_block_v(n_classes, dtype, prob_target)
    if grad3 is None:
        grad3 = logits3  # never written: write_grad is 0
    if prob_target:
        t_strides = target_v.stride()
    else:
        t_strides = (*target_v.stride(), 0)
    sm_hi, sm_lo = split_f64(label_smoothing)
    zl_hi, zl_lo = split_f64(z_loss)
    sc_hi, sc_lo = split_f64(softcap if softcap is not None else 1.0)
    large = needs_large_offsets(logits3, grad3, target_v)
    ce_kernels.cross_entropy_fwd_bwd_kernel[(n_rows,)](
        logits3, grad3, target_v, weight if weight is not None else reduce_buf,
        loss_rows, lse_rows, reduce_buf,
        n_classes, n_inner,
        *logits3.stride(), *grad3.stride(), *t_strides,
        ignore_index, sm_hi, sm_lo, zl_hi, zl_lo, sc_hi, sc_lo,
        int(weight is not None), int(softcap is not None), int(write_grad),
        PROB_TARGET=prob_target, IS_FP64=dtype == torch.float64, LARGE_OFFSETS=large,
        BLOCK_V=block_v, SINGLE_BLOCK=single, num_warps=fwd_bwd_num_warps(block_v, single),
        enable_fp_fusion=FP_FUSION,
    )


def launch_scale_grad(grad3, grad_output_v) -> None:
    """grad3 *= grad_output in place; grad_output_v is 0-dim or (n_outer, n_inner)."""
    n_outer, n_inner, n_classes = grad3.shape
    n_rows = n_outer * n_inner
    if n_rows == 0 or n_classes == 0:
        return
    block_v = scale_block_v(n_classes)
    per_row = grad_output_v.dim() > 0
    go_strides = grad_output_v.stride() if per_row else (0, 0)
    ce_kernels.scale_grad_kernel[(n_rows, triton.cdiv(n_classes, block_v))](
        grad3, grad_output_v, n_classes, n_inner, *grad3.stride(), *go_strides,
        PER_ROW=per_row, IS_FP64=grad3.dtype == torch.float64,
        LARGE_OFFSETS=needs_large_offsets(grad3), BLOCK_V=block_v,
        num_warps=scale_num_warps(block_v), enable_fp_fusion=FP_FUSION,
    )


def shard_block_v(n_classes: int, dtype: torch.dtype, prob_target: bool) -> int:
    """Chunk width of the vocab-parallel kernels (always a loop over chunks)."""
    if n_classes <= SMALL_BLOCK_V:
        return SMALL_BLOCK_V
    if n_classes <= MEDIUM_BLOCK_V:
        return MEDIUM_BLOCK_V
    return LOOP_BLOCK_V[(dtype == torch.float64, prob_target)]


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


# --- every configuration the heuristics above can choose, for offline compilation ---

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64"}


def _fused_block_choices(dtype: torch.dtype, prob: bool) -> list[tuple[int, bool]]:
    """Every (BLOCK_V, SINGLE_BLOCK) that fused_block_v can return for this dtype/target."""
    max_single = MAX_SINGLE_BLOCK_V[(dtype == torch.float64, prob)]
    widths = [1, SMALL_BLOCK_V + 1]
    w = MEDIUM_BLOCK_V * 2
    while w <= max_single:
        widths.append(w)
        w *= 2
    widths.append(max_single + 1)
    return sorted({fused_block_v(v, dtype, prob) for v in widths})


# The common case Triton specialises at run time: 16-byte aligned pointers and sizes and
# strides that are multiples of 16 (vocabularies like 32000 or 128256).
_ALIGNED_ARGS = (
    "logits_ptr", "grad_ptr", "target_ptr", "weight_ptr", "loss_ptr", "lse_ptr", "reduce_ptr",
    "grad_output_ptr", "n_classes", "n_inner", "logit_stride_outer", "logit_stride_inner",
    "grad_stride_outer", "grad_stride_inner", "target_stride_outer", "target_stride_inner",
)


def static_configs() -> list[KernelConfig]:
    configs = []
    fused = ce_kernels.cross_entropy_fwd_bwd_kernel
    for dtype, ty in _TRITON_TYPE.items():
        acc = "fp64" if dtype == torch.float64 else "fp32"
        for prob in (False, True):
            for block_v, single in _fused_block_choices(dtype, prob):
                for large in (False, True):
                    sig = {
                        "logits_ptr": f"*{ty}", "grad_ptr": f"*{ty}",
                        "target_ptr": f"*{ty}" if prob else "*i64",
                        "weight_ptr": f"*{acc}", "loss_ptr": f"*{acc}", "lse_ptr": f"*{acc}",
                        "reduce_ptr": f"*{acc}", "n_classes": "i32", "n_inner": "i32",
                        "logit_stride_outer": "i64" if large else "i32",
                        "logit_stride_inner": "i32", "logit_stride_class": "constexpr",
                        "grad_stride_outer": "i64" if large else "i32",
                        "grad_stride_inner": "i32", "grad_stride_class": "constexpr",
                        "target_stride_outer": "i32", "target_stride_inner": "i32",
                        "target_stride_class": "constexpr" if prob else "i32",
                        "ignore_index": "i32",
                        "smoothing_hi": "fp32", "smoothing_lo": "fp32",
                        "z_loss_hi": "fp32", "z_loss_lo": "fp32",
                        "softcap_hi": "fp32", "softcap_lo": "fp32",
                        "has_weight": "i32", "has_softcap": "i32", "write_grad": "i32",
                        "PROB_TARGET": "constexpr", "IS_FP64": "constexpr",
                        "LARGE_OFFSETS": "constexpr", "BLOCK_V": "constexpr",
                        "SINGLE_BLOCK": "constexpr",
                    }
                    constexprs = {
                        "logit_stride_class": 1, "grad_stride_class": 1,
                        "PROB_TARGET": prob, "IS_FP64": dtype == torch.float64,
                        "LARGE_OFFSETS": large, "BLOCK_V": block_v, "SINGLE_BLOCK": single,
                    }
                    if prob:
                        constexprs["target_stride_class"] = 1
                    name = (f"ce_fwd_bwd[{ty},BLOCK_V={block_v},"
                            f"{'single' if single else 'loop'},{'prob' if prob else 'index'}"
                            f"{',int64' if large else ''}]")
                    configs.append(KernelConfig(
                        name, fused, sig, constexprs, fwd_bwd_num_warps(block_v, single),
                        aligned=_ALIGNED_ARGS,
                    ))
        for block_v in sorted({scale_block_v(1), scale_block_v(MEDIUM_BLOCK_V)}):
            for per_row in (False, True):
                for large in (False, True):
                    sig = {
                        "grad_ptr": f"*{ty}", "grad_output_ptr": f"*{ty}",
                        "n_classes": "i32", "n_inner": "i32",
                        "grad_stride_outer": "i64" if large else "i32",
                        "grad_stride_inner": "i32", "grad_stride_class": "constexpr",
                        "go_stride_outer": "i32", "go_stride_inner": "i32",
                        "PER_ROW": "constexpr", "IS_FP64": "constexpr",
                        "LARGE_OFFSETS": "constexpr", "BLOCK_V": "constexpr",
                    }
                    constexprs = {"grad_stride_class": 1, "PER_ROW": per_row,
                                  "IS_FP64": dtype == torch.float64, "LARGE_OFFSETS": large,
                                  "BLOCK_V": block_v}
                    name = (f"ce_scale_grad[{ty},BLOCK_V={block_v}"
                            f"{',per_row' if per_row else ''}{',int64' if large else ''}]")
                    configs.append(KernelConfig(
                        name, ce_kernels.scale_grad_kernel, sig, constexprs,
                        scale_num_warps(block_v),
                        aligned=_ALIGNED_ARGS,
                    ))
        for prob in (False, True):
            blocks = sorted({shard_block_v(n, dtype, prob)
                             for n in (1, SMALL_BLOCK_V + 1, MEDIUM_BLOCK_V + 1)})
            for block_v in blocks:
                for large in (False, True):
                    configs.extend(_shard_configs(dtype, ty, acc, prob, block_v, large))
    return configs


def _shard_configs(dtype, ty, acc, prob, block_v, large) -> list[KernelConfig]:
    common = {
        "n_classes": "i32", "n_inner": "i32",
        "logit_stride_outer": "i64" if large else "i32", "logit_stride_inner": "i32",
        "logit_stride_class": "constexpr",
    }
    target_strides = {"target_stride_outer": "i32", "target_stride_inner": "i32",
                      "target_stride_class": "constexpr" if prob else "i32"}
    tail = {"softcap_hi": "fp32", "softcap_lo": "fp32", "has_weight": "i32",
            "has_softcap": "i32", "PROB_TARGET": "constexpr", "IS_FP64": "constexpr",
            "LARGE_OFFSETS": "constexpr", "BLOCK_V": "constexpr"}
    constexprs = {"logit_stride_class": 1, "PROB_TARGET": prob,
                  "IS_FP64": dtype == torch.float64, "LARGE_OFFSETS": large, "BLOCK_V": block_v}
    if prob:
        constexprs["target_stride_class"] = 1
    stats_sig = {"logits_ptr": f"*{ty}", "target_ptr": f"*{ty}" if prob else f"*{acc}",
                 "weight_ptr": f"*{acc}", "stats_ptr": f"*{acc}", **common, **target_strides,
                 **tail}
    grad_sig = {"logits_ptr": f"*{ty}", "grad_ptr": f"*{ty}",
                "target_ptr": f"*{ty}" if prob else "*i64", "weight_ptr": f"*{acc}",
                "coef_ptr": f"*{acc}", **common,
                "grad_stride_outer": "i64" if large else "i32", "grad_stride_inner": "i32",
                "grad_stride_class": "constexpr", **target_strides, **tail}
    suffix = f"{ty},BLOCK_V={block_v},{'prob' if prob else 'index'}{',int64' if large else ''}"
    aligned = _ALIGNED_ARGS + ("stats_ptr", "coef_ptr")
    return [
        KernelConfig(f"ce_shard_stats[{suffix}]", ce_kernels.cross_entropy_shard_stats_kernel,
                     stats_sig, constexprs, streaming_num_warps(block_v), aligned=aligned),
        KernelConfig(f"ce_shard_grad[{suffix}]", ce_kernels.cross_entropy_shard_grad_kernel,
                     grad_sig, {**constexprs, "grad_stride_class": 1},
                     streaming_num_warps(block_v),
                     aligned=aligned),
    ]
