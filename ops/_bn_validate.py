"""Argument checks for fusedgrad's BatchNorm op and modules: clear errors naming the argument.

Shape/dtype/device/type checks only; nothing here reads tensor data (no host sync), so the
checks cost a few attribute reads per call.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._runtime import check_device, check_same_device, interpreter_active

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Fixed for the process (Triton chose its backend when it was first imported, and fusedgrad
# imports it): decided once at import, not on the first call. A lazily filled cache is
# module state that torch.compile guards on, so the first compiled call filling it cost one
# recompile of the model; interpreter_active() itself imports and inspects on every call.
_INTERPRETING = interpreter_active()


def _err(msg: str, owner: str = "fusedgrad.batch_norm") -> str:
    return f"{owner}: {msg}"


def _is_real(value) -> bool:
    # (int, float) rather than numbers.Real: an ABC check costs ~10x on the per-call path.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    """math.isfinite for a number that may be symbolic (a SymFloat under
    torch.compile(dynamic=True), which math.isfinite cannot trace): NaN and +-inf fail."""
    return abs(value) < math.inf


def validate(input, running_mean, running_var, weight, bias, training, momentum, eps,
             check_batch_size=True) -> None:
    """F.batch_norm's arguments (``momentum=None`` is the modules' cumulative average)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(_err(f"`input` must be a Tensor, got {type(input).__name__}"))
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(_err(f"`input` must be float32, float16, bfloat16 or float64, got "
                             f"{input.dtype}"))
    if input.dim() == 1 and input.numel() == 0:
        # torch accepts an empty 1-D input (its OpInfo samples pass (0,) with running
        # statistics of any size) and returns an empty result: nothing to check per channel.
        return
    if input.dim() < 2:
        raise ValueError(_err(f"`input` must have shape (N, C, *), got {tuple(input.shape)}"))
    device = input.device
    if not (device.type == "cuda" or _INTERPRETING):
        check_device("input", input)
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(_err(f"`{name}` must be a Tensor or None, got "
                                 f"{type(t).__name__}"))
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(_err(f"`{name}` must be floating point, got {t.dtype}"))
        if t.numel() != C:
            raise ValueError(_err(f"`{name}` should contain {C} elements (input channels) "
                                  f"not {t.numel()}"))
        if t.device != device:
            check_same_device("input", input, name, t)
    if (running_mean is None) != (running_var is None):
        raise ValueError(_err("`running_mean` and `running_var` must both be given or both "
                              "be None"))
    if not training and running_mean is None:
        raise ValueError(_err("`running_mean` and `running_var` must be defined in "
                              "evaluation mode (training=False)"))
    if momentum is not None and (not _is_real(momentum) or not _finite(momentum)):
        raise TypeError(_err(f"`momentum` must be a finite float or None, got {momentum!r}"))
    if not _is_real(eps) or not _finite(eps) or eps < 0:
        raise ValueError(_err(f"`eps` must be a finite non-negative float, got {eps!r}"))
    if training and eps <= 0:
        raise ValueError(_err(f"`eps` must be positive during training, got {eps}"))
    if training and check_batch_size:
        if input.shape[0] * math.prod(input.shape[2:]) == 1:
            # torch's own message, word for word (code matching on it keeps working).
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {input.size()}")


def validate_epilogue(input, activation, activation_param, residual, *, activations,
                      default_slope) -> tuple[str, float]:
    """``(activation name, its parameter)`` after checking the fused-epilogue arguments of
    ``act(batch_norm(input) + residual)``. ``activations``: the names the op knows."""
    if activation is None:
        activation = "identity"
    if not isinstance(activation, str) or activation not in activations:
        raise ValueError(_err(f"`activation` must be None or one of "
                              f"{', '.join(repr(a) for a in activations)}, got {activation!r}"))
    if activation_param is not None:
        if activation != "leaky_relu":
            raise ValueError(_err(f"`activation_param` is leaky_relu's negative slope; "
                                  f"activation {activation!r} takes none"))
        if not _is_real(activation_param) or not _finite(activation_param):
            raise TypeError(_err(f"`activation_param` must be a finite float, got "
                                 f"{activation_param!r}"))
    param = 0.0
    if activation == "leaky_relu":
        param = default_slope if activation_param is None else float(activation_param)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(_err(f"`residual` must be a Tensor or None, got "
                                 f"{type(residual).__name__}"))
        if residual.shape != input.shape:
            raise ValueError(_err(f"`residual` must have the input's shape "
                                  f"{tuple(input.shape)}, got {tuple(residual.shape)}"))
        if residual.dtype != input.dtype:
            raise TypeError(_err(f"`residual` must have the input's dtype {input.dtype}, got "
                                 f"{residual.dtype}"))
        if residual.device != input.device:
            check_same_device("input", input, "residual", residual)
    return activation, param


def validate_module_args(owner: str, num_features, eps, momentum) -> None:
    """A BatchNorm module's constructor arguments (checked where torch's are not, so that a
    wrong one fails when the model is built, naming itself)."""
    owner = f"fusedgrad.{owner}"
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) \
            or num_features < 1:
        raise ValueError(_err(f"`num_features` must be a positive int, got {num_features!r}",
                              owner))
    if not _is_real(eps) or not _finite(eps) or eps < 0:
        raise ValueError(_err(f"`eps` must be a finite non-negative float, got {eps!r}",
                              owner))
    if momentum is not None and (not _is_real(momentum) or not _finite(momentum)):
        raise TypeError(_err(f"`momentum` must be a finite float or None, got {momentum!r}",
                             owner))


def validate_act_args(owner: str, act_layer, act_kwargs, drop_layer) -> None:
    """BatchNormAct2d's activation and drop-layer arguments (timm's constructor)."""
    owner = f"fusedgrad.{owner}"
    if act_layer is not None and not isinstance(act_layer, str) and not callable(act_layer):
        raise TypeError(_err(f"`act_layer` must be an activation name, a module class (or "
                             f"factory) or None, got {act_layer!r}", owner))
    if isinstance(act_layer, torch.nn.Module):
        raise TypeError(_err(f"`act_layer` must be a module class or name, not a module "
                             f"instance ({type(act_layer).__name__}); pass "
                             f"{type(act_layer).__name__}", owner))
    if act_kwargs is not None and not isinstance(act_kwargs, dict):
        raise TypeError(_err(f"`act_kwargs` must be a dict or None, got "
                             f"{type(act_kwargs).__name__}", owner))
    if drop_layer is not None and (not callable(drop_layer)
                                   or isinstance(drop_layer, torch.nn.Module)):
        raise TypeError(_err(f"`drop_layer` must be a module class (or factory) or None, got "
                             f"{drop_layer!r}", owner))
