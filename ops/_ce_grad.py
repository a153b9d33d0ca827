"""The cross-entropy backward shared by the single-device op (ops/cross_entropy.py)
and the vocab-parallel one (ops/_vocab_parallel.py): the forward saved dL/dlogits for
grad_output == 1; backward rescales it in place (free when grad_output is 1).
Both ops' autograd (their autograd.Functions and the custom op's register_autograd) save
the gradient with save_grad and answer backward with grads_for_inputs.

Its own module so that neither op module imports the other (no import circle).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ce_launch as launch
from ._runtime import device_guard


def _rescale_in_place(grad: Tensor, grad_output: Tensor, launches=None) -> None:
    """grad *= grad_output; launches: the forward's FwdBwdLaunches (ops/_ce_launch.py) that
    wrote grad, whose backward launch is planned already (None: plan it here)."""
    if grad.is_cuda:  # Triton launches on the current device: make it grad's
        with device_guard(grad):
            _launch_rescale(grad, grad_output, launches)
    elif launches is not None and grad_output.dim() == 0:
        launches.scale_grad(grad, grad_output)  # the common backward, planned in forward
    else:
        _launch_rescale(grad, grad_output, launches)


def _launch_rescale(grad: Tensor, go: Tensor, launches) -> None:
    if launches is not None and go.dim() == 0:
        launches.scale_grad(grad, go)  # the common backward: planned with the forward
        return
    if launches is None:
        grad3 = launch.rows_view(grad, class_dim=True)
        rows = grad3.shape
    else:
        rows = launches.rows_shape
    if go.dim() > 0:
        # (N, d1..dk) -> (N, S): a view when the strides allow, else an O(rows) copy
        # (autograd may hand over e.g. an expanded tensor with strides (4, 0, 1)).
        go = go.reshape(rows[0], rows[1])
    if launches is None:
        launch.launch_scale_grad(grad3, go)
    else:
        launches.rescale(grad, go)


def _scaled_grad(ctx, grad_output: Tensor) -> Tensor:
    """dL/dinput = (saved gradient for grad_output 1) * grad_output.

    The first backward scales the saved buffer in place (nothing at all is read or
    written where grad_output == 1) and returns it: no new N x V buffer, and the
    buffer is saved with save_for_backward so autograd frees it right after a
    backward that does not retain the graph. A further backward through a retained
    graph (gradcheck does this) finds the buffer holding G * applied and returns a
    new tensor G * applied * (grad_output / applied); an earlier grad_output of
    exactly 0 cannot be undone and gives NaN, never a plausible number.
    """
    (grad,) = ctx.saved_tensors
    if grad_output.dtype != grad.dtype:
        grad_output = grad_output.to(grad.dtype)
    if ctx.applied_grad_output is None:
        ctx.applied_grad_output = grad_output
        if type(grad) is torch.Tensor:
            # Eager: launch directly. Through the custom op the declared mutation would
            # bump the buffer's version and a retained graph's second backward would then
            # refuse to unpack it; nothing else holds this buffer.
            _rescale_in_place(grad, grad_output, ctx.grad_launches)
        else:
            # Traced by torch.compile (fake/functional tensors): the op, so the
            # mutation is visible to functionalization.
            torch.ops.fusedgrad.cross_entropy_bwd_(grad, grad_output)
        return grad
    ratio = grad_output / ctx.applied_grad_output
    if ratio.dim() > 0 and grad.dim() > 1:
        ratio = ratio.unsqueeze(1)  # per-row factor broadcast over the class dim
    return grad * ratio


def save_grad(ctx, grad: Tensor, launches=None) -> None:
    """Forward's half: keep dL/dinput (for grad_output 1) for the backward; launches: the
    forward's FwdBwdLaunches when it has them (the backward's launch is planned there)."""
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    ctx.applied_grad_output = None
    ctx.grad_launches = launches


def grads_for_inputs(ctx, grad_loss: Tensor | None, n_inputs: int) -> tuple:
    """Backward's answer for a forward of n_inputs inputs: the rescaled gradient for the
    first (the logits), None for the others (targets, weights and options)."""
    if grad_loss is None:
        return (None,) * n_inputs
    return (_scaled_grad(ctx, grad_loss),) + (None,) * (n_inputs - 1)


class SavedGradFunction(torch.autograd.Function):
    """Base of the cross-entropy autograd.Functions: forward computes the loss and calls
    save_grad(ctx, grad); backward rescales that gradient for the first input."""

    @staticmethod
    def backward(ctx, grad_loss):
        n_inputs = len(ctx.needs_input_grad)
        if grad_loss is None:
            return (None,) * n_inputs
        return (_scaled_grad(ctx, grad_loss),) + (None,) * (n_inputs - 1)
