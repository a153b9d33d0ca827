"""The benchmark matrix the issue asks for, the bytes models and the input rotation."""

import sys
from pathlib import Path

import pytest

# bench/ is a folder of the repository (run as `python -m bench`), not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import batch_norm, cross_entropy, e2e  # noqa: E402
from bench.common import COMPILE, FUSED, FUSED_INPLACE, LIGER, TORCH  # noqa: E402
from bench.timing import input_sets_needed  # noqa: E402


def test_cross_entropy_matrix():
    cases = cross_entropy.cases()
    assert len({c.name for c in cases}) == len(cases)
    grid = {(c.dtype, c.shape["rows"], c.shape["vocab"], c.mode) for c in cases}
    assert grid == {(d, n, v, m) for d in ("bf16", "fp32") for n in (4096, 8192, 16384)
                    for v in (32000, 50257, 128256, 151936, 256000) for m in ("fwd", "fwd+bwd")}
    for c in cases:
        # inplace_backward only changes the backward, so it is timed with it only.
        assert (FUSED_INPLACE in c.impls) == (c.mode == "fwd+bwd")
        assert {FUSED, TORCH, COMPILE, LIGER} <= set(c.impls)


def test_batch_norm_matrix():
    cases = batch_norm.cases()
    assert len({c.name for c in cases}) == len(cases)
    shapes = {tuple(c.shape[k] for k in "NCHW") for c in cases}
    for n in (64, 256):
        for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7), (2048, 7)):
            assert (n, c, hw, hw) in shapes
    assert {(16, 3, 512, 512), (8, 32, 256, 256)} <= shapes
    assert {(c.dtype, c.layout, c.mode) for c in cases} == {
        (d, lay, m) for d in ("fp32", "bf16", "fp16") for lay in ("contiguous", "channels_last")
        for m in ("fwd", "fwd+bwd")}


def test_e2e_steps():
    lm, rn = e2e.cases()
    assert lm.shape == {"tokens": 8192, "hidden": 2048, "vocab": 128256} and lm.dtype == "bf16"
    assert rn.layout == "channels_last" and rn.dtype == "bf16"


@pytest.mark.parametrize("vocab", [32000, 256000])  # on either side of the single-block limit
def test_cross_entropy_bytes(vocab):
    n, e = 8192, 2
    logits = n * vocab * e
    small = n * 8 + 4
    assert cross_entropy.minimal_bytes(n, vocab, "bf16", "fwd+bwd") == 2 * logits + small
    assert cross_entropy.minimal_bytes(n, vocab, "bf16", "fwd") == logits + small
    reads = 1 if vocab <= cross_entropy.CE_SINGLE_BLOCK_MAX_V else 2
    assert cross_entropy.fused_kernel_bytes(n, vocab, "bf16", "fwd+bwd") == \
        (reads + 1) * logits + small
    assert cross_entropy.fused_kernel_bytes(n, vocab, "bf16", "fwd") == logits + small


def test_batch_norm_bytes():
    shape = (64, 256, 14, 14)
    m = 64 * 256 * 14 * 14 * 4
    per_channel = 256 * batch_norm.PER_CHANNEL_BYTES
    # fwd: read x, write y; bwd: read x and dy, write dx.
    assert batch_norm.minimal_bytes(shape, "fp32", "fwd") == 2 * m + per_channel
    assert batch_norm.minimal_bytes(shape, "fp32", "fwd+bwd") == 5 * m + per_channel
    # fused: x read twice in the forward; x and dy read twice in the backward.
    assert batch_norm.fused_kernel_bytes(shape, "fp32", "fwd") == 3 * m + per_channel
    assert batch_norm.fused_kernel_bytes(shape, "fp32", "fwd+bwd") == 8 * m + per_channel


@pytest.mark.parametrize("set_bytes,expected", [(0, 1), (10 * 2**20, 8), (100 * 2**20, 2),
                                                (2**33, 1)])
def test_rotation_count(set_bytes, expected):
    # Enough distinct input sets to rotate through 4x a 50 MiB L2, at most 8.
    assert input_sets_needed(set_bytes, 50 * 2**20) == expected
