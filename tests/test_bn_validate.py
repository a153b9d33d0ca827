"""Argument checks of fusedgrad's BatchNorm op and modules (mirrors ops/_bn_validate.py):
every bad argument raises a clear error naming it; nothing reads tensor data."""

import math

import pytest
import torch
from torch import nn

import fusedgrad as fg
from fusedgrad._bn_validate import (
    validate,
    validate_act_args,
    validate_epilogue,
    validate_module_args,
)

from helpers import DEVICE

C = 3
ACTS = ("identity", "relu", "leaky_relu")


def _args(**over):
    """Valid validate() arguments, with some replaced."""
    args = dict(input=torch.randn(2, C, 4, device=DEVICE),
                running_mean=torch.zeros(C, device=DEVICE),
                running_var=torch.ones(C, device=DEVICE), weight=torch.ones(C, device=DEVICE),
                bias=torch.zeros(C, device=DEVICE), training=True, momentum=0.1, eps=1e-5)
    args.update(over)
    return args


def test_valid_arguments_pass():
    validate(**_args())
    validate(**_args(momentum=None, weight=None, bias=None))
    validate(**_args(training=False, eps=0.0))  # eps = 0 is allowed in eval, as in torch


@pytest.mark.parametrize("over,error,match", [
    (dict(input=[1.0, 2.0]), TypeError, "`input` must be a Tensor"),
    (dict(input=torch.ones(2, C, dtype=torch.int32)), TypeError, "`input` must be float32"),
    (dict(input=torch.ones(C)), ValueError, r"`input` must have shape \(N, C, \*\)"),
    (dict(running_mean=torch.zeros(C + 1)), ValueError, "`running_mean` should contain 3"),
    (dict(weight=[1.0] * C), TypeError, "`weight` must be a Tensor or None"),
    (dict(bias=torch.zeros(C, dtype=torch.int64)), TypeError, "`bias` must be floating"),
    (dict(running_var=None), ValueError, "`running_mean` and `running_var` must both"),
    (dict(running_mean=None, running_var=None, training=False), ValueError,
     "must be defined in evaluation mode"),
    (dict(momentum="0.1"), TypeError, "`momentum` must be a finite float or None"),
    (dict(momentum=math.nan), TypeError, "`momentum`"),
    (dict(momentum=True), TypeError, "`momentum`"),
    (dict(eps=-1e-5), ValueError, "`eps` must be a finite non-negative float"),
    (dict(eps=math.nan), ValueError, "`eps`"),
    (dict(eps=0.0), ValueError, "`eps` must be positive during training"),
    (dict(input=torch.randn(1, C, 1)), ValueError, "Expected more than 1 value per channel"),
])
def test_bad_op_arguments(over, error, match):
    with pytest.raises(error, match=match):
        validate(**_args(**over))


def test_epilogue():
    x = torch.randn(2, C, 4, device=DEVICE)
    kw = dict(activations=ACTS, default_slope=0.01)
    assert validate_epilogue(x, None, None, None, **kw) == ("identity", 0.0)
    assert validate_epilogue(x, "leaky_relu", None, x, **kw) == ("leaky_relu", 0.01)
    assert validate_epilogue(x, "leaky_relu", 0.2, None, **kw) == ("leaky_relu", 0.2)
    with pytest.raises(ValueError, match="`activation` must be None or one of"):
        validate_epilogue(x, "tanh", None, None, **kw)
    with pytest.raises(ValueError, match="`activation_param` is leaky_relu's"):
        validate_epilogue(x, "relu", 0.2, None, **kw)
    with pytest.raises(TypeError, match="`activation_param` must be a finite float"):
        validate_epilogue(x, "leaky_relu", math.inf, None, **kw)
    with pytest.raises(ValueError, match="`residual` must have the input's shape"):
        validate_epilogue(x, "relu", None, x[:1], **kw)
    with pytest.raises(TypeError, match="`residual` must have the input's dtype"):
        validate_epilogue(x, "relu", None, x.double(), **kw)
    with pytest.raises(TypeError, match="`residual` must be a Tensor or None"):
        validate_epilogue(x, "relu", None, 1.0, **kw)


@pytest.mark.parametrize("build", [
    lambda **kw: fg.BatchNorm2d(**kw), lambda **kw: fg.BatchNorm1d(**kw),
    lambda **kw: fg.SyncBatchNorm(**kw), lambda **kw: fg.BatchNormAct2d(**kw),
    lambda **kw: fg.SyncBatchNormAct2d(**kw),
])
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_features=0), ValueError, "`num_features` must be a positive int"),
    (dict(num_features=2.0), ValueError, "`num_features`"),
    (dict(num_features=True), ValueError, "`num_features`"),
    (dict(num_features=C, eps=-1.0), ValueError, "`eps`"),
    (dict(num_features=C, momentum="fast"), TypeError, "`momentum`"),
])
def test_module_constructors(build, kwargs, error, match):
    with pytest.raises(error, match=match):
        build(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(act_layer=nn.ReLU()), "not a module instance"),
    (dict(act_layer=3), "`act_layer` must be an activation name"),
    (dict(act_kwargs=["inplace"]), "`act_kwargs` must be a dict"),
    (dict(drop_layer=nn.Dropout()), "`drop_layer` must be a module class"),
])
def test_batchnormact_arguments(kwargs, match):
    with pytest.raises(TypeError, match=match):
        fg.BatchNormAct2d(C, **kwargs)
    with pytest.raises(TypeError, match=match):
        fg.SyncBatchNormAct2d(C, **kwargs)


def test_module_argument_errors_name_the_class():
    with pytest.raises(ValueError, match=r"^fusedgrad\.BatchNorm3d: `num_features`"):
        fg.BatchNorm3d(-1)
    validate_module_args("X", C, 0.0, None)  # eval-only eps = 0 and cumulative momentum
    validate_act_args("X", "silu", {"inplace": False}, nn.Dropout)


def test_op_errors_name_the_argument():
    # Through fusedgrad.batch_norm itself.
    x = torch.randn(2, 3, 4, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fg.batch_norm(torch.randn(1, 3, device=DEVICE), rm, rv, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fg.batch_norm(torch.randn(1, 3, 1, 1, device=DEVICE), rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean"):
        fg.batch_norm(x, torch.zeros(4, device=DEVICE), rv, training=True)
    with pytest.raises(ValueError, match="weight"):
        fg.batch_norm(x, rm, rv, torch.ones(4, device=DEVICE), training=True)
    with pytest.raises(ValueError, match="bias"):
        fg.batch_norm(x, rm, rv, None, torch.ones(2, device=DEVICE), training=True)
    with pytest.raises(ValueError, match="evaluation mode"):
        fg.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="input"):
        fg.batch_norm(torch.randn(3, device=DEVICE), rm, rv, training=True)
    with pytest.raises(TypeError, match="input"):
        fg.batch_norm(x.long(), rm, rv, training=True)
    with pytest.raises(ValueError, match="eps"):
        fg.batch_norm(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(TypeError, match="momentum"):
        fg.batch_norm(x, rm, rv, training=True, momentum=None)
    # One value per channel is fine in eval, as in torch.
    y = fg.batch_norm(torch.randn(1, 3, device=DEVICE), rm, rv, training=False)
    assert torch.isfinite(y).all()
