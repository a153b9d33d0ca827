"""The benchmark matrix the issue asks for, the bytes models and the input rotation."""

import sys
from pathlib import Path

import pytest
import torch

# bench/ is a folder of the repository (run as `python -m bench`), not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import batch_norm, cross_entropy, e2e  # noqa: E402
from bench.common import COMPILE, COMPILE_MAX, FUSED, FUSED_INPLACE, LIGER, TORCH  # noqa: E402
from bench.timing import input_sets_needed  # noqa: E402


def test_cross_entropy_matrix():
    cases = cross_entropy.cases()
    assert len({c.name for c in cases}) == len(cases)
    plain = [c for c in cases if c.shape["reduction"] == "mean" and c.shape["grad_output"] == 1
             and c.mode != "bwd"]
    # Backward only (--mode bwd): bf16, 8192 rows, the three LM vocabularies.
    assert {(c.dtype, c.shape["rows"], c.shape["vocab"]) for c in cases if c.mode == "bwd"} \
        == {("bf16", 8192, v) for v in (32000, 128256, 256000)}
    grid = {(c.dtype, c.shape["rows"], c.shape["vocab"], c.mode) for c in plain}
    assert grid == {(d, n, v, m) for d in ("bf16", "fp32") for n in (4096, 8192, 16384)
                    for v in (32000, 50257, 128256, 151936, 256000) for m in ("fwd", "fwd+bwd")} \
        | {("bf16", n, 256000, m) for n in (64, 512) for m in ("fwd", "fwd+bwd")}  # few rows
    variants = {(c.name, c.shape["reduction"], c.shape["grad_output"]) for c in cases
                if c.mode != "bwd"} - {(c.name, "mean", 1.0) for c in plain}
    assert variants == {("ce bf16 8192x128256 fwd+bwd go2", "mean", 2.0),
                        ("ce bf16 8192x128256 fwd+bwd none", "none", None)}
    for c in cases:
        # inplace_backward only changes the backward, so it is timed with it only.
        assert (FUSED_INPLACE in c.impls) == (c.mode == "fwd+bwd")
        assert {FUSED, TORCH, COMPILE, LIGER} <= set(c.impls)
        # the autotuned compile peer everywhere but in --quick (its compile time)
        assert (COMPILE_MAX in c.impls) == (not c.quick)


def test_batch_norm_matrix():
    cases = [c for c in batch_norm.cases() if c.name.startswith("bn ")]
    assert len({c.name for c in cases}) == len(cases)
    shapes = {tuple(c.shape[k] for k in "NCHW") for c in cases}
    for n in (64, 256):
        for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7), (2048, 7)):
            assert (n, c, hw, hw) in shapes
    assert {(16, 3, 512, 512), (8, 32, 256, 256)} <= shapes
    assert {(c.dtype, c.layout, c.mode) for c in cases} == {
        (d, lay, m) for d in ("fp32", "bf16", "fp16") for lay in ("contiguous", "channels_last")
        for m in ("fwd", "fwd+bwd")}


def test_batch_norm_epilogue_matrix():
    cases = [c for c in batch_norm.cases() if not c.name.startswith("bn ")]
    assert len({c.name for c in cases}) == len(cases)
    assert {(c.name.split()[0], c.dtype, c.layout, c.shape["N"], c.shape["C"]) for c in cases} == {
        (op, d, lay, n, ch) for op in ("bn+relu", "bn+add+relu")
        for d, lay in (("bf16", "channels_last"), ("fp16", "channels_last"), ("fp32", "contiguous"))
        for n in (64, 256) for ch in (64, 128, 256, 512, 2048)}
    shape = (64, 64, 56, 56)
    m = 64 * 64 * 56 * 56 * 2
    per_channel = 64 * batch_norm.PER_CHANNEL_BYTES
    assert batch_norm.epilogue_minimal_bytes(shape, "bf16", False) == 5 * m + per_channel
    assert batch_norm.epilogue_minimal_bytes(shape, "bf16", True) == 7 * m + per_channel


def test_e2e_steps():
    lm, rn, bottleneck, *timm_cases = e2e.cases()
    assert lm.shape == {"tokens": 8192, "hidden": 2048, "vocab": 128256} and lm.dtype == "bf16"
    assert rn.layout == "channels_last" and rn.dtype == "bf16"
    assert bottleneck.shape == {"N": 64, "C": 256, "mid": 64, "H": 56, "W": 56}
    # timm's resnet50 and efficientnet_b0, bf16 autocast and fp16 (cuDNN in torch) rows.
    assert {(c.shape["model"], c.dtype) for c in timm_cases} == {
        (m, d) for m in ("resnet50", "efficientnet_b0") for d in ("bf16", "fp16")}
    assert all(c.layout == "channels_last" and c.shape["H"] == 224 for c in timm_cases)


# Around the launcher's single-block limit (16384 classes: one read either side only if the
# long-row path is the one-read split path) and the LLM vocabularies.
@pytest.mark.parametrize("vocab", [16384, 16385, 32000, 256000])
def test_cross_entropy_bytes(vocab):
    from bench import plan_ce

    n, e = 8192, 2
    logits = n * vocab * e
    small = n * 8 + 4
    assert cross_entropy.minimal_bytes(n, vocab, "bf16", "fwd+bwd") == 2 * logits + small
    assert cross_entropy.minimal_bytes(n, vocab, "bf16", "fwd") == logits + small
    # fusedgrad's own model is the launcher's plan (tests/test_bench_plan_ce.py checks the
    # plan against what the launcher really launches).
    plan = plan_ce.launcher_plan(n, vocab, "bf16", "fwd+bwd")
    assert plan.bytes_per_logit_fwd_bwd == {"single": 2, "split": 2, "two_pass": 3}[plan.path]
    rows = 2 * n * plan_ce.TARGET_BYTES + 3 * n * plan_ce.LOSS_BYTES
    assert cross_entropy.fused_kernel_bytes(n, vocab, "bf16", "fwd+bwd") == \
        plan.hbm_bytes(e) + rows
    assert plan.hbm_bytes(e) >= plan.bytes_per_logit_fwd_bwd * logits  # + kernel scratch
    fwd = plan_ce.launcher_plan(n, vocab, "bf16", "fwd")
    assert fwd.bytes_per_logit_fwd_bwd == 1
    assert cross_entropy.fused_kernel_bytes(n, vocab, "bf16", "fwd") == fwd.hbm_bytes(e) + rows


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


@pytest.mark.parametrize("set_bytes,expected", [(0, 1), (2**20, 64), (10 * 2**20, 20),
                                                (100 * 2**20, 2), (2**33, 1)])
def test_rotation_count(set_bytes, expected):
    # Enough distinct input sets to rotate through 4x a 50 MiB L2, at most 64.
    assert input_sets_needed(set_bytes, 50 * 2**20) == expected


# --- dry run: every benchmark's code path on tiny CPU shapes -----------------------------
# Timing needs CUDA, but building inputs, the step functions (forward, backward, inplace,
# convert_batchnorm, autocast) and the record plumbing do not: run them on CPU tensors
# (kernels through the interpreter) with a stand-in for the timer. torch.compile is left
# out: on CPU it would build C++ kernels for minutes.
TINY = {
    "ce bf16 8192x128256 fwd+bwd": {"rows": 3, "vocab": 37},
    "ce fp32 4096x32000 fwd": {"rows": 2, "vocab": 50},
    "ce bf16 64x256000 fwd+bwd": {"rows": 2, "vocab": 70},
    "ce bf16 8192x128256 fwd+bwd go2": {"rows": 3, "vocab": 37},
    "ce bf16 8192x128256 fwd+bwd none": {"rows": 3, "vocab": 37},
    "bn bf16 cl 64x64x56x56 fwd+bwd": {"N": 2, "C": 3, "H": 4, "W": 3},
    "bn fp16 contig 16x3x512x512 fwd": {"N": 2, "C": 3, "H": 3, "W": 2},
    "e2e lm_head bf16 8192x2048->128256 step": {"tokens": 3, "hidden": 8, "vocab": 40},
    "e2e resnet_block bf16 cl 64x64x56x56 step": {"N": 1, "C": 4, "H": 4, "W": 4},
    "e2e bottleneck bf16 cl 64x256x56x56 step": {"N": 2, "C": 4, "mid": 2, "H": 3, "W": 3},
    "bn+relu fp16 cl 64x64x56x56 fwd+bwd": {"N": 2, "C": 3, "H": 3, "W": 2},
    "bn+add+relu fp32 contig 256x2048x7x7 fwd+bwd": {"N": 2, "C": 3, "H": 2, "W": 3},
}


def _fake_measure(make_inputs, step, set_bytes, leaves=lambda s: (), rep_ms=0, graph=False):
    s = make_inputs()
    for _ in range(3 if graph else 2):  # a second call must work on what the first left
        step(s)
        for t in leaves(s):
            assert t.grad is not None and torch.isfinite(t.grad.float()).all()
            t.grad = None
    out = {"ms": 1.0, "peak_mem_bytes": 0, "peak_extra_bytes": 0, "input_sets": 1}
    if graph:  # capture needs CUDA; the step it would capture ran once more above
        out["graph_ms"] = 0.5
    return out


@pytest.mark.parametrize("name", list(TINY))
def test_dry_run_on_cpu(name):
    import dataclasses

    from bench.cli import all_cases
    from bench.common import Context, add_speedups

    if torch.cuda.is_available():
        pytest.skip("the dry run is for machines without CUDA (with CUDA, run the bench)")
    case = next(c for c in all_cases() if c.name == name)
    case = dataclasses.replace(case, shape={**case.shape, **TINY[name]})
    ctx = Context(impls={FUSED, FUSED_INPLACE, TORCH, LIGER}, copy_gbps=1000.0, device="cpu",
                  measure=_fake_measure)
    records = case.run(case, ctx)
    add_speedups(records)
    assert {r["impl"] for r in records} == set(case.impls) - {COMPILE, COMPILE_MAX}
    for r in records:
        if r["impl"] == LIGER and r["status"] == "unavailable":
            continue  # optional peer, not installed here
        assert r["status"] == "ok", (r["impl"], r["reason"])
        assert r["ms"] == 1.0
        if case.family == "cross_entropy":
            assert r["graph_ms"] == 0.5
    fused = next(r for r in records if r["impl"] == FUSED)
    assert fused["speedup"][TORCH] == 1.0
