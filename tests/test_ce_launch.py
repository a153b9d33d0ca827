"""Launch heuristics and offline compilation of the cross-entropy kernels (ops/_ce_launch.py)."""

import pytest
import torch

import fusedgrad as fg
from fusedgrad import _ce_launch as launch

from ce_reference import reference_with_grad
from helpers import DEVICE, assert_close
from static_recorded import recorded_reports


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prob", [False, True])
def test_block_choice_covers_row(dtype, prob):
    key = (dtype == torch.float64, prob)
    for n in (1, 127, 128, 129, 1024, 1025, launch.MAX_SINGLE_BLOCK_V[key],
              launch.MAX_SINGLE_BLOCK_V[key] + 1, 256000):
        block, single = launch.fused_block_v(n, dtype, prob)
        assert block & (block - 1) == 0
        assert single == (n <= launch.MAX_SINGLE_BLOCK_V[key])
        if single:
            assert block >= n


def test_needs_large_offsets():
    # Meta tensors: sizes without memory.
    assert not launch.needs_large_offsets(torch.empty(4096, 32000, device="meta"))
    assert launch.needs_large_offsets(torch.empty(70000, 32000, device="meta"))
    # A transposed view: the class stride times the vocabulary passes 2^31.
    assert launch.needs_large_offsets(torch.empty(300000, 8192, device="meta").t())
    assert not launch.needs_large_offsets(torch.empty(0, 10, device="meta"))


def test_int64_offset_path(monkeypatch):
    # Tensors past 2^31 elements do not fit this machine; force the int64 variant.
    monkeypatch.setattr(launch, "needs_large_offsets", lambda *t: True)
    x = torch.randn(5, 3000, device=DEVICE).t().contiguous().t()  # class stride 5
    t = torch.randint(0, 3000, (5,), device=DEVICE)
    xg = x.clone().requires_grad_(True)
    loss = fg.cross_entropy(xg, t, reduction="none")
    go = torch.rand(5, device=DEVICE) + 0.5
    loss.backward(go)
    ref_loss, ref_grad = reference_with_grad(x, t, grad_output=go, reduction="none")
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")


def test_every_recorded_configuration_compiles_for_sm90_without_spills():
    # Every (kernel, constexprs, options) the cross-entropy launchers chose over the
    # recorded grid of real calls (bench/launch_capture.py: vocabularies across every
    # block-size switch, dtypes, features, int64 offsets, vocab-parallel), compiled offline.
    from bench import launch_capture

    reports = recorded_reports((launch_capture._ce_calls, launch_capture._vocab_parallel_calls))
    problems = [f"{r['name']} {r['constexprs']}: {p}" for r in reports for p in r["problems"]]
    assert not problems, "\n".join(problems)
    kernels = {r["kernel"] for r in reports}
    assert {"cross_entropy_fwd_bwd_kernel", "cross_entropy_split_kernel", "scale_grad_kernel",
            "cross_entropy_shard_stats_kernel", "cross_entropy_shard_grad_kernel"} <= kernels
    # Hot loads of single-block rows are 16 bytes wide (each was recorded with an aligned
    # vocabulary: 1024, 2048, ... 16384).
    fused = [r for r in reports if r["kernel"] == "cross_entropy_fwd_bwd_kernel"
             and r["constexprs"]["SINGLE_BLOCK"] and r["constexprs"]["BLOCK_V"] > 128]
    assert fused and all(r["widest_load_bits"] == 128 for r in fused), [
        (r["name"], r["constexprs"], r["widest_load_bits"]) for r in fused
        if r["widest_load_bits"] != 128]
