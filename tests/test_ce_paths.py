"""The long-row paths of fusedgrad.cross_entropy (ops/_ce_launch.py choose_path):
"split" (each row split over co-resident programs that exchange partials: one read
and one write per logit) and "two_pass" (streaming statistics, then the gradient),
against the float64 reference, each other, and themselves.

Under the interpreter programs run one after another, so in the split kernel a row's
early members never find their partners' partials (they recompute them from global
memory: the fallback) and its last member finds them all (the exchange); both run in
every split test. Small chunk widths (SPLIT_CHUNK / LOOP_BLOCK_V patched) give several
members per row at small vocabularies; the pretend device holds few programs, so the
persistent loop over rows runs too.
"""

import pytest
import torch

import fusedgrad as fg
from fusedgrad import _ce_launch as launch

from ce_reference import reference_with_grad
from helpers import DEVICE, assert_close

# "two_pass" runs the split kernel's SOLO variant on rows it covers; "two_pass_stream" the
# streaming fused kernel (what rows past the split kernel's reach take).
LONG_PATHS = ["split", "two_pass", "two_pass_stream"]


def use_path(monkeypatch, path, chunk=1024, capacity=6):
    """Force ``path`` with ``chunk`` classes per chunk; the pretend GPU holds ``capacity``
    split-row programs (fewer groups than rows: the persistent row loop runs)."""
    if path == "two_pass_stream":
        monkeypatch.setattr(launch, "TWO_PASS_SOLO", False)
        path = "two_pass"
    monkeypatch.setattr(launch, "FORCE_PATH", path)
    monkeypatch.setattr(launch, "SPLIT_CHUNK", {k: chunk for k in launch.SPLIT_CHUNK})
    monkeypatch.setattr(launch, "LOOP_BLOCK_V", {k: chunk for k in launch.LOOP_BLOCK_V})
    monkeypatch.setattr(launch, "INTERPRET_SPLIT_CAPACITY", capacity)


def run(x, target, grad_output=None, **kw):
    xg = x.detach().clone().requires_grad_(True)
    loss = fg.cross_entropy(xg, target, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, xg, go)
    return loss.detach(), grad


def check(x, target, dtype=torch.float32, **kw):
    loss, grad = run(x, target, **kw)
    ref_loss, ref_grad = reference_with_grad(x, target, **kw)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")
    return loss, grad


def logits(shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape) * scale).to(dtype).to(DEVICE)


def targets(n_rows, n_classes, ignore_index=-100):
    t = torch.randint(0, n_classes, (n_rows,))
    t[1] = ignore_index  # one ignored row
    return t.to(DEVICE)


FEATURES = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight+smoothing+z_loss+softcap": {"weight": True, "label_smoothing": 0.2,
                                        "z_loss": 1e-3, "softcap": 10.0},
    "ignore_index=3,sum": {"ignore_index": 3, "reduction": "sum"},
    "none": {"reduction": "none", "z_loss": 1e-2},
}


def _kw(name, n_classes):
    kw = dict(FEATURES[name])
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(n_classes, device=DEVICE) + 0.1
    return kw


# 2500 classes at 1024 per chunk: three members per row, the last one partial.
@pytest.mark.parametrize("path", LONG_PATHS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_index_targets(monkeypatch, path, feature):
    use_path(monkeypatch, path)
    kw = _kw(feature, 2500)
    check(logits((5, 2500)), targets(5, 2500, kw.get("ignore_index", -100)), **kw)


@pytest.mark.parametrize("path", LONG_PATHS)
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "weight": True, "z_loss": 1e-3}],
                         ids=["plain", "all"])
def test_probability_targets(monkeypatch, path, kw):
    use_path(monkeypatch, path)
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(2500, device=DEVICE) + 0.1
    y = torch.softmax(torch.randn(4, 2500) * 2, dim=1).to(DEVICE)
    check(logits((4, 2500)), y, **kw)


@pytest.mark.compat
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_split_dtypes(monkeypatch, dtype):
    use_path(monkeypatch, "split")
    check(logits((4, 2100), dtype), targets(4, 2100), dtype=dtype, label_smoothing=0.05)


@pytest.mark.parametrize("path", LONG_PATHS)
def test_strided_and_spatial_rows(monkeypatch, path):
    use_path(monkeypatch, path)
    wide = logits((4, 2600))
    check(wide[:, 50:2550], targets(4, 2500))  # rows of a wider buffer
    check(logits((2100, 3)).t(), targets(3, 2100))  # transposed: class stride 3
    x = logits((2, 2100, 3))  # (N, C, d): the class axis strided, rows (n, d)
    t = torch.randint(0, 2100, (2, 3), device=DEVICE)
    check(x, t, label_smoothing=0.1)


@pytest.mark.parametrize("path", LONG_PATHS)
def test_inplace_backward(monkeypatch, path):
    use_path(monkeypatch, path)
    x = logits((4, 2500))
    t = targets(4, 2500)
    base = x.clone().requires_grad_(True)
    inp = base * 1.0
    loss = fg.cross_entropy(inp, t, inplace_backward=True, label_smoothing=0.1)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(x, t, label_smoothing=0.1)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(base.grad, ref_grad, torch.float32, "grad")


@pytest.mark.slow
def test_more_than_64_members(monkeypatch):
    # 65 members of 64 classes (the last one partial): past 64 members the split kernel's
    # partial vectors are 128 wide, the widest variant (fp32 rows past 131072 classes take
    # it: 256000 fp32 classes are 125 members of 2048). One row: under the interpreter its
    # members recompute each other's partials, ~members^2 / 2 chunk reads.
    n_classes = 64 * 64 + 37
    assert launch.split_max_chunks(torch.float32, False) > 64
    x = logits((1, n_classes))
    t = torch.randint(0, n_classes, (1,), device=DEVICE)
    results = []
    for path in ["split", "two_pass"]:  # two_pass: the split kernel's SOLO variant
        use_path(monkeypatch, path, chunk=64, capacity=65)
        results.append(check(x, t, label_smoothing=0.1))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


# NaN logits make the row's loss and gradient NaN, as in torch, wherever they sit: one
# logit, a whole chunk (the chunk's max can come out NaN, or, on the GPU, whose max ignores
# NaN, -inf or finite: the merge must not drop the chunk as empty), the masked last chunk.
# compat: NaN semantics of max differ between Triton versions (3.8's interpreter ignores
# NaN like the GPU, 3.6's propagates it).
@pytest.mark.compat
@pytest.mark.parametrize("path", LONG_PATHS)
@pytest.mark.parametrize("nan_cols", [slice(1500, 1501), slice(1024, 2048), slice(2048, None)],
                         ids=["one", "chunk", "last_chunk"])
def test_nan_logits_propagate(monkeypatch, path, nan_cols):
    use_path(monkeypatch, path)
    x = logits((2, 2500))
    x[0, nan_cols] = float("nan")
    t = torch.tensor([3, 7], device=DEVICE)
    loss, grad = run(x, t, reduction="none", label_smoothing=0.1)
    assert torch.isnan(loss[0]) and torch.isnan(grad[0]).all()
    ref_loss, ref_grad = reference_with_grad(x[1:], t[1:], reduction="none",
                                             label_smoothing=0.1)
    assert_close(loss[1:], ref_loss, torch.float32, "loss")  # the other row is untouched
    assert_close(grad[1:], ref_grad, torch.float32, "grad")


@pytest.mark.compat
def test_reruns_bitwise_identical(monkeypatch):
    # Fixed merge orders: reruns agree bit for bit (the split kernel's sync flags were
    # reset by the kernel itself between the calls), and so do the split path and the
    # two-pass path on rows the split kernel covers (its SOLO variant: same chunks, same
    # merge tree); the streaming kernel agrees to rounding.
    x = logits((7, 3000))
    t = targets(7, 3000)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, weight=torch.rand(3000, device=DEVICE))
    results = {}
    for path in LONG_PATHS:
        use_path(monkeypatch, path, capacity=9)
        results[path] = [run(x, t, **kw) for _ in range(2)]
    for path, (a, b) in results.items():
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), path
    s, solo, p = (results[path][0] for path in LONG_PATHS)
    assert torch.equal(s[0], solo[0]) and torch.equal(s[1], solo[1])
    assert_close(s[0], p[0], torch.float32, "loss")
    assert_close(s[1], p[1], torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_and_two_pass_bitwise_probabilities(monkeypatch, dtype):
    # Probability targets with a soft-cap and a strided row (the other kernel branches):
    # the split path and the two-pass path (SOLO variant) give the same bits, 2 rows x
    # 5 chunks of 512 (probabilities take half the chunk), the last one partial.
    wide = logits((2, 2600), dtype)
    x = wide[:, :2500]
    probs = torch.softmax(torch.randn(2, 2500), dim=1).to(dtype).to(DEVICE)
    out = {}
    for path in ("split", "two_pass"):
        use_path(monkeypatch, path, capacity=6)
        out[path] = run(x, probs, softcap=20.0, reduction="sum")
    assert torch.equal(out["split"][0], out["two_pass"][0])
    assert torch.equal(out["split"][1], out["two_pass"][1])


def _direct_split(x, t, partials=None, sync=None):
    """launch_split on (N, C) logits with class-index targets, mean reduction."""
    n_rows, n_classes = x.shape
    logits3 = launch.rows_view(x, class_dim=True)
    target_v = launch.rows_view(t, class_dim=False)
    grad = torch.full_like(x, float("nan"))
    loss = torch.full((n_rows,), float("nan"), device=DEVICE)
    lse = torch.full((n_rows,), float("nan"), device=DEVICE)
    reduce_buf = torch.tensor([1.0 / n_rows, float(n_classes)], device=DEVICE)
    partials, sync = launch.launch_split(
        logits3, launch.rows_view(grad, class_dim=True), target_v, None, loss, lse,
        reduce_buf, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
        prob_target=False, write_grad=True, t_strides=(*target_v.stride(), 0),
        partials=partials, sync=sync)
    return loss, grad, partials, sync


@pytest.mark.compat  # integer atomics and the merge, on every Triton version
def test_split_exchange_and_fallback(monkeypatch):
    use_path(monkeypatch, "split", capacity=3)
    x = logits((4, 3000))
    t = torch.randint(0, 3000, (4,), device=DEVICE)
    # A normal launch: member 0 of each row recomputes partners 1 and 2 (fallback),
    # member 1 reads member 0's partial and recomputes 2, member 2 reads both.
    loss, grad, partials, sync = _direct_split(x, t)
    ref_loss, ref_grad = reference_with_grad(x, t, reduction="none")
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad / 4, torch.float32, "grad")
    assert int(sync.abs().sum()) == 0  # flags and counters left zero for the next call
    # Every member published its chunk's (max, sum exp) partial.
    chunks = x.view(4, 1, 3000).split(1024, dim=2)
    maxima = torch.stack([c.amax(dim=2).squeeze(1) for c in chunks], dim=1)
    assert torch.equal(partials[:, :, 0], maxima)
    # Exchange only: all flags raised and the published partials in place, every
    # member reads its partners' partials; bitwise the same result as recomputing them.
    flags = torch.zeros(4 * 3 + 4, dtype=torch.int32, device=DEVICE)
    flags[:12] = 1
    loss2, grad2, _, sync2 = _direct_split(x, t, partials=partials.clone(), sync=flags)
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)
    assert int(sync2.abs().sum()) == 0
    # ... and it really reads them: poisoned partials behind raised flags show up. The
    # poison is finite (max 100, sum 1): a NaN partial would also show, but through the
    # NaN handling of the merge rather than through the read. Member 0, which writes the
    # loss, runs first under the interpreter and reads its partners' poisoned slots.
    flags[:12] = 1
    poisoned = torch.zeros_like(partials)
    poisoned[:, :, 0] = 100.0
    poisoned[:, :, 1] = 1.0
    loss3, _, _, _ = _direct_split(x, t, partials=poisoned, sync=flags)
    assert ((loss3 - loss).abs() > 50).all(), (loss3, loss)


def test_choose_path_defaults():
    f32 = torch.float32
    assert launch.choose_path(8192, 8192, f32, False) == "single"
    for v in (16385, 32000, 50257, 128256, 151936, 256000):
        assert launch.choose_path(8192, v, torch.bfloat16, False) == "split", v
    assert launch.choose_path(8192, 262145, torch.bfloat16, False) == "two_pass"
    assert launch.choose_path(8192, 256000, torch.float32, False) == "split"  # 125 x 2048
    # A class axis strided so far that a chunk's offsets pass 2^31 streams instead (the
    # split kernel addresses within a chunk in 32 bits).
    assert launch.choose_path(64, 256000, torch.bfloat16, False, class_stride=2**19) \
        == "two_pass"
    assert launch.choose_path(64, 256000, torch.bfloat16, False, class_stride=2**19 - 1) \
        == "split"
    # Few rows x huge vocabulary fills the GPU: two split-row programs are resident per
    # SM, and at 64 x 256000 the grid is as large as the GPU holds in whole groups (every
    # SM busy, 252 of 264 slots); the programs loop over the rows.
    assert launch.split_programs_per_sm() >= 2
    n_chunks = launch.split_chunks(256000, torch.bfloat16, False)
    capacity = launch.split_capacity(None)
    assert capacity >= 2 * launch.MODEL_SMS
    assert capacity - n_chunks < launch.split_grid(64, n_chunks, None) <= capacity
    # The backward grid is O(#SM) however many rows and classes.
    assert launch.scale_grid(8192, 256000, None)[0] <= 8 * launch.MODEL_SMS


def test_plan_bytes_and_launches():
    for v in (32000, 128256, 256000):
        plan = launch.plan_cross_entropy(8192, v, torch.bfloat16)
        assert plan.path == "split" and plan.bytes_per_logit_fwd_bwd == 2.0
        assert plan.launches_fwd + plan.launches_bwd_go1 <= 2
        assert plan.hbm_bytes(2) < 2.01 * 8192 * v * 2
    assert launch.plan_cross_entropy(8192, 600000, torch.bfloat16).bytes_per_logit_fwd_bwd == 3.0
    assert launch.plan_cross_entropy(8192, 4096, torch.bfloat16).path == "single"


# Real vocabularies on the default path choices (interpreter: one or two rows each).
@pytest.mark.parametrize("n_classes", [
    16385,  # first width past a single block: 5 members of 4096
    32000,
    pytest.param(50257, marks=pytest.mark.slow),
    pytest.param(128256, marks=pytest.mark.slow),
    pytest.param(256000, marks=pytest.mark.slow),  # 63 members of 4096
    pytest.param(262145, marks=pytest.mark.slow),  # past the split path: two-pass
])
def test_llm_vocabularies(n_classes):
    n_rows = 2 if n_classes <= 32000 else 1
    x = logits((n_rows, n_classes), torch.bfloat16)
    t = torch.randint(0, n_classes, (n_rows,), device=DEVICE)
    check(x, t, dtype=torch.bfloat16, label_smoothing=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("n_classes", [32000, 256000])
def test_llm_vocabularies_two_pass(monkeypatch, n_classes):
    monkeypatch.setattr(launch, "FORCE_PATH", "two_pass")
    x = logits((1, n_classes), torch.bfloat16)
    t = torch.randint(0, n_classes, (1,), device=DEVICE)
    check(x, t, dtype=torch.bfloat16, z_loss=1e-4)


def test_streaming_passes_written_once():
    # The fused two-pass path and the vocab-parallel shard kernels run the same row
    # passes (one copy of the streaming code), and the op modules do not import each
    # other (the vocab-parallel op takes the shared backward from ops/_ce_grad.py).
    import ast
    import inspect

    from fusedgrad import _vocab_parallel
    from fusedgrad.kernels import cross_entropy as k

    def calls(kernel):
        tree = ast.parse(inspect.getsource(getattr(kernel, "fn", kernel)))
        return {n.func.id for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}

    assert {"_row_stats_pass", "_row_grad_pass"} <= calls(k.cross_entropy_fwd_bwd_kernel)
    assert "_row_stats_pass" in calls(k.cross_entropy_shard_stats_kernel)
    assert "_row_grad_pass" in calls(k.cross_entropy_shard_grad_kernel)
    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(_vocab_parallel)))
                if isinstance(n, ast.ImportFrom)}
    assert "cross_entropy" not in imported
