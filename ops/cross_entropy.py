"""fusedgrad.cross_entropy: a drop-in for F.cross_entropy that computes its gradient
in the forward kernel.

The forward custom op writes the per-row loss and, when a gradient will be
needed, dL/dlogits already scaled for the reduction. The backward custom op only
multiplies that buffer by grad_output, in place, and its kernel returns without
touching the buffer where grad_output is exactly 1 (a plain ``loss.backward()``).

Two forward variants:
- ``fusedgrad::cross_entropy_fwd`` (functional): the gradient goes to a new buffer.
  Autograd through ``register_autograd``.
- ``fusedgrad::cross_entropy_fwd_inplace`` (mutates ``input``): the gradient
  overwrites the logits, saving an N x V buffer. Declared as a mutation, so any
  other autograd node that saved the old logits raises torch's usual in-place
  error at backward instead of computing a wrong gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _alloc
from . import _ce_launch as launch
from ._ce_validate import split_divisor, validate
from ._runtime import acc_dtype, device_guard, host_reads_free


def _loss_shape(input: Tensor, prob_target: bool, target: Tensor) -> list[int]:
    if prob_target:
        return [input.shape[0], *input.shape[2:]] if input.dim() > 1 else []
    return list(target.shape)


def _check_targets_in_range(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """A class index outside [0, C) that is not ignore_index is an error, never an address.

    CPU: raised here, at the call. CUDA: an asynchronous device-side assert (like
    torch's own), so no host synchronisation; the kernel also writes NaN for such rows.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if not host_reads_free(target.device):
        torch._assert_async(~bad.any(), "fusedgrad.cross_entropy: target out of bounds")
    elif bad.any():  # CPU: the host already has the data
        raise ValueError(
            f"fusedgrad.cross_entropy: `target` holds class indices outside [0, {n_classes}) "
            f"that are not ignore_index={ignore_index}"
        )


def _sum_divisor(divisor: Tensor | None, divisor_value: float | None,
                 acc: torch.dtype) -> Tensor | float | None:
    """The reduction="sum" divisor in the accumulation dtype (a device tensor or a float)."""
    if divisor is not None:
        return divisor.to(acc)
    return divisor_value


def _forward_into(input: Tensor, target: Tensor, weight: Tensor | None, grad: Tensor | None,
                  ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                  softcap: float | None, divisor: Tensor | None = None,
                  divisor_value: float | None = None) -> Tensor:
    """Run the fused kernel; returns the reduced (or per-row) loss in input's dtype.

    ``divisor`` (0-dim tensor on input's device) or ``divisor_value`` (host float), only
    with reduction="sum": the loss is sum / divisor and the gradient is written already
    divided by it, read on the device (never on the host).
    """
    prob_target = target.is_floating_point()
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    acc = acc_dtype(input.dtype)
    device = input.device
    logits3 = launch.rows_view(input, class_dim=True)
    target_v = launch.rows_view(target, class_dim=prob_target)
    if not prob_target:
        _check_targets_in_range(target, n_classes, ignore_index)
        if target_v.dtype != torch.int64:
            target_v = target_v.to(torch.int64)
    n_rows = logits3.shape[0] * logits3.shape[1]
    w = weight.to(acc).contiguous() if weight is not None else None

    # [gradient scale, sum of class weights], computed on the device from fills and
    # device tensors only: a Python float assigned to an element of a device tensor
    # would be a blocking host-to-device copy.
    scale = torch.ones((), dtype=acc, device=device)
    w_sum = w.sum() if w is not None else torch.full((), n_classes, dtype=acc, device=device)
    sum_divisor = _sum_divisor(divisor, divisor_value, acc)
    if isinstance(sum_divisor, Tensor):
        scale = 1.0 / sum_divisor
    elif sum_divisor is not None:
        inv = 1.0 / sum_divisor if sum_divisor else math.copysign(math.inf, sum_divisor)
        scale = torch.full((), inv, dtype=acc, device=device)
    divisor = None
    if reduction == "mean":
        if prob_target:
            scale = torch.full((), 1.0 / n_rows if n_rows else float("inf"), dtype=acc,
                               device=device)
        else:
            valid = target_v != ignore_index
            if w is not None:
                safe = torch.where(valid, target_v, 0).clamp_(0, n_classes - 1)
                divisor = torch.where(valid, w[safe], 0).sum()
            else:
                divisor = valid.sum().to(acc)
            scale = 1.0 / divisor
    reduce_buf = torch.stack([scale, w_sum])

    loss_rows = _alloc.empty(n_rows, dtype=acc, device=device)
    lse_rows = _alloc.empty(n_rows, dtype=acc, device=device)
    grad3 = launch.rows_view(grad, class_dim=True) if grad is not None else None
    with device_guard(input):
        launch.launch_fwd_bwd(
            logits3, grad3, target_v, w, loss_rows, lse_rows, reduce_buf,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, prob_target=prob_target, write_grad=grad is not None)

    if reduction == "none":
        return loss_rows.view(_loss_shape(input, prob_target, target)).to(input.dtype)
    total = loss_rows.sum()
    if reduction == "sum":
        if sum_divisor is not None:
            total = total / sum_divisor
        return total.to(input.dtype)
    if prob_target:
        return (total / n_rows).to(input.dtype)
    return (total / divisor).to(input.dtype)


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("fusedgrad::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                      reduction: str, label_smoothing: float, z_loss: float,
                      softcap: float | None, compute_grad: bool, divisor: Tensor | None = None,
                      divisor_value: float | None = None) -> tuple[Tensor, Tensor]:
    """Returns (loss, grad); grad is dL/dinput for grad_output = 1, or empty when not asked."""
    grad = _alloc.empty_like(input) if compute_grad else input.new_empty(0)
    loss = _forward_into(input, target, weight, grad if compute_grad else None, ignore_index,
                         reduction, label_smoothing, z_loss, softcap, divisor, divisor_value)
    return loss, grad


@cross_entropy_fwd.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      compute_grad, divisor=None, divisor_value=None):
    prob_target = target.is_floating_point()
    shape = _loss_shape(input, prob_target, target) if reduction == "none" else []
    loss = input.new_empty(shape)
    grad = torch.empty_like(input) if compute_grad else input.new_empty(0)
    return loss, grad


@torch.library.custom_op("fusedgrad::cross_entropy_fwd_inplace", mutates_args=("input",))
def cross_entropy_fwd_inplace(input: Tensor, target: Tensor, weight: Tensor | None,
                              ignore_index: int, reduction: str, label_smoothing: float,
                              z_loss: float, softcap: float | None,
                              divisor: Tensor | None = None,
                              divisor_value: float | None = None) -> Tensor:
    """Returns the loss; overwrites ``input`` with dL/dinput for grad_output = 1."""
    return _forward_into(input, target, weight, input, ignore_index, reduction,
                         label_smoothing, z_loss, softcap, divisor, divisor_value)


@cross_entropy_fwd_inplace.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      divisor=None, divisor_value=None):
    prob_target = target.is_floating_point()
    shape = _loss_shape(input, prob_target, target) if reduction == "none" else []
    return input.new_empty(shape)


def _rescale_in_place(grad: Tensor, grad_output: Tensor) -> None:
    grad3 = launch.rows_view(grad, class_dim=True)
    go = grad_output
    if go.dim() > 0:
        # (N, d1..dk) -> (N, S): a view when the strides allow, else an O(rows) copy
        # (autograd may hand over e.g. an expanded tensor with strides (4, 0, 1)).
        go = go.reshape(grad3.shape[0], grad3.shape[1])
    with device_guard(grad):
        launch.launch_scale_grad(grad3, go)


@torch.library.custom_op("fusedgrad::cross_entropy_bwd_", mutates_args=("grad",))
def cross_entropy_bwd_(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output in place (grad_output: 0-dim, or the per-row loss shape)."""
    _rescale_in_place(grad, grad_output)


@cross_entropy_bwd_.register_fake
def _(grad, grad_output):
    return None


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
            _rescale_in_place(grad, grad_output)
        else:
            # Traced by torch.compile (fake/functional tensors): the op, so the
            # mutation is visible to functionalization.
            torch.ops.fusedgrad.cross_entropy_bwd_(grad, grad_output)
        return grad
    ratio = grad_output / ctx.applied_grad_output
    if ratio.dim() > 0 and grad.dim() > 1:
        ratio = ratio.unsqueeze(1)  # per-row factor broadcast over the class dim
    return grad * ratio


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    ctx.applied_grad_output = None


_N_FWD_ARGS = 11  # cross_entropy_fwd's inputs: one gradient (or None) each


def _backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:
        return (None,) * _N_FWD_ARGS
    return (_scaled_grad(ctx, grad_loss),) + (None,) * (_N_FWD_ARGS - 1)


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


class _InplaceCrossEntropy(torch.autograd.Function):
    """Autograd for the in-place variant (register_autograd takes functional ops only)."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, divisor, divisor_value):
        # The op declares its mutation of `input` (mutates_args): that bumps the version
        # counter `input` shares with its base and views, so any node that saved the old
        # logits refuses to run. No mark_dirty: it would forbid views of the logits
        # (e.g. logits.view(-1, V)), the common case.
        loss = torch.ops.fusedgrad.cross_entropy_fwd_inplace(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
            divisor, divisor_value)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input)
        ctx.applied_grad_output = None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return (None,) * 10
        return (_scaled_grad(ctx, grad_loss),) + (None,) * 9


# ---------------------------------------------------------------- public API

def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: float | None = None, inplace_backward: bool = False,
                  process_group=None, divisor: Tensor | float | None = None) -> Tensor:
    """Softmax cross-entropy, a drop-in for ``torch.nn.functional.cross_entropy``.

    Same arguments and results as torch (class-index or probability targets, class
    dimension 1, weights, ignore_index, label smoothing, reductions), plus:

    z_loss: adds ``z_loss * logsumexp(z)**2`` to each (non-ignored) row's loss,
        before the reduction.
    softcap: logits pass through ``softcap * tanh(z / softcap)`` first.
    inplace_backward: write the gradient into ``input``'s storage instead of a new
        N x V buffer. ``input`` then holds dL/dinput, not logits; autograd refuses
        (with its usual in-place error) a graph that still needs the old logits.
        ``input`` must not be a leaf that requires grad (ValueError). It may be a view
        (e.g. ``logits.view(-1, V)``). Under ``torch.compile`` the
        flag is ignored (the functional op is traced; the compiler plans buffers).
    process_group: vocab-parallel mode. ``input`` holds this rank's contiguous slice of
        the vocabulary (slices in rank order, widths may differ), ``target`` the global
        class ids (or this slice's probabilities), ``weight`` this slice's class
        weights. Every rank gets the full-vocabulary loss and its slice's gradient;
        only O(rows) statistics cross ranks (two collectives per call).
    divisor: with ``reduction="sum"`` only: the loss is ``sum / divisor``, where divisor is
        a Python number or a 0-dim tensor (integer or floating; on ``input``'s device, or
        a CPU scalar that is copied there). It is folded into the gradient the forward
        kernel writes, so backward stays free; a tensor is never read on the host. This is
        what Hugging Face's ``num_items_in_batch`` needs (``sum / num_items``). With
        "mean" or "none" it is a ValueError: a mean already has its divisor, and
        per-element losses have none.

    The gradient is computed in the forward kernel whenever ``input`` requires grad;
    backward rescales it by grad_output (free when grad_output is 1).
    """
    validate(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             inplace_backward)
    divisor, divisor_value = split_divisor(divisor, reduction, input.device)
    softcap = float(softcap) if softcap is not None else None
    label_smoothing = float(label_smoothing)
    z_loss = float(z_loss)
    # Spatial dims whose strides cannot be merged into one row index (rare: e.g. H and W
    # transposed) are made contiguous; autograd carries the gradient back through the copy.
    if not launch.spatial_dims_mergeable(input, True):
        input = input.contiguous()
    if not launch.spatial_dims_mergeable(target, target.is_floating_point()):
        target = target.contiguous()
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise ValueError("fusedgrad.cross_entropy: gradients with respect to probability "
                         "`target` are not supported; pass target.detach()")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("fusedgrad.cross_entropy: gradients with respect to `weight` are not "
                         "supported (torch does not compute them either); pass "
                         "weight.detach()")
    if inplace_backward and needs_grad and input.is_leaf:
        # Checked before any kernel runs: the caller's leaf must not be overwritten.
        raise ValueError("fusedgrad.cross_entropy: inplace_backward=True would overwrite "
                         "`input`, a leaf tensor that requires grad; pass a non-leaf (e.g. "
                         "the output of the layer that produced the logits)")
    if process_group is not None:
        from ._vocab_parallel import vocab_parallel_cross_entropy

        loss = vocab_parallel_cross_entropy(input, target, weight, ignore_index, reduction,
                                            label_smoothing, z_loss, softcap, inplace_backward,
                                            process_group)
        if divisor is not None or divisor_value is not None:
            # The vocab-parallel backward rescales its gradient by grad_output anyway; the
            # divisor reaches it that way (one pass over this rank's slice).
            loss = loss / (divisor if divisor is not None else divisor_value)
        return loss
    # Under torch.compile the functional op is used even with inplace_backward: Dynamo
    # cannot trace an autograd.Function that marks its input dirty, and the compiler
    # plans (and reuses) buffers itself. Eager mode honours the flag.
    if inplace_backward and needs_grad and not torch.compiler.is_compiling():
        return _InplaceCrossEntropy.apply(input, target, weight, ignore_index, reduction,
                                          label_smoothing, z_loss, softcap, divisor,
                                          divisor_value)
    loss, _ = torch.ops.fusedgrad.cross_entropy_fwd(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        needs_grad, divisor, divisor_value)
    return loss


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` backed by :func:`fusedgrad.cross_entropy`.

    Same constructor (including the deprecated ``size_average``/``reduce``), plus the
    keyword-only extras ``z_loss``, ``softcap``, ``inplace_backward`` and ``process_group``
    (vocab-parallel logits; see :func:`fusedgrad.cross_entropy`).
    """

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: float | None = None,
                 inplace_backward: bool = False, process_group=None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap,
                             inplace_backward=self.inplace_backward,
                             process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, "
                f"inplace_backward={self.inplace_backward}")
