"""fusedgrad.linear_cross_entropy: ``cross_entropy(linear(input, W, b), target)`` without
ever holding the (N, V) logits.

Rows are processed in chunks. For each chunk of ``n_c`` rows:

1. ``logits = x_c @ W^T + b`` into one reused (n_c, V) buffer (the input's dtype, as
   ``F.linear`` would produce);
2. fusedgrad's one-pass cross-entropy kernel reads those logits once and overwrites
   them with dL/dlogits, already scaled for the reduction (1/divisor of a mean, the
   ``divisor=`` of a sum);
3. ``dx_c = g @ W`` (into the (N, H) input gradient), ``dW += g^T @ x_c`` (fp32
   accumulator across chunks, cast to W's dtype once at the end), ``db += sum_rows g``
   (fp32).

So the gradients of input, weight and bias are finished when the forward returns; the
backward multiplies them by grad_output (a scalar for "mean"/"sum"): three small
tensors, never an N x V buffer, and no host synchronisation anywhere.

``reduction="none"``: a per-row grad_output scales each row's contribution to dW and db,
which the forward cannot know. The forward then computes the loss only; the backward
recomputes each chunk's logits and gradient, scales the chunk's gradient rows by
grad_output in place, and accumulates dx, dW, db as above. Still chunk-bounded in
memory; it costs one more logits GEMM.

Largest intermediates (E = element size of the input dtype):
    chunk logits/gradient  n_c * V * E       (n_c = rows per chunk)
    weight accumulator     V * H * 4         (fp32; absent for fp32/fp64 weights, whose
                                              gradient is accumulated in place)
plus the outputs themselves (dx: N * H * E, dW: V * H * E, db: V * E). By default
n_c * V <= N * H (a chunk's logits are no larger than the input: torch's aspect-ratio
rule, rounded down to a power of 2); ``chunk_size`` overrides it.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import _alloc
from . import _ce_launch as launch
from ._ce_validate import split_divisor
from ._ce_validate import validate as validate_ce_scalars
from ._runtime import acc_dtype, check_device, check_same_device, device_guard
from .cross_entropy import _check_targets_in_range

_OP = "fusedgrad.linear_cross_entropy"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _err(msg: str) -> str:
    return f"{_OP}: {msg}"


# ---------------------------------------------------------------- chunking heuristic

def default_chunk_rows(n_rows: int, hidden: int, n_classes: int) -> int:
    """Rows per chunk so that a chunk's logits (rows x V) hold no more elements than the
    input (N x H): torch's aspect-ratio rule, rounded down to a power of 2 (at least 1)."""
    if n_rows <= 0:
        return 1
    rows = max(1, (n_rows * hidden) // max(1, n_classes))
    rows = 1 << (rows.bit_length() - 1)
    return min(rows, n_rows)


def chunk_rows(n_rows: int, hidden: int, n_classes: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return default_chunk_rows(n_rows, hidden, n_classes)
    return max(1, min(chunk_size, max(n_rows, 1)))


# ---------------------------------------------------------------- weight-gradient GEMM

# How this process accumulates a 16-bit chunk product into the fp32 dW, per (device
# type, dtype): the first way that works is kept (each raises before writing anything).
_DW_MODE: dict[tuple[str, torch.dtype], str] = {}
_DW_MODES_CUDA = ("addmm_fp32_out", "mm_fp32_then_add", "upcast")


def _dw_modes(device_type: str) -> tuple[str, ...]:
    return _DW_MODES_CUDA if device_type == "cuda" else ("upcast",)


def _accumulate_weight_grad(dw_acc: Tensor, g: Tensor, x: Tensor) -> None:
    """dw_acc (V, H) += g^T (V, n) @ x (n, H), with dw_acc fp32 and g, x possibly bf16/fp16.

    CUDA: one cuBLAS call with fp32 output, in place (``addmm(..., out_dtype=float32)``);
    torch versions whose addmm.dtype wants ``self`` in the inputs' dtype get an fp32
    ``mm(..., out_dtype=float32)`` plus an add (a V x H fp32 temporary), and torch
    versions without ``out_dtype`` upcast the chunk's operands. Elsewhere (CPU, the
    interpreter): the chunk's operands are upcast (n x V and n x H copies, chunk-bounded).
    """
    if g.dtype == dw_acc.dtype:
        dw_acc.addmm_(g.t(), x)
        return
    key = (dw_acc.device.type, g.dtype)
    modes = _dw_modes(key[0])
    if key in _DW_MODE:
        modes = modes[modes.index(_DW_MODE[key]):]
    for mode in modes:
        try:
            if mode == "addmm_fp32_out":
                torch.addmm(dw_acc, g.t(), x, out_dtype=dw_acc.dtype, out=dw_acc)
            elif mode == "mm_fp32_then_add":
                dw_acc.add_(torch.mm(g.t(), x, out_dtype=dw_acc.dtype))
            else:
                dw_acc.addmm_(g.t().to(dw_acc.dtype), x.to(dw_acc.dtype))
        except (RuntimeError, TypeError, NotImplementedError):
            if mode == "upcast":
                raise
            continue
        _DW_MODE[key] = mode
        return


# ---------------------------------------------------------------- the chunk loop

def _reduce_buffer(target2, prob_target, cw, n_rows, n_classes, ignore_index, reduction,
                   divisor, divisor_value, acc, device):
    """[gradient scale, sum of class weights] on the device, and the mean's divisor.

    Built from fills and device tensors only (a Python float assigned into an element of
    a device tensor would be a blocking host-to-device copy)."""
    w_sum = cw.sum() if cw is not None else torch.full((), n_classes, dtype=acc, device=device)
    scale = torch.ones((), dtype=acc, device=device)
    mean_divisor = None
    if reduction == "mean":
        if prob_target:
            mean_divisor = float(n_rows)
            scale = torch.full((), 1.0 / n_rows if n_rows else math.inf, dtype=acc,
                               device=device)
        else:
            valid = target2 != ignore_index
            if cw is not None:
                safe = torch.where(valid, target2, 0).clamp_(0, n_classes - 1)
                mean_divisor = torch.where(valid, cw[safe], 0).sum()
            else:
                mean_divisor = valid.sum().to(acc)
            scale = 1.0 / mean_divisor
    elif reduction == "sum" and divisor is not None:
        scale = 1.0 / divisor.to(acc)
    elif reduction == "sum" and divisor_value is not None:
        scale = torch.full((), 1.0 / divisor_value, dtype=acc, device=device)
    return torch.stack([scale, w_sum]), mean_divisor


def _chunk_loop(x2, w, b, target2, cw, reduce_buf, loss_rows, *, ignore_index,
                label_smoothing, z_loss, softcap, chunk, write_grad, grad_output=None,
                dx=None, dw_acc=None, db_acc=None):
    """Run every chunk: loss rows always; gradients into dx / dw_acc / db_acc when given.

    grad_output (per row, reduction "none" backward) scales each chunk's gradient rows.
    """
    n_rows = x2.shape[0]
    n_classes = w.shape[0]
    prob_target = target2.is_floating_point()
    if n_rows == 0:
        return  # gradients stay zero; a mean is 0 / 0 = NaN, as torch's
    rows = min(chunk, n_rows)
    logits_buf = _alloc.empty((rows, n_classes), dtype=x2.dtype, device=x2.device)
    lse_buf = _alloc.empty(rows, dtype=loss_rows.dtype, device=x2.device)
    wt = w.t()
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        n = stop - start
        x_c = x2[start:stop]
        logits = logits_buf[:n]
        if b is not None:
            torch.addmm(b, x_c, wt, out=logits)
        else:
            torch.mm(x_c, wt, out=logits)
        logits3 = logits.view(n, 1, n_classes)
        if prob_target:
            t_v = launch.rows_view(target2[start:stop], class_dim=True)
        else:
            t_v = target2[start:stop].view(n, 1)
        with device_guard(x2):
            launch.launch_fwd_bwd(
                logits3, logits3 if write_grad else None, t_v, cw, loss_rows[start:stop],
                lse_buf[:n], reduce_buf, ignore_index=ignore_index,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                prob_target=prob_target, write_grad=write_grad)
        if not write_grad:
            continue
        g = logits  # now dL/dlogits of this chunk
        if grad_output is not None:
            g.mul_(grad_output[start:stop].unsqueeze(1))
        if dx is not None:
            torch.mm(g, w, out=dx[start:stop])
        if dw_acc is not None:
            _accumulate_weight_grad(dw_acc, g, x_c)
        if db_acc is not None:
            db_acc.add_(g.sum(dim=0, dtype=db_acc.dtype))


def _prepare_targets(target2, n_classes, ignore_index):
    if target2.is_floating_point():
        return target2
    _check_targets_in_range(target2, n_classes, ignore_index)
    return target2 if target2.dtype == torch.int64 else target2.to(torch.int64)


def _reduce_loss(loss_rows, reduction, mean_divisor, divisor, divisor_value, out_dtype):
    if reduction == "none":
        return loss_rows.to(out_dtype)
    total = loss_rows.sum()
    if reduction == "sum":
        if divisor is not None:
            total = total / divisor.to(total.dtype)
        elif divisor_value is not None:
            total = total / divisor_value
        return total.to(out_dtype)
    return (total / mean_divisor).to(out_dtype)


def _new_grads(x2, w, b, need_dx, need_dw, need_db):
    acc = acc_dtype(x2.dtype)
    dx = _alloc.empty_like(x2, memory_format=torch.contiguous_format) if need_dx else None
    dw_acc = torch.zeros(w.shape, dtype=acc_dtype(w.dtype), device=w.device) if need_dw \
        else None
    db_acc = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_db else None
    return dx, dw_acc, db_acc


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty(0)


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("fusedgrad::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor,
    weight: Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: float | None, divisor: Tensor | None, divisor_value: float | None,
    chunk: int, need_dx: bool, need_dw: bool, need_db: bool, loss_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dx, dW, db) for grad_output = 1; a gradient not asked for is empty.

    input (N, H), linear_weight (V, H), linear_bias (V,), target (N,) or (N, V).
    With reduction="none" no gradient is computed here (see linear_cross_entropy_bwd).
    The loss is returned in ``loss_dtype`` (the input's, or fp32 under autocast).
    """
    with _no_autocast(input):
        return _fwd_impl(input, linear_weight, linear_bias, target, weight, ignore_index,
                         reduction, label_smoothing, z_loss, softcap, divisor, divisor_value,
                         chunk, need_dx, need_dw, need_db, loss_dtype)


def _no_autocast(t: Tensor):
    """The op's matrix products run in the dtypes it was given (autocast already chose
    them outside the op), whatever autocast state the caller has."""
    return torch.autocast(t.device.type, enabled=False)


def _fwd_impl(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
              label_smoothing, z_loss, softcap, divisor, divisor_value, chunk, need_dx,
              need_dw, need_db, loss_dtype):
    n_rows, _ = input.shape
    n_classes = linear_weight.shape[0]
    acc = acc_dtype(input.dtype)
    write_grad = reduction != "none" and (need_dx or need_dw or need_db)
    target2 = _prepare_targets(target, n_classes, ignore_index)
    cw = weight.to(acc).contiguous() if weight is not None else None
    reduce_buf, mean_divisor = _reduce_buffer(
        target2, target2.is_floating_point(), cw, n_rows, n_classes, ignore_index, reduction,
        divisor, divisor_value, acc, input.device)
    loss_rows = _alloc.empty(n_rows, dtype=acc, device=input.device)
    dx, dw_acc, db_acc = _new_grads(input, linear_weight, linear_bias, need_dx and write_grad,
                                    need_dw and write_grad, need_db and write_grad)
    _chunk_loop(input, linear_weight, linear_bias, target2, cw, reduce_buf, loss_rows,
                ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap, chunk=chunk, write_grad=write_grad, dx=dx, dw_acc=dw_acc,
                db_acc=db_acc)
    loss = _reduce_loss(loss_rows, reduction, mean_divisor, divisor, divisor_value,
                        loss_dtype)
    dw = dw_acc.to(linear_weight.dtype) if dw_acc is not None else _empty(linear_weight)
    db = db_acc.to(linear_bias.dtype) if db_acc is not None else _empty(linear_weight)
    return loss, dx if dx is not None else _empty(input), dw, db


@linear_cross_entropy_fwd.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, divisor, divisor_value, chunk, need_dx, need_dw,
      need_db, loss_dtype):
    grads = reduction != "none" and (need_dx or need_dw or need_db)
    loss = input.new_empty([input.shape[0]] if reduction == "none" else [], dtype=loss_dtype)
    dx = torch.empty_like(input, memory_format=torch.contiguous_format) \
        if grads and need_dx else input.new_empty(0)
    dw = torch.empty_like(linear_weight, memory_format=torch.contiguous_format) \
        if grads and need_dw else linear_weight.new_empty(0)
    db = linear_bias.new_empty(linear_weight.shape[0]) if grads and need_db \
        else linear_weight.new_empty(0)
    return loss, dx, dw, db


@torch.library.custom_op("fusedgrad::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    grad_output: Tensor, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None,
    target: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float | None, chunk: int, need_dx: bool, need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of reduction="none": (dx, dW, db) for the per-row grad_output (N,),
    recomputing each chunk's logits and gradient (memory bounded by the chunk)."""
    with _no_autocast(input):
        return _bwd_impl(grad_output, input, linear_weight, linear_bias, target, weight,
                         ignore_index, label_smoothing, z_loss, softcap, chunk, need_dx,
                         need_dw, need_db)


def _bwd_impl(grad_output, input, linear_weight, linear_bias, target, weight, ignore_index,
              label_smoothing, z_loss, softcap, chunk, need_dx, need_dw, need_db):
    n_rows, _ = input.shape
    n_classes = linear_weight.shape[0]
    acc = acc_dtype(input.dtype)
    target2 = _prepare_targets(target, n_classes, ignore_index)
    cw = weight.to(acc).contiguous() if weight is not None else None
    reduce_buf, _ = _reduce_buffer(target2, target2.is_floating_point(), cw, n_rows, n_classes,
                                   ignore_index, "none", None, None, acc, input.device)
    loss_rows = _alloc.empty(n_rows, dtype=acc, device=input.device)
    dx, dw_acc, db_acc = _new_grads(input, linear_weight, linear_bias, need_dx, need_dw,
                                    need_db)
    go = grad_output.to(input.dtype)
    _chunk_loop(input, linear_weight, linear_bias, target2, cw, reduce_buf, loss_rows,
                ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap, chunk=chunk, write_grad=True, grad_output=go, dx=dx,
                dw_acc=dw_acc, db_acc=db_acc)
    dw = dw_acc.to(linear_weight.dtype) if dw_acc is not None else _empty(linear_weight)
    db = db_acc.to(linear_bias.dtype) if db_acc is not None else _empty(linear_weight)
    return dx if dx is not None else _empty(input), dw, db


@linear_cross_entropy_bwd.register_fake
def _(grad_output, input, linear_weight, linear_bias, target, weight, ignore_index,
      label_smoothing, z_loss, softcap, chunk, need_dx, need_dw, need_db):
    dx = torch.empty_like(input, memory_format=torch.contiguous_format) if need_dx \
        else input.new_empty(0)
    dw = torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if need_dw \
        else linear_weight.new_empty(0)
    db = linear_bias.new_empty(linear_weight.shape[0]) if need_db \
        else linear_weight.new_empty(0)
    return dx, dw, db


def _scale(ctx, grad: Tensor, grad_output: Tensor, idx: int) -> Tensor:
    """grad * grad_output for a saved gradient; in place on the first (eager) backward.

    A retained graph's second backward finds the buffer already scaled by the first
    grad_output and returns a new tensor scaled by the ratio (as fusedgrad.cross_entropy
    does); an earlier grad_output of exactly 0 gives NaN there, never a plausible number.
    """
    go = grad_output.to(grad.dtype)
    applied = ctx.applied[idx]
    if applied is None:
        ctx.applied[idx] = go
        if type(grad) is torch.Tensor:
            # Through .data: nothing else holds the buffer, and bumping its version would
            # make a retained graph's second backward refuse to unpack it.
            grad.data.mul_(go)
            return grad
        return grad * go
    return grad * (go / applied)


def _setup_context(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
     label_smoothing, z_loss, softcap, _divisor, _divisor_value, chunk, need_dx, need_dw,
     need_db, _loss_dtype) = inputs
    _, dx, dw, db = output
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.needs = (need_dx, need_dw, need_db)
    if reduction == "none":
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap, chunk)
    else:
        ctx.mark_non_differentiable(dx, dw, db)
        ctx.save_for_backward(dx, dw, db)
        ctx.applied = [None, None, None]


def _backward(ctx, grad_loss, *_unused):
    nones = (None,) * 14
    if grad_loss is None:
        return (None, None, None) + nones
    need_dx, need_dw, need_db = ctx.needs
    if ctx.reduction == "none":
        input, linear_weight, linear_bias, target, weight = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, softcap, chunk = ctx.args
        dx, dw, db = torch.ops.fusedgrad.linear_cross_entropy_bwd(
            grad_loss, input, linear_weight, linear_bias, target, weight, ignore_index,
            label_smoothing, z_loss, softcap, chunk, need_dx, need_dw, need_db)
    else:
        dx, dw, db = ctx.saved_tensors
        dx = _scale(ctx, dx, grad_loss, 0) if need_dx else None
        dw = _scale(ctx, dw, grad_loss, 1) if need_dw else None
        db = _scale(ctx, db, grad_loss, 2) if need_db else None
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None) + nones


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- argument checks

def _validate(input, linear_weight, target, linear_bias, weight, chunk_size):
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(_err(f"`{name}` must be a Tensor, got {type(t).__name__}"))
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(_err(f"`input` must be float16, bfloat16, float32 or float64, got "
                             f"{input.dtype}"))
    if linear_weight.dtype != input.dtype:
        raise TypeError(_err(f"`linear_weight` dtype {linear_weight.dtype} must match "
                             f"`input` dtype {input.dtype} (as F.linear requires)"))
    if linear_weight.dim() != 2:
        raise ValueError(_err("`linear_weight` must be 2-D (num_classes, in_features), got "
                              f"shape {tuple(linear_weight.shape)} (multi-dimensional class "
                              "weights are not supported)"))
    n_classes, hidden = linear_weight.shape
    if n_classes < 1:
        raise ValueError(_err("`linear_weight` has 0 classes; need at least 1"))
    if input.dim() < 1 or input.shape[-1] != hidden:
        raise ValueError(_err(f"`input` must have shape (*, {hidden}) to match "
                              f"`linear_weight` {tuple(linear_weight.shape)}, got "
                              f"{tuple(input.shape)}"))
    check_device("input", input)
    check_same_device("input", input, "linear_weight", linear_weight)
    check_same_device("input", input, "target", target)
    lead = tuple(input.shape[:-1])
    if target.is_floating_point():
        if tuple(target.shape) != lead + (n_classes,):
            raise ValueError(_err(f"probability `target` must have shape {lead + (n_classes,)}"
                                  f", got {tuple(target.shape)}"))
    elif tuple(target.shape) != lead:
        raise ValueError(_err(f"class-index `target` must have shape {lead} for input of "
                              f"shape {tuple(input.shape)}, got {tuple(target.shape)}"))
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor):
            raise TypeError(_err("`linear_bias` must be a Tensor or None"))
        if tuple(linear_bias.shape) != (n_classes,):
            raise ValueError(_err(f"`linear_bias` must have shape ({n_classes},), got "
                                  f"{tuple(linear_bias.shape)}"))
        if linear_bias.dtype != input.dtype:
            raise TypeError(_err(f"`linear_bias` dtype {linear_bias.dtype} must match `input`"
                                 f" dtype {input.dtype}"))
        check_same_device("input", input, "linear_bias", linear_bias)
    if weight is not None and isinstance(weight, torch.Tensor) and weight.requires_grad \
            and torch.is_grad_enabled():
        raise ValueError(_err("gradients with respect to `weight` (class weights) are not "
                              "supported; pass weight.detach()"))
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise ValueError(_err("gradients with respect to probability `target` are not "
                              "supported; pass target.detach()"))
    if chunk_size is not None and (isinstance(chunk_size, bool)
                                   or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(_err(f"`chunk_size` must be None or an int >= 1, got {chunk_size!r}"))


# ---------------------------------------------------------------- public API

def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, divisor: Tensor | float | None = None,
                         process_group=None, chunk_size: int | None = None) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without
    materialising the logits: a drop-in for ``torch.nn.functional.linear_cross_entropy``.

    input: (H,), (N, H) or (*, H); target: class indices shaped like input without its
        last dim (any integer dtype), or probabilities shaped (*, V).
    linear_weight: (V, H); linear_bias: (V,) or None.
    weight, reduction, ignore_index, label_smoothing: as ``F.cross_entropy`` (class
        weights (V,); ``ignore_index=None`` means -100, as in torch's op).
    z_loss, softcap: as :func:`fusedgrad.cross_entropy` (softcap caps the logits
        ``softcap * tanh(z / softcap)`` before the softmax, Gemma-2 style).
    divisor: with reduction="sum", the loss is sum / divisor (a number or a 0-dim
        device tensor, never read on the host), folded into the gradients.
    process_group: vocab-parallel: ``linear_weight``/``linear_bias``/``weight`` hold this
        rank's contiguous slice of the classes (slices in rank order), ``input`` is the
        same on every rank and ``target`` holds global class ids. Every rank gets the
        full loss, its slice's weight/bias gradients and the full input gradient
        (all-reduced over the group).
    chunk_size: rows per chunk (default: the chunk's logits are no larger than the
        input, i.e. about N * H / V rows, rounded down to a power of 2).

    Gradients for input, linear_weight and linear_bias are computed in the forward
    (fp32 accumulation of the weight gradient across chunks); backward only scales them
    by grad_output. See the module docstring for reduction="none" and the memory model.
    """
    return _linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, weight=weight,
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, divisor=divisor, process_group=process_group,
        chunk_size=chunk_size)


def _linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight, reduction,
                          ignore_index, label_smoothing, z_loss, softcap, divisor,
                          process_group, chunk_size, fp32_loss=False):
    """linear_cross_entropy; ``fp32_loss`` returns the loss in fp32 whatever the input
    dtype (the loss is computed in fp32 anyway; transformers' causal-LM loss is fp32)."""
    if ignore_index is None:
        ignore_index = -100
    input, linear_weight, linear_bias, loss_dtype = _autocast_inputs(input, linear_weight,
                                                                     linear_bias)
    if fp32_loss and loss_dtype is not None and loss_dtype != torch.float64:
        loss_dtype = torch.float32
    _validate(input, linear_weight, target, linear_bias, weight, chunk_size)
    n_classes, hidden = linear_weight.shape
    lead = tuple(input.shape[:-1])
    prob = target.is_floating_point()
    # Scalar and class-weight checks are the cross-entropy op's (same names, same rules).
    fake_logits = input.new_empty((0, n_classes))
    fake_target = target.new_empty((0, n_classes)) if prob else target.new_empty((0,))
    validate_ce_scalars(fake_logits, fake_target, weight, ignore_index, reduction,
                        label_smoothing, z_loss, softcap, False)
    divisor_t, divisor_value = split_divisor(divisor, reduction, input.device, op=_OP)
    softcap = float(softcap) if softcap is not None else None
    x2 = input.reshape(-1, hidden)
    target2 = target.reshape(-1, n_classes) if prob else target.reshape(-1)
    n_rows = x2.shape[0]
    chunk = chunk_rows(n_rows, hidden, n_classes, chunk_size)
    grad_on = torch.is_grad_enabled()
    need_dx = grad_on and input.requires_grad
    need_dw = grad_on and linear_weight.requires_grad
    need_db = grad_on and linear_bias is not None and linear_bias.requires_grad
    if process_group is not None:
        from ._linear_ce_parallel import vocab_parallel_linear_cross_entropy

        loss = vocab_parallel_linear_cross_entropy(
            x2, linear_weight, linear_bias, target2, weight, ignore_index, reduction,
            float(label_smoothing), float(z_loss), softcap, divisor_t, divisor_value, chunk,
            process_group)
        loss = loss.to(loss_dtype)
    else:
        loss, _, _, _ = torch.ops.fusedgrad.linear_cross_entropy_fwd(
            x2, linear_weight, linear_bias, target2, weight, ignore_index, reduction,
            float(label_smoothing), float(z_loss), softcap, divisor_t, divisor_value, chunk,
            need_dx, need_dw, need_db, loss_dtype)
    if reduction == "none":
        loss = loss.view(lead)
    return loss


def _autocast_inputs(input, linear_weight, linear_bias):
    """Under autocast, what torch does for ``F.linear`` then ``F.cross_entropy``: the
    linear's operands in the autocast dtype, the loss in fp32 (cross_entropy is on
    autocast's fp32 list). Otherwise the inputs as given and the loss in their dtype."""
    if not isinstance(input, torch.Tensor):
        return input, linear_weight, linear_bias, None
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return input, linear_weight, linear_bias, input.dtype
    amp = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16,
                                                       torch.bfloat16) and t.dtype != amp:
            return t.to(amp)
        return t

    return cast(input), cast(linear_weight), cast(linear_bias), torch.float32


class LinearCrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.LinearCrossEntropyLoss``: owns a ``Linear(in_features,
    num_classes)`` (``self.linear``) and computes the cross-entropy of its output with
    :func:`fusedgrad.linear_cross_entropy`, never materialising the logits.

    Same constructor as torch's (``out_features`` must be ``()``; torch's ``options``
    is accepted and ignored: chunking is always on), plus the keyword-only extras
    ``z_loss``, ``softcap``, ``chunk_size`` and ``process_group``. ``forward(input,
    target, *, divisor=None)`` takes the per-call ``divisor`` of a "sum" reduction.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Tensor | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                 softcap: float | None = None, chunk_size: int | None = None,
                 process_group=None) -> None:
        super().__init__()
        if tuple(out_features) != ():
            raise ValueError(_err("LinearCrossEntropyLoss: multi-dimensional `out_features` "
                                  "is not supported; pass out_features=()"))
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(_err(f"LinearCrossEntropyLoss: `weight` must have shape "
                                  f"({num_classes},), got {tuple(weight.shape)}"))
        self.num_classes = num_classes
        self.out_features = ()
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device,
                                      dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor, *, divisor=None) -> Tensor:
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias,
            weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            divisor=divisor, process_group=self.process_group, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, chunk_size={self.chunk_size}")


def largest_intermediate_bytes(n_rows: int, hidden: int, n_classes: int, dtype: torch.dtype,
                               chunk_size: int | None = None) -> dict[str, int]:
    """The memory model: bytes of the chunk buffer and the fp32 weight accumulator."""
    elem = dtype.itemsize
    rows = chunk_rows(n_rows, hidden, n_classes, chunk_size)
    acc = 0 if dtype in (torch.float32, torch.float64) else n_classes * hidden * 4
    return {"chunk_rows": rows, "chunk_logits": rows * n_classes * elem,
            "weight_grad_fp32": acc, "logits_unfused": n_rows * n_classes * elem,
            "n_chunks": math.ceil(n_rows / rows) if n_rows else 0}
