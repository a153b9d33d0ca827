"""fusedgrad.batch_norm: a drop-in for F.batch_norm with a single-pass backward reduction and
an optional fused epilogue, act(bn(x) + residual).

Two ways into the same launchers and launch arguments (ops/_bn_launch.py):

- eager (the default): an autograd.Function; a training step is four launches
  (statistics, normalise, backward reduction, dx) and nothing else on the device, and on
  the host a signature lookup (ops/_bn_call.py: everything but the tensors' data is decided
  on the first call with a signature), the allocations, the launches and autograd;
- under ``torch.compile``: custom ops (namespace ``fusedgrad``) with fake implementations,
  so that ``torch.compile(fullgraph=True)`` traces through them:
  ``batch_norm_stats`` (batch statistics and the running-buffer update; mutates
  ``running_mean`` / ``running_var``), ``batch_norm_train`` / ``batch_norm_eval`` (the
  normalise pass with the epilogue) and ``batch_norm_backward``.

The backward recomputes the pre-activation z from x, the residual and the saved statistics
(it is never stored), then dx = w * invstd / m * (m g - sum g - x_hat sum g x_hat) with
g = dy * act'(z), dgamma = sum g x_hat, dbeta = sum g, d(residual) = g.

Statistics, weights and gradients of weights are computed in float32 (float64 for float64
input); weights of another dtype are converted for the kernels and gradients converted back.
"""

import torch

from . import _bn_call
from . import _bn_launch as L
from ._bn_call import as_acc, copy_back
from ._bn_validate import validate, validate_epilogue

# ----------------------------------------------------------------------------- helpers


def _fake_output(x: torch.Tensor) -> torch.Tensor:
    # Same strides the launcher's output gets (x itself or its contiguous copy).
    if L.supported_layout(x):
        return torch.empty_like(x, memory_format=torch.preserve_format)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def plan_count(x: torch.Tensor) -> int:
    """Values per channel (N * prod(spatial))."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


# ----------------------------------------------------------------------------- shared core


def _backward_core(grad_y, x, weight, bias, residual, mean, scale, training, eps, activation,
                   slope, need_dx, need_params, need_dres, plan=None):
    """(dx, dweight, dbias, dresidual) for the custom op (the eager path: Call.backward);
    dweight/dbias in acc; None where not asked for. One reduction launch (sum g,
    sum g * x_hat, merged in-kernel; in eval only for the parameters' gradients), then one
    launch for dx and d(residual)."""
    acc = L.acc_dtype(x.dtype)
    if plan is None:  # else x is already what the kernels read, and this is its plan
        x = L.prepare_input(x)
        plan = L.make_plan(x)
    xp = x
    dy = L.match_layout(grad_y, xp)
    res = L.match_layout(residual, xp) if residual is not None else None
    w = as_acc(weight, acc)
    # The bias enters z, which only an activation needs.
    b = as_acc(bias, acc) if activation != "identity" else None
    sums = dweight = dbias = None
    if training or need_params:
        sums, dweight, dbias = L.bwd_reduce(xp, dy, plan, mean, scale, not training, eps,
                                            need_params, w, b, res, activation, slope)
    dx = dres = None
    if need_dx or need_dres:
        dx, dres = L.grad_input(xp, dy, plan, mean, scale, not training, w, sums,
                                plan_count(x), training, eps, b, res, activation, slope,
                                want_dx=need_dx, want_dres=need_dres,
                                reverse=sums is not None)
    if not need_params:
        dweight = dbias = None
    return dx, dweight, dbias, dres


_DOUBLE_BACKWARD = (
    "fusedgrad.batch_norm: double backward (differentiating BatchNorm's gradient, e.g. "
    "torch.autograd.grad(..., create_graph=True) then backward through the result) is "
    "not supported; use torch.nn.functional.batch_norm / torch.nn.BatchNorm*d for "
    "higher-order gradients")


class _RaiseOnDoubleBackward(torch.autograd.Function):
    """Passes the first ``n`` tensors through, attached to the rest (what they depend on):
    differentiating them raises instead of silently dropping the second-order terms."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_DOUBLE_BACKWARD)


# ----------------------------------------------------------------------------- eager path


class _BatchNormFunction(torch.autograd.Function):
    """Eager forward + backward: four launches per training step and no other device work
    unless a layout or a parameter dtype needs converting."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call, state):
        # call: the signature's _bn_call.Call; state: (running_mean, running_var,
        # num_batches_tracked). Not tensors of the graph: nothing to differentiate.
        y, res, mean, scale = call.forward(x, weight, bias, residual, *state, keep_stats=True)
        if call.recompute_z:
            ctx.save_for_backward(x, weight, mean, scale, bias, res)
        else:
            ctx.save_for_backward(x, weight, mean, scale)
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx, grad_y):
        call = ctx.call
        x, weight, mean, scale, *z_inputs = ctx.saved_tensors
        bias, res = z_inputs if call.recompute_z else (None, None)
        need = ctx.needs_input_grad
        want_dw, want_db = need[1] and call.has_weight, need[2] and call.has_bias
        dx, dw, db, dres = call.backward(grad_y, x, weight, bias, res, mean, scale, need[0],
                                         want_dw or want_db, need[3] and call.has_residual)
        grads = [dx, dw if want_dw else None, db if want_db else None, dres]
        if torch.is_grad_enabled():  # create_graph=True: a double backward must fail loudly
            present = [g for g in grads if g is not None]
            deps = [t for t in (x, weight, bias, grad_y) if t is not None and t.requires_grad]
            if present and deps:
                wrapped = iter(_RaiseOnDoubleBackward.apply(len(present), *present, *deps))
                grads = [next(wrapped) if g is not None else None for g in grads]
        return (*grads, None, None)


# Function.apply less its per-call argument inspection (binding defaults, unwrapping dead
# functorch wrappers: ~10 us, a third of the op's budget); used unless a functorch
# transform is active, where Function.apply says what it supports.
_apply_unchecked = super(torch.autograd.Function, _BatchNormFunction).apply


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fusedgrad::batch_norm_stats", mutates_args=("running_mean",
                                                                        "running_var"))
def _batch_norm_stats(
    x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None, momentum: float, cumulative: bool, eps: float,
) -> torch.Tensor:
    """Batch statistics [2, C] (mean, invstd) in the accumulation dtype, one launch; updates
    the running buffers.

    Not differentiable by itself: it is called on a detached input, and the gradient through
    the statistics is part of batch_norm_train's backward formula."""
    acc = L.acc_dtype(x.dtype)
    x = L.prepare_input(x)
    rm, rv = as_acc(running_mean, acc), as_acc(running_var, acc)
    st = L.stats(x, L.make_plan(x), eps, rm, rv, num_batches_tracked, momentum, cumulative)
    if running_mean is not None:
        copy_back(running_mean, rm)
        copy_back(running_var, rv)
    return st


@_batch_norm_stats.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps):
    return x.new_empty((2, x.shape[1]), dtype=L.acc_dtype(x.dtype))


@torch.library.custom_op("fusedgrad::batch_norm_train", mutates_args=())
def _batch_norm_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    mean: torch.Tensor, invstd: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    activation: str = "identity", slope: float = 0.0,
) -> torch.Tensor:
    """y = act((x - mean) * invstd * weight + bias + residual) with batch statistics from
    batch_norm_stats; its backward includes the gradient through the statistics."""
    acc = L.acc_dtype(x.dtype)
    x = L.prepare_input(x)
    res = L.match_layout(residual, x) if residual is not None else None
    return L.apply(x, L.make_plan(x), as_acc(mean, acc), as_acc(invstd, acc), False,
                   as_acc(weight, acc), as_acc(bias, acc), eps, residual=res,
                   activation=activation, slope=slope, reverse=True)


@_batch_norm_train.register_fake
def _(x, weight, bias, mean, invstd, eps, residual=None, activation="identity", slope=0.0):
    return _fake_output(x)


# The epilogue arguments' defaults (a call may leave them out).
_EPILOGUE_DEFAULTS = (None, "identity", 0.0)


def _train_setup_context(ctx, inputs, output):
    inputs = tuple(inputs) + _EPILOGUE_DEFAULTS[len(inputs) - 6:]
    x, weight, bias, mean, invstd, eps, residual, activation, slope = inputs
    ctx.save_for_backward(x, weight, bias, residual, mean, invstd)
    ctx.cfg = (True, eps, activation, slope)


def _eval_setup_context(ctx, inputs, output):
    inputs = tuple(inputs) + _EPILOGUE_DEFAULTS[len(inputs) - 6:]
    x, weight, bias, running_mean, running_var, eps, residual, activation, slope = inputs
    # Copies (C values each) of the statistics in force now: a later training forward updates
    # the live buffers in place, and the backward must neither see the new values nor fail
    # autograd's saved-tensor version check (torch's eval backward does neither).
    acc = L.acc_dtype(x.dtype)
    ctx.save_for_backward(x, weight, bias, residual, running_mean.detach().to(acc, copy=True),
                          running_var.detach().to(acc, copy=True))
    ctx.cfg = (False, eps, activation, slope)


def _op_backward(ctx, grad_y):
    x, weight, bias, residual, mean, scale = ctx.saved_tensors
    training, eps, activation, slope = ctx.cfg
    need = ctx.needs_input_grad
    need_dres = residual is not None and len(need) > 6 and need[6]
    need_params = (need[1] and weight is not None) or (need[2] and bias is not None)
    grads = [None] * len(need)
    if not (need[0] or need_params or need_dres):
        return tuple(grads)
    dx, dweight, dbias, dres = _batch_norm_backward(
        grad_y, x, weight, mean, scale, not training, training, eps, need[0], need_params,
        bias, residual, activation, slope, need_dres)
    grads[0] = dx if need[0] else None
    grads[1] = dweight.to(weight.dtype) if (need[1] and weight is not None) else None
    grads[2] = dbias.to(bias.dtype) if (need[2] and bias is not None) else None
    if need_dres:
        grads[6] = dres
    return tuple(grads)


_batch_norm_train.register_autograd(_op_backward, setup_context=_train_setup_context)


@torch.library.custom_op("fusedgrad::batch_norm_eval", mutates_args=())
def _batch_norm_eval(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
    residual: torch.Tensor | None = None, activation: str = "identity", slope: float = 0.0,
) -> torch.Tensor:
    acc = L.acc_dtype(x.dtype)
    x = L.prepare_input(x)
    res = L.match_layout(residual, x) if residual is not None else None
    return L.apply(x, L.make_plan(x), as_acc(running_mean, acc), as_acc(running_var, acc),
                   True, as_acc(weight, acc), as_acc(bias, acc), eps, residual=res,
                   activation=activation, slope=slope)


@_batch_norm_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps, residual=None, activation="identity",
      slope=0.0):
    return _fake_output(x)


_batch_norm_eval.register_autograd(_op_backward, setup_context=_eval_setup_context)


@torch.library.custom_op("fusedgrad::batch_norm_backward", mutates_args=())
def _batch_norm_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    scale: torch.Tensor, scale_is_var: bool, training: bool, eps: float,
    need_input_grad: bool, need_param_grads: bool, bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None, activation: str = "identity", slope: float = 0.0,
    need_residual_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dresidual). ``scale`` is invstd (training) or the running variance
    (eval). Outputs not asked for are empty; dweight and dbias are in the accumulation dtype."""
    acc = L.acc_dtype(x.dtype)
    dx, dweight, dbias, dres = _backward_core(
        grad_y, x, weight, bias, residual, as_acc(mean, acc), as_acc(scale, acc), training, eps,
        activation, slope, need_input_grad, need_param_grads, need_residual_grad)
    # Distinct empty tensors for what was not asked for (a custom op's outputs never alias).
    return (dx if dx is not None else x.new_empty((0,)),
            dweight if dweight is not None else x.new_empty((0,), dtype=acc),
            dbias if dbias is not None else x.new_empty((0,), dtype=acc),
            dres if dres is not None else x.new_empty((0,)))


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD)


def _backward_setup_context(ctx, inputs, output):
    pass


_batch_norm_backward.register_autograd(_no_double_backward,
                                       setup_context=_backward_setup_context)


@_batch_norm_backward.register_fake
def _(grad_y, x, weight, mean, scale, scale_is_var, training, eps, need_input_grad,
      need_param_grads, bias=None, residual=None, activation="identity", slope=0.0,
      need_residual_grad=False):
    acc = L.acc_dtype(x.dtype)
    C = x.shape[1]
    dx = _fake_output(x) if need_input_grad else x.new_empty((0,))
    dres = _fake_output(x) if need_residual_grad else x.new_empty((0,))
    n = C if need_param_grads else 0
    return dx, x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc), dres


# ----------------------------------------------------------------------------- public API

# Activations applied after the normalisation (and the residual add), by name.
# "identity" (and None) apply nothing. leaky_relu's negative slope is `activation_param`
# (default 0.01, as torch.nn.LeakyReLU); no other activation takes a parameter.
ACTIVATIONS = tuple(L.ACTIVATION_CODES)
# The activations computed inside the kernels (normalise pass and backward).
FUSED_ACTIVATIONS = frozenset(ACTIVATIONS)
LEAKY_RELU_DEFAULT_SLOPE = 0.01


def _torch_activation(z, activation, param):
    F = torch.nn.functional
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "leaky_relu":
        return F.leaky_relu(z, param)
    if activation == "hardswish":
        return F.hardswish(z)
    return z


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None, residual=None,
               activation_param=None):
    """Drop-in for ``torch.nn.functional.batch_norm`` (same arguments and semantics), with an
    optional fused epilogue: ``act(batch_norm(input) + residual)``.

    input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), float32/16, bfloat16 or float64,
    any strides (contiguous and channels_last layouts are read in place; the output keeps the
    input's memory format). Half inputs may use float32 weight/bias/running buffers.
    In training the batch statistics normalise and ``running_mean``/``running_var`` (if given)
    are updated in place: ``(1 - momentum) * running + momentum * batch`` with the unbiased
    variance. Nothing is read back to the host.
    activation: None (or "identity"), "relu", "silu", "gelu" (erf), "gelu_tanh",
        "leaky_relu" (negative slope ``activation_param``, default 0.01) or "hardswish";
        all are in ``FUSED_ACTIVATIONS``.
    residual: None or a tensor of the input's shape and dtype, added before the activation
        (the ResNet ``relu(bn(x) + shortcut)``); it receives a gradient like any input.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       None, activation, activation_param, residual)


def batch_norm_tracked(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked, *, activation=None, residual=None,
                       activation_param=None):
    """batch_norm with an optional num_batches_tracked: momentum=None then means a cumulative
    average with factor 1 / num_batches_tracked, read on the device (the modules pass it)."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked, activation, activation_param, residual)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                num_batches_tracked, activation, activation_param, residual):
    call = sig = None
    if not torch.compiler.is_compiling():
        try:  # a signature seen before: its arguments passed the checks below
            sig = _bn_call.signature(running_mean, running_var, weight, bias, training,
                                     momentum, eps, num_batches_tracked, activation,
                                     activation_param, residual)
            call = _bn_call.find(input, sig)
        except (AttributeError, TypeError):  # not tensors, unhashable: the checks say which
            pass
    if call is None:
        validate(input, running_mean, running_var, weight, bias, training, momentum, eps)
        act, slope = validate_epilogue(input, activation, activation_param, residual,
                                       activations=ACTIVATIONS,
                                       default_slope=LEAKY_RELU_DEFAULT_SLOPE)
        cumulative = momentum is None
        if (cumulative and training and running_mean is not None
                and num_batches_tracked is None):
            raise TypeError("fusedgrad.batch_norm: `momentum` must be a float (momentum=None, "
                            "the cumulative average, needs num_batches_tracked: use the "
                            "modules)")
        if input.numel() == 0:
            return _empty_batch(input, weight, bias, residual, act, slope)
        eps_f, momentum_f = float(eps), (0.0 if cumulative else float(momentum))
        if torch.compiler.is_compiling():
            nbt = num_batches_tracked if cumulative else None
            return _compiled_path(input, running_mean, running_var, weight, bias, residual,
                                  nbt, training, momentum_f, cumulative, eps_f, act, slope)
        if sig is None:
            sig = _bn_call.signature(running_mean, running_var, weight, bias, training,
                                     momentum, eps, num_batches_tracked, activation,
                                     activation_param, residual)
        input = L.prepare_input(input)
        call = _bn_call.build(input, sig, running_mean, running_var, weight, bias, residual,
                              training, momentum_f, cumulative, eps_f, act, slope)
    state = (running_mean, running_var, num_batches_tracked)
    if torch.is_grad_enabled() and (
            input.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
            or (residual is not None and residual.requires_grad)):
        if torch._C._are_functorch_transforms_active():
            return _BatchNormFunction.apply(input, weight, bias, residual, call, state)
        return _apply_unchecked(input, weight, bias, residual, call, state)
    return call.forward(input, weight, bias, residual, *state, keep_stats=False)[0]


def _empty_batch(input, weight, bias, residual, activation, slope):
    # As torch: an empty batch gives an empty output (still connected to weight, bias and
    # residual for autograd) and leaves the running statistics alone.
    out = input.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    if residual is not None:
        out = out + residual
    return _torch_activation(out, activation, slope)


def _compiled_path(input, running_mean, running_var, weight, bias, residual, nbt, training,
                   momentum, cumulative, eps, activation, slope):
    # Under torch.compile: the custom ops, whose fake implementations the graph traces.
    if training:
        st = _batch_norm_stats(input.detach(), running_mean, running_var, nbt, momentum,
                               cumulative, eps)
        return _batch_norm_train(input, weight, bias, st[0], st[1], eps, residual, activation,
                                 slope)
    return _batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual,
                            activation, slope)


# `fusedgrad.batch_norm` is this function (the package re-exports it over the module name),
# so the set of fused activations is reachable from it as well.
batch_norm.FUSED_ACTIVATIONS = FUSED_ACTIVATIONS
batch_norm.ACTIVATIONS = ACTIVATIONS
