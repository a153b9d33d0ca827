"""fusedgrad.cross_entropy (ops/cross_entropy.py) against a float64 reference.

Every case draws fresh random logits (never zeros), poisons every buffer the op
allocates (conftest), and compares loss and gradient by ||out-ref||/||ref||
with the per-dtype tolerance table in helpers.py.
"""

import pytest
import torch
import torch.nn.functional as F

import fusedgrad as fg
from fusedgrad import _ce_launch

from ce_reference import reference_cross_entropy, reference_with_grad
from helpers import DEVICE, assert_close

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


def make_targets(shape, n_classes, ignore_frac=0.2, ignore_index=-100):
    t = torch.randint(0, n_classes, shape)
    if ignore_frac:
        t[torch.rand(shape) < ignore_frac] = ignore_index
    return t.to(DEVICE)


def make_probs(shape, class_dim=1):
    return torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, dim=class_dim)


def _dense(t):
    """Whether t's elements tile its storage span exactly (a permutation of a contiguous
    layout): then a fresh tensor can have the same strides."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True)
                                       if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout_on_a_leaf(x):
    """(leaf, view): a fresh leaf laid out like x's base (x itself if x is no view), and the
    view of it that x is of its base, reached through one differentiable copy (so
    inplace_backward may overwrite it). The op then sees the caller's strides; a clone of a
    sliced tensor would be contiguous. (leaf, view region) let check() prove the gradient
    lands inside the view and nowhere else."""
    base = x._base if x._base is not None else x
    if not _dense(base):  # e.g. an expanded base: keep x's values
        leaf = x.detach().clone().requires_grad_(True)
        return leaf, leaf * 1, (x.shape, leaf.stride(), 0)
    leaf = torch.empty_strided(base.shape, base.stride(), dtype=base.dtype, device=base.device)
    leaf.copy_(base.detach())
    leaf.requires_grad_(True)
    src = torch.empty_strided(base.shape, base.stride(), dtype=base.dtype, device=base.device)
    src = src.copy_(leaf)  # differentiable: the gradient reaches the leaf
    region = (x.shape, x.stride(), x.storage_offset() - base.storage_offset())
    return leaf, src.as_strided(*region), region


def check(x, target, *, grad_output=None, dtype=None, elementwise=True, **kwargs):
    """Loss and gradient of fusedgrad vs the float64 reference (norm-wise and element-wise).

    x is passed as the layout it has (a slice of a wider buffer stays one); the gradient
    is checked inside that view and must be exactly 0 elsewhere in the buffer."""
    dtype = dtype or x.dtype
    leaf, xg, region = _same_layout_on_a_leaf(x)
    loss = fg.cross_entropy(xg, target, **kwargs)
    assert loss.dtype == x.dtype
    go = torch.ones_like(loss) if grad_output is None else grad_output
    (leaf_grad,) = torch.autograd.grad(loss, leaf, go)
    grad = leaf_grad.as_strided(*region)
    inside = torch.zeros_like(leaf, dtype=torch.bool)
    inside.as_strided(*region).fill_(True)
    outside = leaf_grad.detach()[~inside]
    assert torch.equal(outside, torch.zeros_like(outside)), "gradient written outside the view"
    # torch takes int64 (or uint8) class indices only; fusedgrad takes any integer dtype.
    ref_target = target if target.is_floating_point() or target.dtype == torch.uint8 \
        else target.long()
    ref_loss, ref_grad = reference_with_grad(x, ref_target, grad_output=go, **kwargs)
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, dtype, "loss", elementwise=elementwise)
    assert_close(grad, ref_grad, dtype, "grad", elementwise=elementwise)
    return loss, grad


# Vocabulary sizes: 1-3 (degenerate rows), primes and 2^k +- 1 around every block-size
# switch of the launcher (128 -> 1024-wide block, single block -> two-pass loop at
# MAX_SINGLE_BLOCK_V), and one large vocabulary (>= 131072, two-pass).
VOCABS = [1, 2, 3, 17, 127, 128, 129, 1023, 1025, 4099,
          _ce_launch.MAX_SINGLE_BLOCK_V[(False, False)],
          _ce_launch.MAX_SINGLE_BLOCK_V[(False, False)] + 1, 40961]


@pytest.mark.parametrize("n_classes", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_sizes(n_classes, dtype):
    x = make_logits((6, n_classes), dtype)
    check(x, make_targets((6,), n_classes))


@pytest.mark.compat
def test_large_vocab_two_pass():
    # >= 131072 classes: the two-pass path with many chunks; few rows to keep it fast.
    n_classes = 131075
    x = make_logits((3, n_classes), torch.bfloat16)
    t = torch.tensor([5, n_classes - 1, 70000], device=DEVICE)
    check(x, t, label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("n_rows", [1, 2, 97])  # one row, two, many (odd)
@pytest.mark.compat
def test_row_counts(n_rows):
    x = make_logits((n_rows, 300), torch.float32)
    check(x, make_targets((n_rows,), 300, ignore_frac=0.1))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n_classes", [1000, 5000])  # single block; two-pass for fp64 (>4096)
def test_dtypes(dtype, n_classes):
    x = make_logits((9, n_classes), dtype)
    w = torch.rand(n_classes, device=DEVICE) + 0.1
    check(x, make_targets((9,), n_classes), weight=w.to(dtype), label_smoothing=0.05)


FEATURES = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.3},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 4.0},
    "all": {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 10.0},
    "ignore_index=3": {"ignore_index": 3},
}


def _kwargs(name, n_classes, dtype):
    kw = dict(FEATURES[name])
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(n_classes, device=DEVICE) + 0.1).to(dtype)
    return kw


# 257: single block; 16385: first width of the two-pass path.
@pytest.mark.parametrize("n_classes", [257, 16385])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_index_targets(feature, reduction, n_classes):
    kw = _kwargs(feature, n_classes, torch.float32)
    ignore_index = kw.get("ignore_index", -100)
    x = make_logits((5, n_classes), torch.float32)
    t = make_targets((5,), n_classes, ignore_index=ignore_index)
    t[0] = ignore_index  # at least one ignored row
    check(x, t, reduction=reduction, **kw)


@pytest.mark.parametrize("n_classes", [257, 8193])  # single block; two-pass for probabilities
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("feature", ["plain", "weight", "smoothing", "all"])
def test_features_probability_targets(feature, reduction, n_classes):
    kw = _kwargs(feature, n_classes, torch.float32)
    x = make_logits((4, n_classes), torch.float32)
    y = make_probs((4, n_classes)).to(torch.float32).to(DEVICE)
    check(x, y, reduction=reduction, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_softcap_padding(dtype):
    # Padded lanes must stay masked after the cap (cap(-inf) would be -c, not -inf).
    x = make_logits((4, 130), dtype, scale=20.0)
    # Norm-wise only: at |z| >> c the cap's derivative 1 - tanh^2 cancels in fp32, so
    # single elements carry large relative errors (as in any fp32 implementation).
    check(x, make_targets((4,), 130), softcap=5.0, z_loss=1e-4, elementwise=False)


# ---------------------------------------------------------------- shapes and layouts

@pytest.mark.parametrize("shape", [(7,), (1, 7), (3, 11, 5), (2, 13, 3, 4), (2, 5, 2, 3, 2)])
def test_shapes_index_targets(shape):
    # (C,), (N, C) and (N, C, d1..dk): the class axis is dim 1 and strided.
    x = make_logits(shape, torch.float32)
    n_classes = shape[1] if len(shape) > 1 else shape[0]
    tshape = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    t = make_targets(tshape, n_classes, ignore_frac=0.2 if tshape else 0.0)
    for reduction in ("mean", "sum", "none"):
        check(x, t, reduction=reduction, weight=torch.rand(n_classes, device=DEVICE),
              label_smoothing=0.1)


@pytest.mark.parametrize("shape", [(9,), (3, 9), (2, 9, 4, 3)])
@pytest.mark.compat
def test_shapes_probability_targets(shape):
    x = make_logits(shape, torch.float32)
    y = make_probs(shape, class_dim=1 if len(shape) > 1 else 0).float().to(DEVICE)
    for reduction in ("mean", "sum", "none"):
        check(x, y, reduction=reduction, label_smoothing=0.1)


def test_row_slice_of_wider_buffer():
    # Rows with a stride wider than the vocabulary (a slice of a bigger buffer).
    wide = make_logits((6, 700), torch.float32)
    x = wide[:, 50:650]
    assert not x.is_contiguous()
    check(x, make_targets((6,), 600))


def test_transposed_logits():
    # (C, N) storage viewed as (N, C): class stride N, row stride 1.
    x = make_logits((300, 8), torch.float32).t()
    check(x, make_targets((8,), 300))


def test_channels_last_logits():
    x = make_logits((2, 19, 3, 5), torch.float32).to(memory_format=torch.channels_last)
    check(x, make_targets((2, 3, 5), 19))


def test_unmergeable_spatial_dims():
    # Spatial dims transposed: cannot be one row index; the op copies (documented).
    x = make_logits((2, 6, 4, 5), torch.float32).transpose(2, 3)
    check(x, make_targets((2, 5, 4), 6))


def test_no_hidden_copy_of_strided_logits():
    # The launcher's row view must alias the logits for slices and transposes.
    for x in (make_logits((6, 700), torch.float32)[:, 50:650],
              make_logits((300, 8), torch.float32).t(),
              make_logits((2, 19, 3, 5), torch.float32)):
        assert _ce_launch.rows_view(x, class_dim=True).data_ptr() == x.data_ptr()


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.uint8])
def test_integer_target_dtypes(target_dtype):
    x = make_logits((5, 40), torch.float32)
    t = make_targets((5,), 40, ignore_frac=0.0).to(target_dtype)
    check(x, t)


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_empty_batch(reduction, prob):
    x = make_logits((0, 10), torch.float32).requires_grad_(True)
    t = make_probs((0, 10)).float().to(DEVICE) if prob else make_targets((0,), 10)
    loss = fg.cross_entropy(x, t, reduction=reduction)
    ref = F.cross_entropy(x.detach().double(), t.double() if prob else t, reduction=reduction)
    assert loss.shape == ref.shape
    assert torch.equal(torch.isnan(loss.cpu()), torch.isnan(ref.cpu()))
    if reduction != "none":
        loss.backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_mean_is_nan(weighted):
    x = make_logits((4, 10), torch.float32).requires_grad_(True)
    t = torch.full((4,), -100, device=DEVICE)
    w = torch.rand(10, device=DEVICE) if weighted else None
    loss = fg.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    ref = F.cross_entropy(x.detach().double(), t, weight=w.double() if weighted else None,
                          label_smoothing=0.1)
    assert torch.isnan(loss) and torch.isnan(ref)
    loss.backward()
    # torch gives zero gradient for ignored rows even when the mean divides by 0.
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_extreme_logits_stay_finite():
    x = make_logits((4, 100), torch.float32)
    x[0, 3] = 1e4
    x[1] = -1e4
    check(x, make_targets((4,), 100, ignore_frac=0.0), z_loss=1e-6)


# A masked vocabulary (-inf logits) and an inf class weight: torch computes plain NLL
# without smoothing, so the loss stays finite; the smoothing terms must be exactly absent.
@pytest.mark.parametrize("n_classes", [300, 20000])  # single block; two-pass
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_vocabulary_without_smoothing(n_classes, reduction):
    x = make_logits((4, n_classes), torch.float32)
    x[:, 7] = float("-inf")
    x[1, 100:200] = float("-inf")
    t = make_targets((4,), n_classes, ignore_frac=0.0)
    t[t == 7] = 8
    t[1] = 5
    check(x, t, reduction=reduction, z_loss=1e-4)


def test_infinite_weight_of_a_class_never_targeted():
    x = make_logits((4, 6), torch.float32)
    w = torch.rand(6, device=DEVICE) + 0.5
    w[5] = float("inf")
    t = torch.tensor([0, 1, 2, 3], device=DEVICE)
    check(x, t, weight=w, reduction="sum")


def test_deterministic():
    x = make_logits((33, 5000), torch.bfloat16).requires_grad_(True)
    t = make_targets((33,), 5000)
    runs = []
    for _ in range(2):
        x.grad = None
        loss = fg.cross_entropy(x, t, label_smoothing=0.1)
        loss.backward()
        runs.append((loss.detach().clone(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_loss_only_without_grad():
    x = make_logits((5, 50), torch.float32)
    t = make_targets((5,), 50)
    with torch.no_grad():
        loss = fg.cross_entropy(x, t, z_loss=1e-3)
    assert_close(loss, reference_cross_entropy(x, t, z_loss=1e-3), torch.float32, "loss")
