"""Vocab-parallel cross-entropy over torch.distributed.

Each rank holds a contiguous slice of the vocabulary (slices in rank order, widths
may differ) and the global class ids as targets. Per call:

1. statistics kernel over the local slice (1 read of the logits): per row
   max, sum exp(z - max), sum w (z - max), sum w (and sum w y, sum w y (z - max) for
   probabilities), all shifted by the local max so that log(sum exp) and z - max stay
   apart (accurate for confident rows, as torch);
2. collective 1, ``all_gather`` of (rows + 1) floats per rank: each rank's row
   maxima and its slice width (the widths give every rank's offset and C);
3. collective 2, ``all_reduce(SUM)`` of 7 x rows floats: rescaled sums of
   exponentials, the target logit and weight (from the rank that owns the target),
   and the smoothing / probability sums;
4. per-row loss and gradient coefficients with O(rows) tensor ops, on the device;
5. gradient kernel over the local slice (1 read + 1 write), skipped without grad.

Only per-row statistics travel, never logits. The backward is the single-device
one: a rescale of the local gradient by grad_output, free when it is 1.

Under ``torch.autocast`` half-precision logits give a float32 loss, as torch's autocast
(which runs cross-entropy in float32) does: the kernels read the half logits as they are
and accumulate in float32 anyway, so only the loss's dtype changes; the gradient stays in
the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _alloc
from . import _ce_launch as launch
from ._ce_grad import SavedGradFunction, save_grad
from ._runtime import acc_dtype, device_guard, host_reads_free


def _forward(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             grad, group, loss_dtype=None):
    prob = target.is_floating_point()
    acc = acc_dtype(input.dtype)
    loss_dtype = loss_dtype or input.dtype  # (linear + CE calls this per chunk without it)
    device = input.device
    logits3 = launch.rows_view(input, class_dim=True)
    n_outer, n_inner, n_local = logits3.shape
    n_rows = n_outer * n_inner
    w = weight.to(acc).contiguous() if weight is not None else None
    probs_v = launch.rows_view(target, class_dim=True) if prob else None

    stats = _alloc.empty((n_rows, 6), dtype=acc, device=device)
    with device_guard(input):
        launch.launch_shard_stats(logits3, probs_v, w, stats, softcap=softcap)

    # Collective 1: every rank's row maxima and slice width.
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    # The width is a fill, not a Python number assigned into a device tensor (a blocking
    # host-to-device copy).
    send = torch.cat([stats[:, 0], torch.full((1,), n_local, dtype=acc, device=device)])
    gathered = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(gathered, send, group=group)
    gathered = torch.stack(gathered)
    row_max = gathered[:, :n_rows].amax(dim=0)
    widths = gathered[:, n_rows]
    n_total = widths.sum()
    start = widths[:rank].sum().to(torch.int64)

    # Every rank moves its shifted sums onto the global max M before the reduction:
    # sum v (z - M) = sum v (z - r) + (r - M) sum v, r = the local max (0 if -inf), so
    # the shifted logits and log(sum exp) stay apart as in the fused kernel.
    local_max = stats[:, 0]
    ref_local = torch.where(local_max > float("-inf"), local_max, 0.0)
    ref_global = torch.where(row_max > float("-inf"), row_max, 0.0)
    shift = ref_local - ref_global
    packed = torch.zeros(7, n_rows, dtype=acc, device=device)
    # A shard whose sum is 0 (no classes, or all -inf) adds nothing; a NaN sum (NaN logits)
    # must reach the loss whatever max the kernel's NaN-ignoring max gave (as in the kernels'
    # _merge_max_sum).
    packed[0] = torch.where(stats[:, 1] != 0, stats[:, 1] * torch.exp(shift), 0.0)
    packed[3] = stats[:, 2] + shift * stats[:, 3]  # sum w (z - M)
    packed[4] = stats[:, 3]  # sum w
    packed[5] = stats[:, 4]  # sum w y
    packed[6] = stats[:, 5] + shift * stats[:, 4]  # sum w y (z - M)
    if not prob:
        t = launch.rows_view(target, class_dim=False).reshape(-1).to(torch.int64)
        valid = t != ignore_index
        t_local = t - start
        own = valid & (t_local >= 0) & (t_local < n_local)
        safe = t_local.clamp(0, n_local - 1)
        rows = torch.arange(n_rows, device=device)
        z_t = logits3[rows // n_inner, rows % n_inner, safe].to(acc)
        if softcap is not None:
            z_t = softcap * torch.tanh(z_t / softcap)
        w_t = w[safe] if w is not None else torch.ones_like(z_t)
        packed[1] = torch.where(own, z_t - ref_global, 0.0)  # z_t - M, exact
        packed[2] = torch.where(own, w_t, 0.0)
    # Collective 2: the sums every rank needs.
    dist.all_reduce(packed, group=group)
    sum_exp, z_target, w_target, sum_wz, w_total, sum_wy, sum_wyz = packed

    m = ref_global
    log_s = torch.log(sum_exp)
    lse = m + log_s
    eps_c = label_smoothing / n_total
    keep = 1.0 - label_smoothing
    z_term = z_loss * lse * lse
    # Smoothing terms only when eps != 0 (a host float, not data): with eps == 0 torch
    # computes plain NLL, and a -inf logit or an inf weight must not make 0 * inf = NaN.
    smoothing = label_smoothing != 0.0
    if prob:
        wy = keep * sum_wy + (eps_c * w_total if smoothing else 0.0)
        wyz = keep * sum_wyz + (eps_c * sum_wz if smoothing else 0.0)
        loss_rows = wy * log_s - wyz + z_term
        coef_a = wy + 2.0 * z_loss * lse
        coef_t = torch.zeros_like(lse)
        divisor = torch.full((), float(n_rows), dtype=acc, device=device)
        row_scale = torch.ones_like(lse)
    else:
        bad = valid & ((t < 0) | (t >= n_total))
        _check_targets(bad, device)
        coef_t = keep * w_target
        loss_rows = coef_t * (log_s - z_target) + z_term
        coef_a = coef_t + 2.0 * z_loss * lse
        if smoothing:
            loss_rows = loss_rows + eps_c * (w_total * log_s - sum_wz)
            coef_a = coef_a + eps_c * w_total
        nan = torch.full_like(lse, float("nan"))
        loss_rows = torch.where(valid, torch.where(bad, nan, loss_rows), 0.0)
        divisor = torch.where(valid, w_target if w is not None else 1.0, 0.0).sum()
        row_scale = torch.where(bad, nan, 1.0)

    if grad is not None:
        if reduction == "mean":
            row_scale = row_scale / divisor
        if not prob:
            # Ignored rows get an exact 0, not 0 * (1/0) = NaN when every row is ignored.
            row_scale = torch.where(valid, row_scale, 0.0)
        coef = torch.stack([m, log_s, coef_a, coef_t, row_scale, torch.full_like(lse, keep),
                            eps_c.expand_as(lse).to(acc)], dim=1).contiguous()
        grad3 = launch.rows_view(grad, class_dim=True)
        if prob:
            grad_target = probs_v
        else:
            grad_target = torch.where(own, t_local, -1).view(n_outer, n_inner)
        with device_guard(input):
            launch.launch_shard_grad(logits3, grad3, grad_target, w, coef, softcap=softcap,
                                     prob_target=prob)
        if grad is input:
            # The kernel wrote into the logits behind autograd's back: declare it, so a
            # node that saved the old logits refuses to run.
            torch.autograd.graph.increment_version(input)

    if reduction == "none":
        shape = [input.shape[0], *input.shape[2:]] if input.dim() > 1 else []
        return loss_rows.view(shape).to(loss_dtype)
    total = loss_rows.sum()
    if reduction == "sum":
        return total.to(loss_dtype)
    return (total / divisor).to(loss_dtype)


def _check_targets(bad, device):
    if not host_reads_free(device):
        torch._assert_async(~bad.any(), "fusedgrad.cross_entropy: target out of bounds")
    elif bad.any():
        raise ValueError("fusedgrad.cross_entropy: `target` holds class indices outside the "
                         "full vocabulary that are not ignore_index")


class _VocabParallelCrossEntropy(SavedGradFunction):
    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, inplace, group, loss_dtype):
        grad = input if inplace else _alloc.empty_like(input)
        loss = _forward(input, target, weight, ignore_index, reduction, label_smoothing,
                        z_loss, softcap, grad, group, loss_dtype)
        save_grad(ctx, grad)
        return loss


def _loss_dtype(input) -> torch.dtype:
    """float32 for half logits under autocast (torch's autocast runs cross-entropy in
    float32), else the logits' dtype."""
    if (input.dtype in (torch.float16, torch.bfloat16)
            and torch.is_autocast_enabled(input.device.type)):
        return torch.float32
    return input.dtype


def vocab_parallel_cross_entropy(input, target, weight, ignore_index, reduction,
                                 label_smoothing, z_loss, softcap, inplace_backward, group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("fusedgrad.cross_entropy: `process_group` was given but "
                         "torch.distributed is not initialised")
    if target.is_floating_point() and target.shape != input.shape:
        raise ValueError("fusedgrad.cross_entropy: probability `target` must hold this rank's "
                         "slice of the vocabulary, shaped like `input`")
    loss_dtype = _loss_dtype(input)
    # The per-row arithmetic is float32 (or float64) already; autocast must not recast it.
    with torch.autocast(input.device.type, enabled=False):
        if torch.is_grad_enabled() and input.requires_grad:
            return _VocabParallelCrossEntropy.apply(
                input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, inplace_backward, group, loss_dtype)
        return _forward(input, target, weight, ignore_index, reduction, label_smoothing,
                        z_loss, softcap, None, group, loss_dtype)
