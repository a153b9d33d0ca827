"""Float64 reference for fusedgrad.linear_cross_entropy: torch's linear on upcast inputs,
then the suite's cross-entropy reference (which adds z_loss and softcap)."""

import torch
import torch.nn.functional as F

from ce_reference import reference_cross_entropy


def reference(x, w, b, t, grad_output=None, divisor=None, **kw):
    """Float64 (loss, dx, dW, db) through torch's linear and the suite's CE reference."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True) if b is not None else None
    logits = F.linear(x64, w64, b64)
    n_classes = w.shape[0]
    prob = t.is_floating_point()
    logits2 = logits.reshape(-1, n_classes)
    t2 = t.reshape(-1, n_classes).double() if prob else t.reshape(-1)
    loss = reference_cross_entropy(logits2, t2, **kw)
    if kw.get("reduction") == "none":
        loss = loss.reshape(t.shape[:-1] if prob else t.shape)
    if divisor is not None:
        loss = loss / float(divisor)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    inputs = [x64, w64] + ([b64] if b64 is not None else [])
    grads = torch.autograd.grad(loss, inputs, go)
    return loss.detach(), grads
