"""fusedgrad.linear_cross_entropy (ops/linear_cross_entropy.py) against a float64 reference
``cross_entropy(linear(x, W, b), target)``: loss and the gradients of input, weight and
bias, on fresh random data with poisoned outputs (conftest).

Sizes are small (the interpreter runs the kernel); ``chunk_size`` is set small in most
cases so that several chunks, including a ragged last one, run.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedgrad as fg
from fusedgrad import _ce_launch

from helpers import DEVICE, assert_close
from lce_reference import reference

lce_mod = importlib.import_module("fusedgrad.linear_cross_entropy")


def make(n_rows, hidden, n_classes, dtype=torch.float32, lead=None, bias=False, prob=False,
         ignore_frac=0.2):
    lead = lead if lead is not None else (n_rows,)
    x = torch.randn(*lead, hidden).to(dtype).to(DEVICE)
    w = (torch.randn(n_classes, hidden) / hidden**0.5 * 2).to(dtype).to(DEVICE)
    b = (torch.randn(n_classes) * 0.5).to(dtype).to(DEVICE) if bias else None
    if prob:
        t = torch.softmax(torch.randn(*lead, n_classes, dtype=torch.float64) * 2, -1)
        t = t.to(DEVICE)
    else:
        t = torch.randint(0, n_classes, lead)
        if ignore_frac:
            t[torch.rand(lead) < ignore_frac] = -100
        t = t.to(DEVICE)
    return x, w, b, t


def check(x, w, b, t, *, grad_output=None, dtype=None, factor=1.0, **kw):
    dtype = dtype or x.dtype
    xg = x.detach().clone().requires_grad_(True)
    wg = w.detach().clone().requires_grad_(True)
    bg = b.detach().clone().requires_grad_(True) if b is not None else None
    loss = fg.linear_cross_entropy(xg, wg, t, linear_bias=bg, **kw)
    assert loss.dtype == x.dtype
    go = grad_output if grad_output is not None else torch.ones_like(loss)
    inputs = [xg, wg] + ([bg] if bg is not None else [])
    grads = torch.autograd.grad(loss, inputs, go)
    kw.pop("chunk_size", None)
    ref_loss, ref_grads = reference(x, w, b, t, grad_output=go, **kw)
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, dtype, "loss", factor)
    assert len(grads) == len(ref_grads)
    for name, g, r in zip(("dx", "dW", "db")[:len(grads)], grads, ref_grads, strict=True):
        assert g.dtype == x.dtype and g.shape == r.shape
        assert_close(g, r, dtype, name, factor)
    return loss, grads


# Every option of the cross-entropy, each with the three reductions; chunk_size=7 over
# 30 rows (4 full chunks + a ragged one). grad_output is random (never 1).
FEATURES = {
    "plain": {},
    "bias": dict(bias=True),
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.15),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=2.0),
    "all": dict(bias=True, weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=3.0),
    "ignore_index": dict(ignore_index=3),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_index_targets(feature, reduction):
    opts = dict(FEATURES[feature])
    x, w, b, t = make(30, 12, 70, bias=opts.pop("bias", False))
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(70, device=DEVICE) + 0.2
    if "ignore_index" in opts:
        t[t == -100] = opts["ignore_index"]
    loss = torch.empty(()) if reduction != "none" else torch.empty(30)
    go = torch.randn(loss.shape, device=DEVICE)
    check(x, w, b, t, reduction=reduction, grad_output=go, chunk_size=7, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets(reduction):
    x, w, b, t = make(20, 10, 50, bias=True, prob=True)
    go = torch.randn(() if reduction != "none" else (20,), device=DEVICE)
    check(x, w, b, t, reduction=reduction, grad_output=go, label_smoothing=0.1,
          weight=torch.rand(50, device=DEVICE) + 0.1, z_loss=1e-3, chunk_size=6)


@pytest.mark.compat
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batch_time_hidden_dtypes(dtype):
    # (B, T, H) input with (B, T) targets, as a language model's hidden states.
    x, w, b, t = make(0, 16, 90, dtype=dtype, lead=(3, 7), bias=True)
    check(x, w, b, t, label_smoothing=0.05, chunk_size=4)


def test_batch_time_none_reduction_shape():
    x, w, b, t = make(0, 8, 30, lead=(2, 5))
    go = torch.randn(2, 5, device=DEVICE)
    loss, _ = check(x, w, b, t, reduction="none", grad_output=go)
    assert loss.shape == (2, 5)


def test_vector_input():
    # (H,) input with a 0-dim target: one row.
    x, w, b, t = make(1, 8, 20, ignore_frac=0)
    check(x[0], w, b, t[0], reduction="sum")


def test_vocab_longer_than_one_block():
    # The two-pass (looped) kernel path: V past the single-block limit.
    n_classes = _ce_launch.MAX_SINGLE_BLOCK_V[(False, False)] + 3
    x, w, b, t = make(3, 4, n_classes, bias=True)
    check(x, w, b, t, label_smoothing=0.1)


@pytest.mark.parametrize("divisor", [5, "tensor"])
def test_divisor(divisor):
    x, w, b, t = make(12, 8, 40, bias=True)
    d = torch.tensor(17, device=DEVICE) if divisor == "tensor" else divisor
    check(x, w, b, t, reduction="sum", divisor=d, grad_output=torch.tensor(0.7), chunk_size=5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_divisor_needs_sum(reduction):
    x, w, _, t = make(4, 8, 10)
    with pytest.raises(ValueError, match="divisor"):
        fg.linear_cross_entropy(x, w, t, reduction=reduction, divisor=3)


def test_bf16_weight_grad_accumulates_in_fp32():
    # 16 chunks of one row: a bf16 running sum over chunks would lose ~log2(16) bits.
    x, w, b, t = make(16, 8, 24, dtype=torch.bfloat16, ignore_frac=0)
    check(x, w, b, t, reduction="sum", chunk_size=1)


def test_only_some_inputs_require_grad():
    x, w, b, t = make(10, 8, 30, bias=True)
    xg = x.clone().requires_grad_(True)
    loss = fg.linear_cross_entropy(xg, w, t, linear_bias=b, chunk_size=3)
    (dx,) = torch.autograd.grad(loss, xg)
    _, ref = reference(x, w, b, t)
    assert_close(dx, ref[0], torch.float32, "dx")
    wg = w.clone().requires_grad_(True)
    loss = fg.linear_cross_entropy(x, wg, t, linear_bias=b, reduction="none")
    (dw,) = torch.autograd.grad(loss.sum(), wg)
    _, ref = reference(x, w, b, t, reduction="none")
    assert_close(dw, ref[1], torch.float32, "dW")


def test_forward_only():
    x, w, b, t = make(9, 8, 30, bias=True)
    with torch.no_grad():
        loss = fg.linear_cross_entropy(x, w, t, linear_bias=b, z_loss=1e-3)
    ref, _ = reference(x, w, b, t, z_loss=1e-3)
    assert_close(loss, ref, torch.float32, "loss")


def test_all_ignored_mean_is_nan_with_zero_grad():
    x, w, b, t = make(5, 8, 20, bias=True)
    t.fill_(-100)
    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    loss = fg.linear_cross_entropy(xg, wg, t)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(xg.grad, torch.zeros_like(x)) and torch.equal(wg.grad, torch.zeros_like(w))


def test_retain_graph_second_backward():
    x, w, b, t = make(8, 8, 20)
    xg = x.clone().requires_grad_(True)
    loss = fg.linear_cross_entropy(xg, w, t, chunk_size=3)
    (g1,) = torch.autograd.grad(loss * 2.0, xg, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * -0.5, xg)
    _, ref = reference(x, w, b, t)
    assert_close(g1, ref[0] * 2.0, torch.float32, "first")
    assert_close(g2, ref[0] * -0.5, torch.float32, "second")


@pytest.mark.compat
def test_matches_torch_linear_cross_entropy():
    # torch's own op (its chunked path where this torch has one), fp32, same arguments.
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy")
    x, w, b, t = make(24, 16, 60, bias=True)
    kw = dict(weight=torch.rand(60, device=DEVICE) + 0.5, label_smoothing=0.1)
    opts = {}
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts["options"] = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=8,
                                                             chunking_method=None)
    for reduction in ("mean", "sum", "none"):
        ins = [x.clone().requires_grad_(True), w.clone().requires_grad_(True),
               b.clone().requires_grad_(True)]
        ours = fg.linear_cross_entropy(ins[0], ins[1], t, linear_bias=ins[2],
                                       reduction=reduction, **kw)
        ours_g = torch.autograd.grad(ours.sum(), ins)
        ins = [i.detach().clone().requires_grad_(True) for i in ins]
        theirs = F.linear_cross_entropy(ins[0], ins[1], t, linear_bias=ins[2],
                                        reduction=reduction, **kw, **opts)
        theirs_g = torch.autograd.grad(theirs.sum(), ins)
        assert_close(ours, theirs, torch.float32, f"{reduction} loss")
        for a, c in zip(ours_g, theirs_g, strict=True):
            assert_close(a, c, torch.float32, f"{reduction} grad")


def test_module_matches_torch_module():
    if not hasattr(torch.nn, "LinearCrossEntropyLoss"):
        pytest.skip("this torch has no nn.LinearCrossEntropyLoss")
    cw = torch.rand(30, device=DEVICE) + 0.5
    ours = fg.LinearCrossEntropyLoss(8, 30, bias=True, reduction="sum", weight=cw,
                                     label_smoothing=0.2, device=DEVICE)
    theirs = torch.nn.LinearCrossEntropyLoss(8, 30, bias=True, reduction="sum", weight=cw,
                                             label_smoothing=0.2, device=DEVICE)
    theirs.load_state_dict(ours.state_dict())
    x, _, _, t = make(11, 8, 30)
    a, c = ours(x, t), theirs(x, t)
    a.backward()
    c.backward()
    assert_close(a, c, torch.float32, "loss")
    assert_close(ours.linear.weight.grad, theirs.linear.weight.grad, torch.float32, "dW")
    assert_close(ours.linear.bias.grad, theirs.linear.bias.grad, torch.float32, "db")
    assert "num_classes=30" in repr(ours)


def test_compile_fullgraph():
    x, w, b, t = make(12, 8, 40, bias=True)
    wg = w.clone().requires_grad_(True)
    bg = b.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    d = torch.tensor(9, device=DEVICE)

    def step(inp, weight, bias, num_items):
        h = inp * 1.5
        return fg.linear_cross_entropy(h, weight, t, linear_bias=bias, reduction="sum",
                                       divisor=num_items, chunk_size=5) * 2.0

    loss = torch.compile(step, fullgraph=True)(xg, wg, bg, d)
    loss.backward()
    ref_loss, ref = reference(x * 1.5, w, b, t, reduction="sum", divisor=9,
                              grad_output=torch.tensor(2.0))
    assert_close(loss, ref_loss * 2.0, torch.float32, "loss")
    assert_close(xg.grad, ref[0] * 1.5, torch.float32, "dx")
    assert_close(wg.grad, ref[1], torch.float32, "dW")
    assert_close(bg.grad, ref[2], torch.float32, "db")


def test_compile_fullgraph_none_reduction():
    x, w, b, t = make(10, 8, 30)
    wg = w.clone().requires_grad_(True)

    def step(weight):
        loss = fg.linear_cross_entropy(x, weight, t, reduction="none", chunk_size=4)
        return (loss * torch.arange(10, device=DEVICE)).sum()

    torch.compile(step, fullgraph=True)(wg).backward()
    _, ref = reference(x, w, b, t, reduction="none",
                       grad_output=torch.arange(10, dtype=torch.float64))
    assert_close(wg.grad, ref[1], torch.float32, "dW")


class _BigAllocations(TorchDispatchMode):
    """Records every tensor created by an aten op with at least ``limit`` elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.big = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.numel() >= self.limit:
                if func not in (torch.ops.aten.view.default, torch.ops.aten.t.default,
                                torch.ops.aten.slice.Tensor, torch.ops.aten._unsafe_view.default,
                                torch.ops.aten.alias.default, torch.ops.aten.detach.default):
                    self.big.append((str(func), tuple(o.shape)))
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_logits_sized_allocation(reduction):
    # Default options: no tensor of N * V / 4 elements or more is created in fwd + bwd.
    # H < min(N, V) / 4, so that the input-sized outputs (dx: N x H, dW: V x H) and a
    # default chunk (at most N x H logits) are themselves under the limit.
    n_rows, hidden, n_classes = 64, 8, 64
    x, w, b, t = make(n_rows, hidden, n_classes, bias=True)
    xg, wg, bg = (v.clone().requires_grad_(True) for v in (x, w, b))
    with _BigAllocations(n_rows * n_classes // 4) as watch:
        loss = fg.linear_cross_entropy(xg, wg, t, linear_bias=bg, reduction=reduction,
                                       label_smoothing=0.1)
        loss.backward(torch.ones_like(loss))
    assert watch.big == [], watch.big
    # The watcher does see an unfused loss's logits.
    with _BigAllocations(n_rows * n_classes // 4) as watch:
        F.cross_entropy(F.linear(x, w, b), t)
    assert watch.big


def test_default_chunk_rule():
    # A chunk's logits hold no more elements than the input (torch's aspect-ratio rule).
    assert lce_mod.default_chunk_rows(8192, 4096, 128256) == 256
    for n, h, v in [(100, 16, 300), (7, 3, 5), (1, 1, 1000), (4096, 2048, 32000)]:
        rows = lce_mod.default_chunk_rows(n, h, v)
        assert 1 <= rows <= n and (rows * v <= n * h or rows == 1)
    plan = lce_mod.largest_intermediate_bytes(8192, 4096, 128256, torch.bfloat16)
    assert plan["chunk_logits"] == 256 * 128256 * 2
    assert plan["weight_grad_fp32"] == 128256 * 4096 * 4


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(w_shape=(10, 7)), ValueError, "input"),
    (dict(t_shape=(5,)), ValueError, "target"),
    (dict(bias_shape=(9,)), ValueError, "linear_bias"),
    (dict(w_dtype=torch.float64), TypeError, "linear_weight"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(softcap=-1.0), ValueError, "softcap"),
])
def test_bad_arguments(kwargs, err, match):
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(*kwargs.pop("w_shape", (10, 8)), device=DEVICE,
                    dtype=kwargs.pop("w_dtype", torch.float32))
    t = torch.randint(0, 10, kwargs.pop("t_shape", (4,)), device=DEVICE)
    bias_shape = kwargs.pop("bias_shape", None)
    b = torch.randn(bias_shape, device=DEVICE) if bias_shape else None
    with pytest.raises(err, match=match):
        fg.linear_cross_entropy(x, w, t, linear_bias=b, **kwargs)


def test_target_out_of_range_is_an_error():
    x, w, b, t = make(4, 8, 10, ignore_frac=0)
    t[1] = 10
    with pytest.raises(ValueError, match="target"):
        fg.linear_cross_entropy(x, w, t)


def test_public_names():
    assert fg.linear_cross_entropy is lce_mod.linear_cross_entropy
    assert "linear_cross_entropy" in fg.__all__ and "LinearCrossEntropyLoss" in fg.__all__


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU model of host synchronisation (see "
                    "tests/test_no_host_sync.py); on CUDA the CE suite uses the sync debug mode")
@pytest.mark.parametrize("reduction, divisor", [("mean", None), ("none", None),
                                                ("sum", "tensor")])
def test_no_host_sync(reduction, divisor):
    from test_no_host_sync import run_watched

    x, w, b, t = make(10, 8, 30, bias=True)
    cw = torch.rand(30) + 0.5
    d = torch.tensor(7.0) if divisor == "tensor" else None
    xg, wg, bg = (v.clone().requires_grad_(True) for v in (x, w, b))
    go = torch.randn(10) if reduction == "none" else torch.tensor(1.5)

    def body():
        loss = fg.linear_cross_entropy(xg, wg, t, linear_bias=bg, weight=cw,
                                       reduction=reduction, divisor=d, chunk_size=4)
        loss.backward(go)

    run_watched(body, xg, wg, bg, t, cw, go, *([d] if d is not None else []))
    assert torch.isfinite(wg.grad).all()


def test_autocast_matches_torch():
    # Under autocast torch runs F.linear in the autocast dtype and cross_entropy in fp32;
    # so does the fused op: bf16 matrix products, fp32 loss, fp32 parameter gradients.
    x, w, b, t = make(12, 8, 40, bias=True)
    ins = [v.clone().requires_grad_(True) for v in (x, w, b)]
    refs = [v.clone().requires_grad_(True) for v in (x, w, b)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fg.linear_cross_entropy(ins[0], ins[1], t, linear_bias=ins[2], chunk_size=5)
        ref = F.cross_entropy(F.linear(refs[0], refs[1], refs[2]), t)
    assert loss.dtype == ref.dtype == torch.float32
    loss.backward()
    ref.backward()
    assert_close(loss, ref, torch.bfloat16, "loss")
    for a, c in zip(ins, refs, strict=True):
        assert a.grad.dtype == torch.float32
        assert_close(a.grad, c.grad, torch.bfloat16, "grad")


def test_weight_grad_accumulation_fallbacks(monkeypatch):
    # The CUDA chain (fused fp32-output addmm, then mm + add, then upcast) on CPU, where
    # the first two raise (no CPU kernel for out_dtype): the first way that works is used
    # and remembered, and the result is the fp32 product either way.
    monkeypatch.setattr(lce_mod, "_dw_modes", lambda device_type: lce_mod._DW_MODES_CUDA)
    monkeypatch.setattr(lce_mod, "_DW_MODE", {})
    g = torch.randn(5, 7).to(torch.bfloat16)
    x = torch.randn(5, 3).to(torch.bfloat16)
    acc = torch.ones(7, 3)
    for _ in range(2):
        lce_mod._accumulate_weight_grad(acc, g, x)
    ref = 1 + 2 * (g.double().t() @ x.double())
    assert_close(acc, ref, torch.float32, "dW")
    assert list(lce_mod._DW_MODE.values()) in (["addmm_fp32_out"], ["mm_fp32_then_add"],
                                               ["upcast"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    # No rows: torch's results (mean NaN, sum 0, none empty) and zero gradients.
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = fg.linear_cross_entropy(x, w, t, reduction=reduction)
    ref = F.cross_entropy(F.linear(x.detach(), w.detach()), t, reduction=reduction)
    assert loss.shape == ref.shape
    assert torch.equal(loss.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(loss), torch.nan_to_num(ref))
    loss.sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))
