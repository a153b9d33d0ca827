"""Vocab-parallel fused linear + cross-entropy over torch.distributed.

Each rank holds a contiguous slice of the classes: ``linear_weight`` (V_r, H), the
bias (V_r,) and class weights (V_r,), slices in rank order; ``input`` (N, H) and the
global class ids are the same on every rank. Per chunk of rows, the chunk's local
logits (n_c, V_r) go through the vocab-parallel cross-entropy
(ops/_vocab_parallel.py: two collectives of O(rows) statistics) with reduction "sum",
which writes the chunk's unscaled gradient over the logits in place; then, as on one
device, ``dx_c = g @ W_r``, ``dW_r += g^T x_c`` (fp32), ``db_r += sum g``.

After the loop the reduction's scale (1/divisor of a mean, or the ``divisor=`` of a
sum) multiplies dx, dW, db (small tensors), and dx, a sum over every rank's slice,
is all-reduced. reduction="none": the forward computes the loss only, the backward
recomputes each chunk with its rows scaled by grad_output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _alloc
from ._runtime import acc_dtype
from ._vocab_parallel import _forward as _vp_forward
from .linear_cross_entropy import _accumulate_weight_grad

_OP = "fusedgrad.linear_cross_entropy"


def _loop(x2, w, b, target2, cw, ignore_index, label_smoothing, z_loss, softcap, chunk, group,
          *, write_grad, reduction, grad_output=None, need=(False, False, False)):
    """Chunk loop; returns (per-row loss or the sum, dx, dw_acc, db_acc)."""
    n_rows, _ = x2.shape
    n_local = w.shape[0]
    acc = acc_dtype(x2.dtype)
    need_dx, need_dw, need_db = need
    dx = torch.zeros_like(x2, memory_format=torch.contiguous_format) \
        if write_grad and need_dx else None
    dw_acc = torch.zeros(w.shape, dtype=acc_dtype(w.dtype), device=w.device) \
        if write_grad and need_dw else None
    db_acc = torch.zeros(n_local, dtype=acc, device=w.device) if write_grad and need_db \
        else None
    rows = min(chunk, max(n_rows, 1))
    logits_buf = _alloc.empty((rows, n_local), dtype=x2.dtype, device=x2.device)
    losses = []
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        n = stop - start
        x_c = x2[start:stop]
        logits = logits_buf[:n]
        if b is not None:
            torch.addmm(b, x_c, w.t(), out=logits)
        else:
            torch.mm(x_c, w.t(), out=logits)
        # Per-row losses (summed here in the accumulation dtype, not per chunk in the
        # input's dtype); "none" leaves the gradient unscaled, as "sum" would.
        loss_c = _vp_forward(logits, target2[start:stop], cw, ignore_index, "none",
                             label_smoothing, z_loss, softcap,
                             logits if write_grad else None, group)
        losses.append(loss_c.to(acc))
        if not write_grad:
            continue
        g = logits
        if grad_output is not None:
            g.mul_(grad_output[start:stop].to(g.dtype).unsqueeze(1))
        if dx is not None:
            torch.mm(g, w, out=dx[start:stop])
        if dw_acc is not None:
            _accumulate_weight_grad(dw_acc, g, x_c)
        if db_acc is not None:
            db_acc.add_(g.sum(dim=0, dtype=acc))
    if reduction == "none":
        loss = torch.cat(losses) if losses else x2.new_zeros(0, dtype=acc)
    else:
        loss = torch.cat(losses).sum() if losses else x2.new_zeros((), dtype=acc)
    if dx is not None:
        dist.all_reduce(dx, group=group)
    return loss, dx, dw_acc, db_acc


def _mean_divisor(target2, cw, ignore_index, n_local, group, acc):
    """The mean's divisor over the full vocabulary (device tensor)."""
    if target2.is_floating_point():
        return torch.full((), float(target2.shape[0]), dtype=acc, device=target2.device)
    valid = target2 != ignore_index
    if cw is None:
        return valid.sum().to(acc)
    # Weighted: the weight of each target lives on the rank that owns the class.
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    width = torch.full((1,), n_local, dtype=torch.int64, device=target2.device)
    widths = [torch.empty_like(width) for _ in range(world)]
    dist.all_gather(widths, width, group=group)
    start = torch.stack(widths)[:rank].sum()
    local = target2.to(torch.int64) - start
    own = valid & (local >= 0) & (local < n_local)
    part = torch.where(own, cw[local.clamp(0, n_local - 1)], 0).sum().reshape(1)
    dist.all_reduce(part, group=group)
    return part[0]


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w, b, target2, cw, ignore_index, reduction, label_smoothing, z_loss,
                softcap, divisor, divisor_value, chunk, group, need):
        acc = acc_dtype(x2.dtype)
        write_grad = reduction != "none" and any(need)
        loss, dx, dw_acc, db_acc = _loop(
            x2, w, b, target2, cw, ignore_index, label_smoothing, z_loss, softcap, chunk,
            group, write_grad=write_grad, reduction=reduction, need=need)
        scale = None
        if reduction == "mean":
            mean_div = _mean_divisor(target2, cw, ignore_index, w.shape[0], group, acc)
            loss = loss / mean_div
            scale = 1.0 / mean_div
        elif reduction == "sum" and divisor is not None:
            loss = loss / divisor.to(acc)
            scale = 1.0 / divisor.to(acc)
        elif reduction == "sum" and divisor_value is not None:
            loss = loss / divisor_value
            scale = 1.0 / divisor_value
        grads = []
        for g, like in ((dx, x2), (dw_acc, w), (db_acc, b if b is not None else w)):
            if g is not None and scale is not None:
                g = g * scale if isinstance(scale, float) else g * scale.to(g.dtype)
            grads.append(g.to(like.dtype) if g is not None else None)
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.need = need
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap, chunk, group)
        if reduction == "none":
            ctx.save_for_backward(x2, w, b, target2, cw)
        else:
            ctx.save_for_backward(*[g if g is not None else x2.new_empty(0) for g in grads])
        return loss.to(x2.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        nones = (None,) * 12
        if grad_loss is None:
            return (None, None, None) + nones
        if ctx.reduction == "none":
            x2, w, b, target2, cw = ctx.saved_tensors
            _, dx, dw_acc, db_acc = _loop(x2, w, b, target2, cw, *ctx.args, write_grad=True,
                                          reduction="none", grad_output=grad_loss,
                                          need=ctx.need)
            dx = dx.to(x2.dtype) if dx is not None else None
            dw = dw_acc.to(w.dtype) if dw_acc is not None else None
            db = db_acc.to(b.dtype) if db_acc is not None else None
            return (dx, dw, db) + nones
        saved = ctx.saved_tensors
        out = tuple(s * grad_loss.to(s.dtype) if need else None
                    for s, need in zip(saved, ctx.need, strict=True))
        return out + nones


def vocab_parallel_linear_cross_entropy(x2, w, b, target2, cw, ignore_index, reduction,
                                        label_smoothing, z_loss, softcap, divisor,
                                        divisor_value, chunk, group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{_OP}: `process_group` was given but torch.distributed is not "
                         "initialised")
    if target2.is_floating_point():
        raise ValueError(f"{_OP}: probability targets are not supported with "
                         "`process_group` (pass class indices)")
    acc = acc_dtype(x2.dtype)
    cw = cw.to(acc).contiguous() if cw is not None else None
    target2 = target2 if target2.dtype == torch.int64 else target2.to(torch.int64)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and x2.requires_grad, grad_on and w.requires_grad,
            grad_on and b is not None and b.requires_grad)
    return _VocabParallelLinearCE.apply(x2, w, b, target2, cw, ignore_index, reduction,
                                        label_smoothing, z_loss, softcap, divisor,
                                        divisor_value, chunk, group, need)
