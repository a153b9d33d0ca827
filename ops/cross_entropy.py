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

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _alloc
from . import _ce_launch as launch
from . import _ce_prep as prep
from ._ce_grad import SavedGradFunction, _rescale_in_place, grads_for_inputs, save_grad
from ._ce_validate import split_divisor, validate
from ._launch_record import cached_plan, register_cache
from ._runtime import acc_dtype, device_guard, host_reads_free, split_f64
from ._vocab_parallel import vocab_parallel_cross_entropy


def _loss_shape(input: Tensor, prob_target: bool, target: Tensor) -> list[int]:
    if prob_target:
        return [input.shape[0], *input.shape[2:]] if input.dim() > 1 else []
    return list(target.shape)


def _check_targets_in_range(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """A class index outside [0, C) that is not ignore_index is an error, never an address.

    For callers without a prep kernel (fg.linear_cross_entropy); cross_entropy's own check
    runs in kernels/ce_prep.py. CPU: raised here, at the call. CUDA: an asynchronous
    device-side assert (like torch's own), so no host synchronisation.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if not host_reads_free(target.device):
        torch._assert_async(~bad.any(), "fusedgrad.cross_entropy: target out of bounds")
    elif bad.any():  # CPU: the host already has the data
        raise ValueError(
            f"fusedgrad.cross_entropy: `target` holds class indices outside [0, {n_classes}) "
            f"that are not ignore_index={ignore_index}"
        )


# ---------------------------------------------------------------- per-call-signature plans

@dataclass(frozen=True, eq=False)
class _Plan:
    """What a call does, decided once per signature: shapes, strides, dtypes and device of
    the tensors, the reduction and the scalar arguments (ops/_launch_record.py). Holds
    every launch with its grid and packed scalars, so a planned call only allocates and
    launches."""

    n_rows: int
    n_classes: int
    acc: torch.dtype
    class_target: bool
    half: bool                              # 16-bit logits (autocast takes its own op)
    rows_shape: tuple[int, int, int]        # logits as (n_outer, n_inner, n_classes)
    rows_stride: tuple[int, int, int]
    grad_stride: tuple[int, ...]            # a gradient buffer allocated like the logits
    target_to_int64: bool                   # the fused kernel reads int64 class indices
    loss_shape: tuple[int, ...]             # reduction="none"
    ignore_index: int
    prep_args: dict                         # _ce_prep.plan_prep's, less the host divisor
    prep: object                            # ... its launch without a host divisor
    fwd_args: dict                          # _ce_launch.plan_fwd_bwd's, less the geometry
    fwd_nograd: launch.FwdBwdLaunches       # no gradient written
    fwd_grad: launch.FwdBwdLaunches         # gradient into a buffer with grad_stride
    finish: object                          # final reduction (None: reduction="none")
    # Empty tensors on the device whose new_empty / empty_like allocate the per-call buffers:
    # half the host time of torch.empty with dtype and device keywords.
    acc_like: Tensor                        # (0,) in the accumulation dtype
    loss_like: Tensor                       # () in the logits' dtype


@cached_plan
def _plan(in_shape, in_stride, in_dtype, device, t_shape, t_stride, t_dtype, weight_meta,
          reduction, ignore_index, label_smoothing, z_loss, softcap, divisor_kind) -> _Plan:
    """Per-signature decisions (no tensor data is read). weight_meta: None or the class
    weights' (shape, stride, dtype); divisor_kind: None, "host" or "device"."""
    # -0.0 and 0.0 share a cache key; the kernels get +0.0 for both (the same op).
    label_smoothing = float(label_smoothing) + 0.0
    z_loss = float(z_loss) + 0.0
    softcap = float(softcap) if softcap is not None else None
    meta = torch.empty_strided(in_shape, in_stride, dtype=in_dtype, device="meta")
    target = torch.empty_strided(t_shape, t_stride, dtype=t_dtype, device="meta")
    prob_target = t_dtype.is_floating_point
    acc = acc_dtype(in_dtype)
    rows = launch.rows_view(meta, class_dim=True)
    # Every tensor made per call is made here on the meta device by the same torch ops,
    # so the plan knows its strides: the gradient, int64 targets, fp32 class weights.
    grad = torch.empty_like(meta)
    target_to_int64 = not prob_target and t_dtype != torch.int64
    kernel_target = target.to(torch.int64) if target_to_int64 else target
    weight_stride = None
    if weight_meta is not None:
        w_shape, w_stride, w_dtype = weight_meta
        weight = torch.empty_strided(w_shape, w_stride, dtype=w_dtype, device="meta")
        weight_stride = weight.to(acc).contiguous().stride(0)
    if prob_target:
        mode = prep.DIVISOR_N_ROWS if reduction == "mean" else prep.DIVISOR_ONE
    elif reduction == "mean":
        mode = prep.DIVISOR_VALID_ROWS
    else:
        mode = prep.DIVISOR_ONE
    if divisor_kind == "host":
        mode = prep.DIVISOR_HOST
    elif divisor_kind == "device":
        mode = prep.DIVISOR_DEVICE
    n_outer, n_inner, n_classes = rows.shape
    n_rows = n_outer * n_inner
    prep_args = dict(
        n_rows=n_rows, n_inner=n_inner, n_classes=n_classes,
        target_strides=launch.rows_view(target, class_dim=prob_target).stride()[:2],
        weight_stride=weight_stride, ignore_index=ignore_index, class_target=not prob_target,
        weight_sum=weight_meta is not None and label_smoothing != 0, divisor_mode=mode,
        is_fp64=acc == torch.float64)
    fwd_args = dict(
        target_strides=launch.rows_view(kernel_target, class_dim=prob_target).stride(),
        dtype=in_dtype, device=device, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        prob_target=prob_target, has_weight=weight_meta is not None)
    rows_shape, rows_stride = tuple(rows.shape), rows.stride()
    return _Plan(
        n_rows=n_rows, n_classes=n_classes, acc=acc, class_target=not prob_target,
        half=in_dtype in _HALF, rows_shape=rows_shape, rows_stride=rows_stride,
        grad_stride=grad.stride(), target_to_int64=target_to_int64,
        loss_shape=tuple(_loss_shape(meta, prob_target, target)), ignore_index=ignore_index,
        prep_args=prep_args, prep=prep.plan_prep(**prep_args, divisor_hi=1.0, divisor_lo=0.0),
        fwd_args=fwd_args,
        fwd_nograd=launch.plan_fwd_bwd(rows_shape, rows_stride, None, **fwd_args),
        fwd_grad=launch.plan_fwd_bwd(
            rows_shape, rows_stride, launch.rows_view(grad, class_dim=True).stride(),
            **fwd_args),
        finish=prep.plan_finish(n_rows) if reduction != "none" else None,
        acc_like=torch.empty(0, dtype=acc, device=device),
        loss_like=torch.empty((), dtype=in_dtype, device=device),
    )


def _plan_of(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str,
             ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
             divisor_kind: str | None = None) -> _Plan:
    weight_meta = None if weight is None else (weight.shape, weight.stride(), weight.dtype)
    return _plan(input.shape, input.stride(), input.dtype, input.device, target.shape,
                 target.stride(), target.dtype, weight_meta, reduction, ignore_index,
                 label_smoothing, z_loss, softcap, divisor_kind)


def _launches_for(plan: _Plan, grad: Tensor | None) -> launch.FwdBwdLaunches:
    """The forward's launches writing the gradient into ``grad`` (None: none written)."""
    if grad is None:
        return plan.fwd_nograd
    if grad.stride() == plan.grad_stride:  # allocated like the logits, or the logits
        return plan.fwd_grad
    return launch.plan_fwd_bwd(plan.rows_shape, plan.rows_stride,
                               launch.rows_view(grad, class_dim=True).stride(),
                               **plan.fwd_args)


# ---------------------------------------------------------------- forward

# The fused kernels always write each row's log-sum-exp; only the target-gradient path
# reads it (lse_out). Elsewhere it goes to a per-device sink that nothing ever reads, so
# calls on any stream, and captured CUDA graphs, may share it without a race: one
# allocation less per call. A sink too short is replaced by one twice as long; every sink
# stays alive (a captured graph may still write into an old one).
_LSE_SINKS: dict = {}
_LSE_SINKS_KEPT: list = []


def _lse_sink(device: torch.device, dtype: torch.dtype, n_rows: int) -> Tensor:
    sink = _LSE_SINKS.get((device, dtype))
    if sink is None or sink.numel() < n_rows:
        size = max(n_rows, 2 * sink.numel() if sink is not None else 1024)
        sink = torch.empty(size, dtype=dtype, device=device)
        _LSE_SINKS[(device, dtype)] = sink
        _LSE_SINKS_KEPT.append(sink)
    return sink


def _divisor_kind(divisor: Tensor | None, divisor_value: float | None) -> str | None:
    """How the reduction="sum" divisor reaches the prep kernel: "device", "host" or None."""
    if divisor is not None:
        return "device"
    return "host" if divisor_value is not None else None


def _run_forward(plan: _Plan, launches: launch.FwdBwdLaunches, input: Tensor, target: Tensor,
                 weight: Tensor | None, grad: Tensor | None, divisor: Tensor | None = None,
                 divisor_value: float | None = None, *, lse_out: list | None = None,
                 loss_dtype: torch.dtype | None = None) -> Tensor:
    """The planned call: the prep, fused and finishing kernels on these tensors (with the
    plan's geometry; launches from _launches_for(plan, grad)). See _forward_into."""
    if input.is_cuda:  # Triton launches on the current device: make it input's
        with device_guard(input):
            return _launch_forward(plan, launches, input, target, weight, grad, divisor,
                                   divisor_value, lse_out, loss_dtype)
    return _launch_forward(plan, launches, input, target, weight, grad, divisor, divisor_value,
                           lse_out, loss_dtype)


def _launch_forward(plan, launches, input, target, weight, grad, divisor, divisor_value,
                    lse_out, loss_dtype) -> Tensor:
    acc = plan.acc
    device = input.device
    if weight is not None:
        weight = weight.to(acc).contiguous()
    # [scale, W, divisor, n_bad], all computed on the device. Where the host can read
    # device memory for free (CPU tensors under the interpreter) it checks n_bad and
    # raises; elsewhere the prep kernel's device assert fires.
    host_check = plan.class_target and host_reads_free(device)
    if host_check:
        reduce_buf = torch.zeros(prep.REDUCE_SLOTS, dtype=acc, device=device)
    else:
        reduce_buf = _alloc.new_empty(plan.acc_like, prep.REDUCE_SLOTS)
    prep_launch = plan.prep
    if divisor_value is not None:  # a host number: its own scalar arguments
        hi, lo = split_f64(divisor_value)
        prep_launch = prep.plan_prep(**plan.prep_args, divisor_hi=hi, divisor_lo=lo)
    prep_launch(target, weight if weight is not None else reduce_buf,
                divisor if divisor is not None else reduce_buf, reduce_buf)
    if host_check and reduce_buf[prep.SLOT_N_BAD].item() != 0:
        raise ValueError(
            f"fusedgrad.cross_entropy: `target` holds class indices outside "
            f"[0, {plan.n_classes}) that are not ignore_index={plan.ignore_index}")
    if plan.target_to_int64:
        target = target.to(torch.int64)
    loss_rows = _alloc.new_empty(plan.acc_like, plan.n_rows)
    if lse_out is None:
        lse_rows = _lse_sink(device, acc, plan.n_rows)
    else:  # the target-gradient path keeps the per-row lse
        lse_rows = _alloc.new_empty(plan.acc_like, plan.n_rows)
        lse_out.append(lse_rows)
    launches.run(input, grad if grad is not None else input, target,
                 weight if weight is not None else reduce_buf, loss_rows, lse_rows, reduce_buf)
    loss_dtype = loss_dtype or input.dtype  # float32 under autocast (_ce_target_grad)
    if plan.finish is None:  # reduction="none"
        return loss_rows.view(plan.loss_shape).to(loss_dtype)
    if loss_dtype == plan.loss_like.dtype:
        out = _alloc.empty_like(plan.loss_like)
    else:
        out = _alloc.empty((), dtype=loss_dtype, device=device)
    plan.finish(loss_rows, reduce_buf, out)
    return out


def _forward_into(input: Tensor, target: Tensor, weight: Tensor | None, grad: Tensor | None,
                  ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                  softcap: float | None, divisor: Tensor | None = None,
                  divisor_value: float | None = None, *, plan: _Plan | None = None,
                  lse_out: list | None = None, loss_dtype: torch.dtype | None = None) -> Tensor:
    """Run the prep, fused and finishing kernels; returns the reduced (or per-row) loss in
    input's dtype. Three launches (two with reduction="none"), no other device op in the
    common case, and no host synchronisation.

    ``divisor`` (0-dim tensor on input's device) or ``divisor_value`` (host float), only
    with reduction="sum": the loss is sum / divisor and the gradient is written already
    divided by it, read on the device (never on the host).
    """
    if plan is None:
        plan = _plan_of(input, target, weight, reduction, ignore_index, label_smoothing,
                        z_loss, softcap, _divisor_kind(divisor, divisor_value))
    return _run_forward(plan, _launches_for(plan, grad), input, target, weight, grad, divisor,
                        divisor_value, lse_out=lse_out, loss_dtype=loss_dtype)


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


@torch.library.custom_op("fusedgrad::cross_entropy_bwd_", mutates_args=("grad",))
def cross_entropy_bwd_(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output in place (grad_output: 0-dim, or the per-row loss shape)."""
    _rescale_in_place(grad, grad_output)


@cross_entropy_bwd_.register_fake
def _(grad, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    save_grad(ctx, grad)


_N_FWD_ARGS = 11  # cross_entropy_fwd's inputs: one gradient (or None) each


def _backward(ctx, grad_loss, _grad_grad):
    return grads_for_inputs(ctx, grad_loss, _N_FWD_ARGS)


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


class _InplaceCrossEntropy(SavedGradFunction):
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
        save_grad(ctx, input)
        return loss


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
    compiling = torch.compiler.is_compiling()
    checked = None  # traced once per graph under torch.compile: no caching (sizes may be
    if not compiling:  # symbolic)
        key = _call_key(input, target, weight, ignore_index, reduction, label_smoothing,
                        z_loss, softcap, inplace_backward, divisor)
        try:
            checked = _CHECKED.get(key)
        except TypeError:  # an unhashable argument: validate says what is wrong
            key = None
    if checked is None:
        validate(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, inplace_backward)
        checked = _checked_call(input, target, weight, ignore_index, reduction,
                                label_smoothing, z_loss, softcap, divisor)
        if not compiling and key is not None:
            if len(_CHECKED) >= _CHECKED_MAX:
                _CHECKED.clear()
            _CHECKED[key] = checked
    plan = checked.plan
    if (plan is not None and process_group is None and divisor is None
            and not inplace_backward and not target.requires_grad
            and (weight is None or not weight.requires_grad)
            and not torch._C._len_torch_dispatch_stack()
            and not torch._C._functorch.is_functorch_wrapped_tensor(input)
            and not (plan.half and torch.is_autocast_enabled(input.device.type))):
        # The common call, planned before: plain eager tensors, no dispatch mode or
        # functorch transform active (the custom op's dispatch buys nothing then: it exists
        # for torch.compile, fake tensors and other modes), nothing the general path below
        # treats specially. Same kernels, same results.
        if torch.is_grad_enabled() and input.requires_grad:
            return _apply_cross_entropy(input, target, weight, None, None, plan)
        return _run_forward(plan, plan.fwd_nograd, input, target, weight, None)
    mergeable = checked.mergeable
    divisor, divisor_value = split_divisor(divisor, reduction, input.device)
    softcap = float(softcap) if softcap is not None else None
    label_smoothing = float(label_smoothing)
    z_loss = float(z_loss)
    # Spatial dims whose strides cannot be merged into one row index (rare: e.g. H and W
    # transposed) are made contiguous; autograd carries the gradient back through the copy.
    if not mergeable[0]:
        input = input.contiguous()
    if not mergeable[1]:
        target = target.contiguous()
    grad_mode = torch.is_grad_enabled()
    needs_grad = grad_mode and input.requires_grad
    if weight is not None and weight.requires_grad and grad_mode:
        raise ValueError("fusedgrad.cross_entropy: gradients with respect to `weight` are not "
                         "supported (torch does not compute them either); pass "
                         "weight.detach()")
    if (grad_mode and target.requires_grad and target.is_floating_point()) or (
            input.dtype in _HALF and process_group is None
            and torch.is_autocast_enabled(input.device.type)):
        # Probability targets that require grad, or autocast (a float32 loss, as torch's
        # autocast gives, from the half logits as they are): their own op, so the common
        # path stays as it is. inplace_backward does not apply there.
        return cross_entropy_with_target_grad(input, target, weight, ignore_index, reduction,
                                              label_smoothing, z_loss, softcap, divisor,
                                              divisor_value, process_group)
    if inplace_backward and needs_grad and input.is_leaf:
        # Checked before any kernel runs: the caller's leaf must not be overwritten.
        raise ValueError("fusedgrad.cross_entropy: inplace_backward=True would overwrite "
                         "`input`, a leaf tensor that requires grad; pass a non-leaf (e.g. "
                         "the output of the layer that produced the logits)")
    if process_group is not None:
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
    if inplace_backward and needs_grad and not compiling:
        return _InplaceCrossEntropy.apply(input, target, weight, ignore_index, reduction,
                                          label_smoothing, z_loss, softcap, divisor,
                                          divisor_value)
    if (not compiling and checked.plain and not torch._C._len_torch_dispatch_stack()
            and not torch._C._functorch.is_functorch_wrapped_tensor(input)):
        # Plain eager tensors (with a divisor, copied spatial dims, ...): as above.
        plan = plan or _plan_of(input, target, weight, reduction, ignore_index,
                                label_smoothing, z_loss, softcap,
                                _divisor_kind(divisor, divisor_value))
        if needs_grad:
            return _apply_cross_entropy(input, target, weight, divisor, divisor_value, plan)
        return _run_forward(plan, plan.fwd_nograd, input, target, weight, None, divisor,
                            divisor_value)
    loss, _ = torch.ops.fusedgrad.cross_entropy_fwd(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        needs_grad, divisor, divisor_value)
    return loss


# Argument checks that passed, and the plan, keyed by everything they read: the tensors'
# metadata and the scalar arguments with their types (True == 1 but only one is a valid
# ignore_index). Cleared with the plans when a launcher tunable is set.
_CHECKED: dict = {}
_CHECKED_MAX = 1024
register_cache(_CHECKED.clear)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


@dataclass(frozen=True, slots=True)
class _Checked:
    """What a call with these arguments' metadata may skip next time."""

    mergeable: tuple[bool, bool]  # input, target viewable as rows (else made contiguous)
    plain: bool                   # plain tensors: the eager path may skip the custom op
    plan: _Plan | None            # the per-shape plan, when no copy changes the shapes


def _checked_call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                  softcap, divisor) -> _Checked:
    mergeable = (launch.spatial_dims_mergeable(input, True),
                 launch.spatial_dims_mergeable(target, target.is_floating_point()))
    plain = (type(input) in _PLAIN and type(target) in _PLAIN
             and (weight is None or type(weight) in _PLAIN))
    plan = None
    if plain and all(mergeable) and not torch.compiler.is_compiling():
        plan = _plan_of(input, target, weight, reduction, ignore_index, label_smoothing,
                        z_loss, softcap, _divisor_arg_kind(divisor))
    return _Checked(mergeable, plain, plan)


def _divisor_arg_kind(divisor) -> str | None:
    """_divisor_kind of the public ``divisor=`` argument (a tensor stays a device tensor)."""
    if divisor is None:
        return None
    return "device" if isinstance(divisor, torch.Tensor) else "host"


def _call_key(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
              softcap, inplace_backward, divisor):
    """The call's metadata (may be unhashable), or None (e.g. a non-tensor argument:
    validate says why)."""
    try:
        w = None if weight is None else (weight.shape, weight.stride(), weight.dtype,
                                          weight.device, type(weight))
        return (input.shape, input.stride(), input.dtype, input.device, type(input),
                target.shape, target.stride(), target.dtype, target.device, type(target), w,
                ignore_index, type(ignore_index), reduction, type(reduction),
                label_smoothing, type(label_smoothing), z_loss, type(z_loss),
                softcap, type(softcap), inplace_backward, type(inplace_backward),
                None if divisor is None else _divisor_arg_kind(divisor))
    except AttributeError:
        return None


class _CrossEntropyFunction(SavedGradFunction):
    """Eager autograd of the functional op without the custom-op dispatch (same
    forward, same backward as ``cross_entropy_fwd`` + ``register_autograd``)."""

    @staticmethod
    def forward(ctx, input, target, weight, divisor, divisor_value, plan):
        grad = _alloc.empty_like(input)  # strides plan.grad_stride: planned the same way
        loss = _run_forward(plan, plan.fwd_grad, input, target, weight, grad, divisor,
                            divisor_value)
        save_grad(ctx, grad, plan.fwd_grad)  # the backward's launch is planned too
        return loss


# torch.autograd.Function.apply without its Python wrapper, which only binds default
# arguments (forward has none) and unwraps dead functorch wrappers (the fast path runs
# only on plain tensors with no functorch transform active): ~2 us per call.
_apply_cross_entropy = super(torch.autograd.Function, _CrossEntropyFunction).apply


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


_HALF = (torch.float16, torch.bfloat16)
# The probability-target-gradient ops (registered at import, never inside a traced call).
from ._ce_target_grad import cross_entropy_with_target_grad  # noqa: E402
