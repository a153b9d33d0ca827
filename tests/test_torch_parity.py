"""torch's own OpInfo samples (F.cross_entropy, F.batch_norm) and ModuleInfo inputs
(nn.CrossEntropyLoss, nn.BatchNorm1d/2d/3d) through fusedgrad: the same result (outputs,
gradients, running statistics) or the same error as torch.

CPU, float32 and float64 only, a bounded number of samples per op: torch generates them
deterministically, so the set is fixed for a torch version.
"""

import pytest
import torch
import torch.nn.functional as F

import fusedgrad as fg

from helpers import rel_err

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (dev extra)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

DTYPES = (torch.float32, torch.float64)
MAX_SAMPLES = 40  # per (op, dtype): torch generates ~12-21 today; a bound if that grows
# Per (module, dtype, train/eval): CrossEntropyLoss has ~105 inputs (every reduction x
# weight x smoothing x target kind); the first ones already cover index and probability
# targets, weights and smoothing, and the op samples above cover the rest.
MAX_MODULE_INPUTS = 16
# Same tolerance as the suite's float64-reference checks, relative to torch's own result.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

FUNCTIONS = {"nn.functional.cross_entropy": fg.cross_entropy,
             "nn.functional.batch_norm": fg.batch_norm}
MODULES = {torch.nn.CrossEntropyLoss: fg.CrossEntropyLoss, torch.nn.BatchNorm1d: fg.BatchNorm1d,
           torch.nn.BatchNorm2d: fg.BatchNorm2d, torch.nn.BatchNorm3d: fg.BatchNorm3d}


def _clone(x):
    if isinstance(x, torch.Tensor):
        c = x.detach().clone()
        return c.requires_grad_(x.requires_grad)
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(a) for a in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _leaves(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_leaves(a))
        elif isinstance(a, dict):
            out.extend(_leaves(list(a.values())))
    return out


def _run(fn, args, kwargs, seed=0):
    """(output, None) or (None, the exception); backward with a random grad_output (the
    same for both sides: ones would give BatchNorm a zero input gradient, all rounding)."""
    try:
        out = fn(*args, **kwargs)
        if out.requires_grad:
            g = torch.randn(out.shape, dtype=out.dtype,
                            generator=torch.Generator().manual_seed(seed))
            out.backward(g)
        return out.detach(), None
    except Exception as exc:  # noqa: BLE001 - compared with torch's own error below
        return None, exc


def _same(a, b, dtype, what, scale=0.0):
    """a matches torch's b: ||a - b|| <= TOL * max(||b||, scale). ``scale`` (gradients: the
    norm of grad_output) keeps a gradient that cancels to ~0 in exact arithmetic (BatchNorm
    over 2 values per channel) from being judged by its rounding noise alone."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs torch {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs torch {b.dtype}"
    if a.numel():
        err = rel_err(a, b)
        ref_norm = b.detach().double().norm().item()
        if scale > ref_norm > 0:
            err *= ref_norm / scale
        assert err <= TOL[dtype], f"{what}: relative error {err:.2e} vs torch"


def _compare(ours_fn, torch_fn, args, kwargs, dtype):
    ours_args, ours_kwargs = _clone(args), _clone(kwargs)
    ref_args, ref_kwargs = _clone(args), _clone(kwargs)
    out, err = _run(ours_fn, ours_args, ours_kwargs)
    ref, ref_err = _run(torch_fn, ref_args, ref_kwargs)
    if ref_err is not None:
        assert err is not None, f"torch raised {ref_err!r}, fusedgrad returned a result"
        # The same kind of error (fusedgrad's messages name the argument in its own words).
        assert isinstance(err, (type(ref_err), ValueError, RuntimeError, TypeError,
                                IndexError)), (err, ref_err)
        return
    assert err is None, f"torch returned a result, fusedgrad raised {err!r}"
    _same(out, ref, dtype, "output")
    go_norm = torch.randn(ref.shape, dtype=ref.dtype,
                          generator=torch.Generator().manual_seed(0)).norm().item()
    for i, (a, r) in enumerate(zip(_leaves([ours_args, ours_kwargs]),
                                   _leaves([ref_args, ref_kwargs]), strict=True)):
        _same(a.detach(), r.detach(), dtype, f"argument {i} after the call")  # running stats
        if r.grad is not None or a.grad is not None:
            assert a.grad is not None and r.grad is not None, f"grad of argument {i}"
            _same(a.grad, r.grad, dtype, f"grad of argument {i}", scale=go_norm)


def _op_cases():
    ops = {o.name: o for o in op_db if o.name in FUNCTIONS and not o.variant_test_name}
    cases = []
    for name in FUNCTIONS:
        for dtype in DTYPES:
            samples = list(ops[name].sample_inputs("cpu", dtype, requires_grad=True))
            for i, s in enumerate(samples[:MAX_SAMPLES]):
                cases.append(pytest.param(name, dtype, s, id=f"{name.split('.')[-1]}-"
                                          f"{str(dtype)[6:]}-{i}"))
    return cases


@pytest.mark.parametrize("name,dtype,sample", _op_cases())
def test_opinfo_samples(name, dtype, sample):
    torch_fn = {"nn.functional.cross_entropy": F.cross_entropy,
                "nn.functional.batch_norm": F.batch_norm}[name]
    _compare(FUNCTIONS[name], torch_fn, [sample.input, *sample.args], sample.kwargs, dtype)


def _module_cases():
    infos = {m.module_cls: m for m in module_db if m.module_cls in MODULES}
    cases = []
    for cls in MODULES:
        for dtype in DTYPES:
            for training in (True, False):
                inputs = infos[cls].module_inputs_func(
                    infos[cls], device="cpu", dtype=dtype, requires_grad=True,
                    training=training)
                for i, mi in enumerate(inputs[:MAX_MODULE_INPUTS]):
                    if mi.forward_input is None:
                        continue
                    cases.append(pytest.param(
                        cls, dtype, training, mi,
                        id=f"{cls.__name__}-{str(dtype)[6:]}-{'train' if training else 'eval'}"
                           f"-{i}"))
    return cases


@pytest.mark.parametrize("cls,dtype,training,module_input", _module_cases())
def test_module_inputs(cls, dtype, training, module_input):
    ctor = module_input.constructor_input
    fwd = module_input.forward_input
    torch.manual_seed(0)
    ref_m = cls(*ctor.args, **ctor.kwargs).to(dtype)
    ours_m = MODULES[cls](*ctor.args, **ctor.kwargs).to(dtype)
    ours_m.load_state_dict(ref_m.state_dict())
    ref_m.train(training)
    ours_m.train(training)
    _compare(ours_m, ref_m, fwd.args, fwd.kwargs, dtype)
    for (k, a), (_, r) in zip(ours_m.state_dict().items(), ref_m.state_dict().items(),
                              strict=True):
        _same(a, r, dtype, f"state {k}")
    for (k, a), (_, r) in zip(ours_m.named_parameters(), ref_m.named_parameters(), strict=True):
        if r.grad is not None:
            assert a.grad is not None, f"grad of {k}"
            _same(a.grad, r.grad, dtype, f"grad of {k}")
