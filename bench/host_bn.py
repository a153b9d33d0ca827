"""Host-cost cases for BatchNorm (``python -m bench host``): tiny CPU inputs, so the
time is the host path around the kernels (see bench/host.py)."""

from __future__ import annotations

from .host import HostCase

SHAPE = (4, 8, 3, 3)


def _make():
    import torch

    g = torch.Generator().manual_seed(0)
    c = SHAPE[1]
    return {"x": torch.randn(*SHAPE, generator=g).requires_grad_(),
            "running_mean": torch.zeros(c), "running_var": torch.ones(c),
            "weight": torch.randn(c, generator=g).requires_grad_(),
            "bias": torch.randn(c, generator=g).requires_grad_(),
            "residual": torch.randn(*SHAPE, generator=g).requires_grad_()}


def _call(fn, inp, training, **epilogue):
    return fn(inp["x"], inp["running_mean"], inp["running_var"], inp["weight"], inp["bias"],
              training=training, momentum=0.1, eps=1e-5, **epilogue)


def _fused_train(inp):
    import fusedgrad as fg

    _call(fg.batch_norm, inp, True).sum().backward()


def _torch_train(inp):
    import torch.nn.functional as F

    _call(F.batch_norm, inp, True).sum().backward()


def _fused_eval(inp):
    import torch

    import fusedgrad as fg

    with torch.no_grad():
        _call(fg.batch_norm, inp, False)


def _torch_eval(inp):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        _call(F.batch_norm, inp, False)


def _fused_add_relu(inp):
    import fusedgrad as fg

    _call(fg.batch_norm, inp, True, activation="relu",
          residual=inp["residual"]).sum().backward()


def _torch_add_relu(inp):
    import torch.nn.functional as F

    F.relu(_call(F.batch_norm, inp, True) + inp["residual"]).sum().backward()


_MODULES: dict = {}


def _module(kind):
    # One module of each kind, built once (construction is not what is timed).
    if kind not in _MODULES:
        import torch

        import fusedgrad as fg

        cls = fg.BatchNorm2d if kind == "fused" else torch.nn.BatchNorm2d
        _MODULES[kind] = cls(SHAPE[1])
    return _MODULES[kind]


def _fused_module(inp):
    _module("fused")(inp["x"]).sum().backward()


def _torch_module(inp):
    _module("torch")(inp["x"]).sum().backward()


_S = "x".join(map(str, SHAPE))
CASES = [
    HostCase(f"bn train fwd+bwd {_S}", _make, _fused_train, _torch_train),
    HostCase(f"bn eval fwd {_S}", _make, _fused_eval, _torch_eval),
    # The ResNet epilogue relu(bn(x) + shortcut): one fused op against three torch ops.
    HostCase(f"bn+add+relu train fwd+bwd {_S}", _make, _fused_add_relu, _torch_add_relu),
    # The module's forward (fg.BatchNorm2d against nn.BatchNorm2d): num_batches_tracked is
    # counted on the device by both.
    HostCase(f"bn module train fwd+bwd {_S}", _make, _fused_module, _torch_module),
]
