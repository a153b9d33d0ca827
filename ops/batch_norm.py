"""fusedgrad.batch_norm: a drop-in for F.batch_norm with a single-pass backward reduction.

Custom ops (namespace ``fusedgrad``), each with a fake implementation so that
``torch.compile(fullgraph=True)`` traces through them:

- ``batch_norm_train``: batch statistics (split reduction + fixed-order merge), normalise,
  running-buffer update on the device (mutates ``running_mean`` / ``running_var``).
- ``batch_norm_eval``: one elementwise pass with the running statistics.
- ``batch_norm_backward``: one reduction pass over x and dy for (sum dy, sum dy * x_hat),
  then one elementwise pass for dx; dgamma = sum dy * x_hat, dbeta = sum dy.

Statistics, weights and gradients of weights are computed in float32 (float64 for float64
input); weights of another dtype are converted for the kernels and gradients converted back.
"""

import math

import torch

from . import _alloc
from . import _bn_launch as L
from ._runtime import check_device, check_same_device

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- validation


def _check_inputs(input, running_mean, running_var, weight, bias, training, momentum, eps,
                  check_batch_size=True):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"fusedgrad.batch_norm: `input` must be a Tensor, got {type(input)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fusedgrad.batch_norm: `input` must be float32, float16, bfloat16 or "
                        f"float64, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"fusedgrad.batch_norm: `input` must have shape (N, C, *), got "
                         f"{tuple(input.shape)}")
    check_device("input", input)
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fusedgrad.batch_norm: `{name}` must be a Tensor or None")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fusedgrad.batch_norm: `{name}` must be floating point, got "
                            f"{t.dtype}")
        if t.numel() != C:
            raise ValueError(f"fusedgrad.batch_norm: `{name}` should contain {C} elements "
                             f"(input channels) not {t.numel()}")
        check_same_device("input", input, name, t)
    if (running_mean is None) != (running_var is None):
        raise ValueError("fusedgrad.batch_norm: `running_mean` and `running_var` must both be "
                         "given or both be None")
    if not training and running_mean is None:
        raise ValueError("fusedgrad.batch_norm: `running_mean` and `running_var` must be "
                         "defined in evaluation mode (training=False)")
    if momentum is not None and not isinstance(momentum, (int, float)):
        raise TypeError(f"fusedgrad.batch_norm: `momentum` must be a float, got "
                        f"{type(momentum)}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"fusedgrad.batch_norm: `eps` must be a non-negative float, got {eps}")
    if training and eps <= 0:
        raise ValueError(f"fusedgrad.batch_norm: `eps` must be positive during training, got "
                         f"{eps}")
    if training and check_batch_size:
        size_prods = input.shape[0] * math.prod(input.shape[2:])
        if size_prods == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {input.size()}")


# ----------------------------------------------------------------------------- helpers


def _as_acc(t, acc):
    """A contiguous [C] view of t in the accumulation dtype (a copy only if needed)."""
    if t is None:
        return None
    t = t.reshape(-1)
    return t if (t.dtype == acc and t.is_contiguous()) else t.to(acc).contiguous()


def _fake_output(x: torch.Tensor) -> torch.Tensor:
    # Same strides the launcher's output gets (x itself or its contiguous copy).
    if L.supported_layout(x):
        return torch.empty_like(x, memory_format=torch.preserve_format)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------- training forward


@torch.library.custom_op("fusedgrad::batch_norm_stats", mutates_args=("running_mean",
                                                                        "running_var"))
def _batch_norm_stats(
    x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None, momentum: float, cumulative: bool, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch (mean, invstd) [C] in the accumulation dtype; updates the running buffers.

    Not differentiable by itself: it is called on a detached input, and the gradient through
    the statistics is part of batch_norm_train's backward formula."""
    acc = L.acc_dtype(x.dtype)
    x = L.prepare_input(x)
    plan = L.make_plan(x)
    part, shift = L.stats_partials(x, plan)
    rm, rv = _as_acc(running_mean, acc), _as_acc(running_var, acc)
    mean, invstd = L.merge_stats_final(
        part, plan.C, part.shape[1] * plan.C, part.shape[1], plan.C, eps, rm, rv,
        num_batches_tracked, momentum, cumulative, shift=shift)
    if running_mean is not None:
        # Buffers in another dtype (a .half() module) were updated in an acc copy.
        if rm.data_ptr() != running_mean.data_ptr():
            running_mean.copy_(rm.view_as(running_mean))
        if rv.data_ptr() != running_var.data_ptr():
            running_var.copy_(rv.view_as(running_var))
    return mean, invstd


@_batch_norm_stats.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps):
    acc = L.acc_dtype(x.dtype)
    C = x.shape[1]
    return x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


@torch.library.custom_op("fusedgrad::batch_norm_train", mutates_args=())
def _batch_norm_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    mean: torch.Tensor, invstd: torch.Tensor, eps: float,
) -> torch.Tensor:
    """y = (x - mean) * invstd * weight + bias with batch statistics from batch_norm_stats;
    its backward includes the gradient through the statistics."""
    acc = L.acc_dtype(x.dtype)
    x = L.prepare_input(x)
    plan = L.make_plan(x)
    return L.apply(x, plan, mean, invstd, False, _as_acc(weight, acc), _as_acc(bias, acc), eps)


@_batch_norm_train.register_fake
def _(x, weight, bias, mean, invstd, eps):
    return _fake_output(x)


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, mean, invstd, eps = inputs
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.eps = eps
    ctx.training = True


def _eval_setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps = inputs
    # Copies (C values each) of the statistics in force now: a later training forward updates
    # the live buffers in place, and the backward must neither see the new values nor fail
    # autograd's saved-tensor version check (torch's eval backward does neither).
    acc = L.acc_dtype(x.dtype)
    ctx.save_for_backward(x, weight, running_mean.detach().to(acc, copy=True),
                          running_var.detach().to(acc, copy=True))
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.eps = eps
    ctx.training = False


def _backward(ctx, grad_y, *_unused):
    x, weight, mean, scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_input = need[0]
    need_params = need[1] or need[2]
    if not (need_input or need_params):
        return (None,) * len(need)
    dx, dweight, dbias = _batch_norm_backward(
        grad_y, x, weight, mean, scale, not ctx.training, ctx.training, ctx.eps,
        need_input, need_params)
    grads = [dx if need_input else None,
             dweight.to(weight.dtype) if (need[1] and weight is not None) else None,
             dbias.to(ctx.bias_dtype) if (need[2] and ctx.has_bias) else None]
    return tuple(grads) + (None,) * (len(need) - 3)


_batch_norm_train.register_autograd(_backward, setup_context=_train_setup_context)


# ----------------------------------------------------------------------------- eval forward


@torch.library.custom_op("fusedgrad::batch_norm_eval", mutates_args=())
def _batch_norm_eval(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
) -> torch.Tensor:
    acc = L.acc_dtype(x.dtype)
    x = L.prepare_input(x)
    plan = L.make_plan(x)
    return L.apply(x, plan, _as_acc(running_mean, acc), _as_acc(running_var, acc), True,
                   _as_acc(weight, acc), _as_acc(bias, acc), eps)


@_batch_norm_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return _fake_output(x)


_batch_norm_eval.register_autograd(_backward, setup_context=_eval_setup_context)


# ----------------------------------------------------------------------------- backward


@torch.library.custom_op("fusedgrad::batch_norm_backward", mutates_args=())
def _batch_norm_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    scale: torch.Tensor, scale_is_var: bool, training: bool, eps: float,
    need_input_grad: bool, need_param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias). ``scale`` is invstd (training) or the running variance (eval).
    Outputs not asked for are empty; dweight and dbias are in the accumulation dtype."""
    acc = L.acc_dtype(x.dtype)
    x = L.prepare_input(x)
    plan = L.make_plan(x)
    dy = L.match_layout(grad_y, x)
    mean, scale = _as_acc(mean, acc), _as_acc(scale, acc)
    w = _as_acc(weight, acc)
    sums = None
    dweight = dbias = None
    if training or need_param_grads:
        part = L.bwd_partials(x, dy, plan, mean, scale, scale_is_var, eps)
        sums, dweight, dbias = L.bwd_merge(part, need_param_grads)
    if need_input_grad:
        dx = L.dx(x, dy, plan, mean, scale, scale_is_var, w, sums, plan_count(x), training, eps)
    else:
        dx = _alloc.empty((0,), dtype=x.dtype, device=x.device)
    if dweight is None:
        dweight = _alloc.empty((0,), dtype=acc, device=x.device)
        dbias = _alloc.empty((0,), dtype=acc, device=x.device)
    return dx, dweight, dbias


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fusedgrad.batch_norm: double backward (differentiating BatchNorm's gradient, e.g. "
        "torch.autograd.grad(..., create_graph=True) then backward through the result) is "
        "not supported; use torch.nn.functional.batch_norm / torch.nn.BatchNorm*d for "
        "higher-order gradients")


def _backward_setup_context(ctx, inputs, output):
    pass


_batch_norm_backward.register_autograd(_no_double_backward,
                                       setup_context=_backward_setup_context)


def plan_count(x: torch.Tensor) -> int:
    """Values per channel (N * prod(spatial))."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


@_batch_norm_backward.register_fake
def _(grad_y, x, weight, mean, scale, scale_is_var, training, eps, need_input_grad,
      need_param_grads):
    acc = L.acc_dtype(x.dtype)
    C = x.shape[1]
    dx = _fake_output(x) if need_input_grad else x.new_empty((0,))
    n = C if need_param_grads else 0
    return dx, x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


# ----------------------------------------------------------------------------- public API

# Activations applied after the normalisation (and the residual add), by name.
# "identity" (and None) apply nothing. leaky_relu's negative slope is `activation_param`
# (default 0.01, as torch.nn.LeakyReLU); no other activation takes a parameter.
ACTIVATIONS = ("identity", "relu", "silu", "gelu", "gelu_tanh", "leaky_relu", "hardswish")
# The activations computed inside the kernels (normalise pass and backward).
FUSED_ACTIVATIONS = frozenset(ACTIVATIONS)
LEAKY_RELU_DEFAULT_SLOPE = 0.01


def _check_fused_args(input, activation, activation_param, residual):
    """(activation name, parameter) after validating the fused-epilogue arguments."""
    if activation is None:
        activation = "identity"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"fusedgrad.batch_norm: `activation` must be None or one of "
                         f"{', '.join(repr(a) for a in ACTIVATIONS)}, got {activation!r}")
    if activation_param is not None:
        if activation != "leaky_relu":
            raise ValueError("fusedgrad.batch_norm: `activation_param` is leaky_relu's "
                             f"negative slope; activation {activation!r} takes none")
        if isinstance(activation_param, bool) or not isinstance(activation_param,
                                                                (int, float)):
            raise TypeError(f"fusedgrad.batch_norm: `activation_param` must be a float, got "
                            f"{type(activation_param)}")
    param = 0.0
    if activation == "leaky_relu":
        param = LEAKY_RELU_DEFAULT_SLOPE if activation_param is None else float(activation_param)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"fusedgrad.batch_norm: `residual` must be a Tensor or None, got "
                            f"{type(residual)}")
        if residual.shape != input.shape:
            raise ValueError(f"fusedgrad.batch_norm: `residual` must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"fusedgrad.batch_norm: `residual` must have the input's dtype "
                            f"{input.dtype}, got {residual.dtype}")
        check_same_device("input", input, "residual", residual)
    return activation, param


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
    return batch_norm_tracked(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, None, activation=activation, residual=residual,
                              activation_param=activation_param)


def batch_norm_tracked(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked, *, activation=None, residual=None,
                       activation_param=None):
    """batch_norm with an optional num_batches_tracked: momentum=None then means a cumulative
    average with factor 1 / num_batches_tracked, read on the device (the modules pass it)."""
    _check_inputs(input, running_mean, running_var, weight, bias, training, momentum, eps)
    activation, param = _check_fused_args(input, activation, activation_param, residual)
    y = _batch_norm_plain(input, running_mean, running_var, weight, bias, training, momentum,
                          eps, num_batches_tracked)
    if residual is not None:
        y = y + residual
    return _torch_activation(y, activation, param)


def _batch_norm_plain(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      num_batches_tracked):
    if momentum is None and training and running_mean is not None \
            and num_batches_tracked is None:
        raise TypeError("fusedgrad.batch_norm: `momentum` must be a float (momentum=None, the "
                        "cumulative average, needs num_batches_tracked: use the modules)")
    if input.numel() == 0:
        # As torch: an empty batch gives an empty output (still connected to weight and
        # bias for autograd) and leaves the running statistics alone.
        out = input.clone()
        if weight is not None:
            out = out * weight[0]
        if bias is not None:
            out = out + bias[0]
        return out
    if training:
        cumulative = momentum is None
        mean, invstd = _batch_norm_stats(input.detach(), running_mean, running_var,
                                         num_batches_tracked if cumulative else None,
                                         0.0 if cumulative else float(momentum), cumulative,
                                         float(eps))
        return _batch_norm_train(input, weight, bias, mean, invstd, float(eps))
    return _batch_norm_eval(input, weight, bias, running_mean, running_var, float(eps))


def _batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps,
                     num_batches_tracked, **fused):
    """Deprecated private name kept for the modules until they import batch_norm_tracked."""
    return batch_norm_tracked(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, num_batches_tracked, **fused)


# `fusedgrad.batch_norm` is this function (the package re-exports it over the module name),
# so the set of fused activations is reachable from it as well.
batch_norm.FUSED_ACTIVATIONS = FUSED_ACTIVATIONS
batch_norm.ACTIVATIONS = ACTIVATIONS
