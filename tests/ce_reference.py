"""Float64 reference for fusedgrad.cross_entropy: torch's own op on upcast inputs.

z_loss and softcap are not in torch; they are added here in float64 with the
same definitions the kernel documents (softcap first, then z_loss * lse^2 per
non-ignored row, reduced like the rest of the loss).
"""

import torch
import torch.nn.functional as F


def reference_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The loss in float64 (differentiable with respect to ``input``)."""
    x = input.to(torch.float64)
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    prob = target.is_floating_point()
    t = target.to(torch.float64) if prob else target
    w = weight.to(torch.float64) if weight is not None else None
    loss = F.cross_entropy(z, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        class_dim = 1 if z.dim() > 1 else 0
        lse = torch.logsumexp(z, dim=class_dim)
        extra = z_loss * lse * lse
        if not prob:
            valid = target != ignore_index
            extra = torch.where(valid, extra, torch.zeros_like(extra))
        if reduction == "none":
            loss = loss + extra
        elif reduction == "sum":
            loss = loss + extra.sum()
        else:
            if prob:
                divisor = extra.numel()
            elif w is not None:
                divisor = torch.where(valid, w[torch.where(valid, target, 0)], 0.0).sum()
            else:
                divisor = valid.sum()
            loss = loss + extra.sum() / divisor
    return loss


def reference_with_grad(input, target, grad_output=None, **kwargs):
    """(loss, dloss/dinput) in float64; grad_output defaults to ones."""
    x = input.detach().to(torch.float64).requires_grad_(True)
    loss = reference_cross_entropy(x, target, **kwargs)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(torch.float64)
    (grad,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), grad
