"""Argument checks for fusedgrad.cross_entropy: clear errors naming the argument.

Shape/dtype/device checks only; nothing here reads tensor data (no host sync).
"""

from __future__ import annotations

import math
import numbers

import torch

from ._runtime import check_device, check_same_device

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_REDUCTIONS = ("none", "mean", "sum")


def _err(msg: str) -> str:
    return f"fusedgrad.cross_entropy: {msg}"


def validate(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             inplace_backward) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(_err(f"`input` must be a Tensor, got {type(input).__name__}"))
    if not isinstance(target, torch.Tensor):
        raise TypeError(_err(f"`target` must be a Tensor, got {type(target).__name__}"))
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(_err(f"`input` must be float16, bfloat16, float32 or float64, "
                             f"got {input.dtype}"))
    if input.dim() < 1:
        raise ValueError(_err("`input` must have at least 1 dimension (C,), (N, C) or "
                              f"(N, C, d1, ...), got shape {tuple(input.shape)}"))
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if n_classes < 1:
        raise ValueError(_err(f"`input` has {n_classes} classes (dimension "
                              f"{1 if input.dim() > 1 else 0}); need at least 1"))
    check_device("input", input)
    check_same_device("input", input, "target", target)

    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(_err(f"probability `target` must have the input's shape "
                                  f"{tuple(input.shape)}, got {tuple(target.shape)}"))
        if target.dtype not in _FLOAT_DTYPES:
            raise TypeError(_err(f"`target` dtype {target.dtype} is not supported"))
    else:
        if target.dtype not in _INDEX_DTYPES:
            raise TypeError(_err(f"class-index `target` must be an integer tensor (int64), "
                                 f"got {target.dtype}"))
        expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.dim() > 1 else ()
        if tuple(target.shape) != expected:
            raise ValueError(_err(f"class-index `target` must have shape {expected} for input "
                                  f"of shape {tuple(input.shape)}, got {tuple(target.shape)}"))

    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(_err(f"`weight` must be a Tensor or None, got "
                                 f"{type(weight).__name__}"))
        if not weight.is_floating_point():
            raise TypeError(_err(f"`weight` must be a floating tensor, got {weight.dtype}"))
        if weight.dim() != 1 or weight.shape[0] != n_classes:
            raise ValueError(_err(f"`weight` must have shape ({n_classes},), got "
                                  f"{tuple(weight.shape)}"))
        check_same_device("input", input, "weight", weight)

    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(_err(f"`ignore_index` must be an int, got {type(ignore_index).__name__}"))
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(_err(f"`ignore_index` must fit in int64, got {ignore_index}"))
    if target.is_floating_point() and ignore_index >= 0:
        # torch's rule: class probabilities have no class to ignore.
        raise ValueError(_err("`ignore_index` is not supported for probability (floating "
                              f"point) `target`, got ignore_index={ignore_index}"))
    if reduction not in _REDUCTIONS:
        raise ValueError(_err(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}"))
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(_err(f"`label_smoothing` must be a float in [0, 1], got "
                              f"{label_smoothing!r}"))
    if not isinstance(z_loss, numbers.Real) or not _finite(z_loss) or z_loss < 0:
        raise ValueError(_err(f"`z_loss` must be a finite float >= 0, got {z_loss!r}"))
    if softcap is not None and (not isinstance(softcap, numbers.Real)
                                or not _finite(softcap) or softcap <= 0):
        raise ValueError(_err(f"`softcap` must be None or a finite float > 0, got {softcap!r}"))
    if not isinstance(inplace_backward, bool):
        raise TypeError(_err("`inplace_backward` must be a bool"))


def _finite(value) -> bool:
    """math.isfinite for a number that may be symbolic (a SymFloat under
    torch.compile(dynamic=True), which math.isfinite cannot trace): NaN and +-inf fail."""
    return abs(value) < math.inf


def split_divisor(divisor, reduction, device, op="fusedgrad.cross_entropy"):
    """Check ``divisor=`` and return (device tensor or None, host float or None).

    A Python number stays a host float (no launch, no copy); a tensor must be 0-dim,
    real, not requiring grad, and is moved to ``device`` (never read on the host).
    """
    if divisor is None:
        return None, None
    if reduction != "sum":
        raise ValueError(f"{op}: `divisor` requires reduction='sum' (the loss is "
                         f"sum / divisor), got reduction={reduction!r}")
    if isinstance(divisor, torch.Tensor):
        if divisor.dim() != 0:
            raise ValueError(f"{op}: `divisor` must be a 0-dim tensor or a number, got shape "
                             f"{tuple(divisor.shape)}")
        if divisor.dtype == torch.bool or divisor.is_complex():
            raise TypeError(f"{op}: `divisor` must be an integer or floating tensor, got "
                            f"{divisor.dtype}")
        if divisor.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: gradients with respect to `divisor` are not supported; "
                             "pass divisor.detach()")
        if divisor.device != device:
            if divisor.device.type != "cpu":
                raise ValueError(f"{op}: `divisor` is on {divisor.device} but `input` is on "
                                 f"{device}")
            divisor = divisor.to(device)
        return divisor, None
    if isinstance(divisor, bool) or not isinstance(divisor, numbers.Real):
        raise TypeError(f"{op}: `divisor` must be None, a number or a 0-dim tensor, got "
                        f"{type(divisor).__name__}")
    if not _finite(divisor) or divisor == 0:
        raise ValueError(f"{op}: `divisor` must be a finite nonzero number, got {divisor!r}")
    return None, float(divisor)
