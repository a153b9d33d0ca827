"""BatchNormAct2d and SyncBatchNormAct2d: BatchNorm followed by dropout and an activation, as
timm's ``timm.layers.BatchNormAct2d`` / ``SyncBatchNormAct``, on fusedgrad's kernels.

Same constructor arguments as timm's (``apply_act``, ``act_layer``, ``act_kwargs``,
``inplace``, ``drop_layer``), same ``act`` and ``drop`` children and the same ``state_dict``
keys, so timm checkpoints load both ways. Like timm's, the class subclasses
``torch.nn.BatchNorm2d`` (``SyncBatchNormAct2d``: ``torch.nn.SyncBatchNorm``).

The activation runs inside the normalise kernel when ``fusedgrad.batch_norm`` fuses it (its
``FUSED_ACTIVATIONS``: ReLU, SiLU, GELU (erf and tanh), LeakyReLU (any slope), Hardswish) and
nothing sits between the two (``drop`` is ``nn.Identity``); then ``act`` is not called at all.
Any other activation (or any dropout) runs as its own module after the kernel, exactly as in
timm. The choice is made on every forward from the ``act`` and ``drop`` modules present then,
so replacing ``module.act`` later is safe.

timm is not needed: activation names map to torch's modules here; when timm is already
imported, names go through timm's own factory so the modules are the ones timm would build.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from torch import nn

from ._bn_validate import validate_act_args, validate_module_args
from .batch_norm import FUSED_ACTIVATIONS
from .batch_norm_modules import module_batch_norm
from .sync_batch_norm import SyncBatchNorm

# Activation names timm's factory knows, mapped to torch's modules (used without timm).
_ACT_LAYERS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU,
    "celu": nn.CELU, "selu": nn.SELU, "prelu": nn.PReLU, "silu": nn.SiLU, "swish": nn.SiLU,
    "mish": nn.Mish, "gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hard_sigmoid": nn.Hardsigmoid,
    "hardsigmoid": nn.Hardsigmoid, "hard_swish": nn.Hardswish, "hardswish": nn.Hardswish,
    "identity": nn.Identity,
}

# timm's activation classes whose forward is exactly a torch function we may fuse (by
# qualified name, so timm is never imported here).
_TIMM_FUSABLE = {"timm.layers.activations.GELU": "gelu",
                 "timm.layers.activations.GELUTanh": "gelu_tanh"}


def fused_activation(act: nn.Module) -> tuple[str, float | None] | None:
    """``(activation, activation_param)`` for ``fusedgrad.batch_norm`` computing exactly what
    ``act`` does inside the kernel, or None. Exact types only: a subclass may override
    forward."""
    kind = type(act)
    param = None
    if kind is nn.ReLU:
        name = "relu"
    elif kind is nn.SiLU:
        name = "silu"
    elif kind is nn.Hardswish:
        name = "hardswish"
    elif kind is nn.GELU:
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    elif kind is nn.LeakyReLU:
        name, param = "leaky_relu", float(act.negative_slope)
    else:
        name = _TIMM_FUSABLE.get(f"{kind.__module__}.{kind.__qualname__}")
    return (name, param) if name in FUSED_ACTIVATIONS else None


def _act_layer_class(act_layer):
    if not isinstance(act_layer, str):
        return act_layer  # a class or factory, called below as timm does
    timm_create_act = sys.modules.get("timm.layers.create_act")
    if timm_create_act is not None:  # the user has timm: build exactly what timm would
        return timm_create_act.get_act_layer(act_layer)
    name = act_layer.lower()
    if not name:
        return None
    if name not in _ACT_LAYERS:
        raise ValueError(f"fusedgrad.BatchNormAct2d: unknown `act_layer` {act_layer!r}; "
                         f"known names: {sorted(_ACT_LAYERS)} (or pass a module class)")
    return _ACT_LAYERS[name]


def create_act(act_layer, act_kwargs=None, inplace=False, apply_act=True) -> nn.Module:
    """The ``act`` child timm's BatchNormAct2d builds: ``act_layer(inplace=..., **act_kwargs)``
    (without ``inplace`` for activations that take none), or nn.Identity."""
    if not apply_act or act_layer is None:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    kwargs.setdefault("inplace", inplace)
    cls = _act_layer_class(act_layer)
    if cls is None:
        return nn.Identity()
    inplace_arg = kwargs.pop("inplace")
    if inplace_arg is None:
        return cls(**kwargs)
    try:
        return cls(inplace=inplace_arg, **kwargs)
    except TypeError:  # no `inplace` argument (GELU, Sigmoid, ...)
        return cls(**kwargs)


class _NormActForward:
    """forward: batch norm with the activation fused when possible, else drop then act."""

    def _norm_act(self, input: torch.Tensor, norm) -> torch.Tensor:
        fused = fused_activation(self.act) if type(self.drop) is nn.Identity else None
        if fused is not None:
            return norm(input, *fused)
        return self.act(self.drop(norm(input)))


class BatchNormAct2d(_NormActForward, nn.BatchNorm2d):
    """Drop-in for ``timm.layers.BatchNormAct2d``: ``act(drop(batch_norm(x)))`` on (N, C, H, W)
    input (contiguous or channels_last), the activation fused into the kernel when possible."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer=nn.ReLU, act_kwargs: dict | None = None, inplace: bool = True,
                 drop_layer=None, device=None, dtype=None):
        validate_module_args("BatchNormAct2d", num_features, eps, momentum)
        validate_act_args("BatchNormAct2d", act_layer, act_kwargs, drop_layer)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = create_act(act_layer, act_kwargs=act_kwargs, inplace=inplace,
                              apply_act=apply_act)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        return self._norm_act(input, partial(module_batch_norm, self))


class SyncBatchNormAct2d(_NormActForward, SyncBatchNorm):
    """SyncBatchNorm + dropout + activation (timm's ``SyncBatchNormAct``): statistics over
    every rank of ``process_group`` in distributed training (the activation fused as in
    BatchNormAct2d); outside it (one process, eval) exactly BatchNormAct2d. Built by
    ``fusedgrad.convert_sync_batchnorm`` from BatchNormAct2d layers, or directly with
    BatchNormAct2d's arguments."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer=nn.ReLU, act_kwargs: dict | None = None, inplace: bool = True,
                 drop_layer=None, process_group=None, device=None, dtype=None):
        validate_act_args("SyncBatchNormAct2d", act_layer, act_kwargs, drop_layer)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, process_group=process_group,
                         device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = create_act(act_layer, act_kwargs=act_kwargs, inplace=inplace,
                              apply_act=apply_act)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._norm_act(input, self.norm)


SyncBatchNormAct = SyncBatchNormAct2d  # timm's name
