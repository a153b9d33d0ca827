"""``python -m bench plan --op ce`` (bench/plan_ce.py): the plan it prints is what the
launchers really launch, so the benchmark's bytes model (which uses it) cannot drift."""

import sys
from pathlib import Path

import pytest
import torch

import fusedgrad as fg

from helpers import DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import host, plan_ce  # noqa: E402
from bench.cli import parse_args  # noqa: E402

CUDA_ONLY_OPTIONS = ("launch_cooperative_grid", "maxnreg")


def _launched(n_rows, n_classes, dtype, mode):
    x = torch.randn(n_rows, n_classes, device=DEVICE).to(dtype)
    t = torch.randint(0, n_classes, (n_rows,), device=DEVICE)
    with host.stubbed_launches(record=True) as counter:
        if mode == "fwd+bwd":
            x.requires_grad_(True)
            fg.cross_entropy(x, t).backward()
        else:
            fg.cross_entropy(x, t)
    return counter.calls


# Vocabularies on both sides of every path switch of the launcher and the LLM ones; the
# launches are stubbed, so large rows cost only their allocation.
@pytest.mark.parametrize("n_classes", [100, 16384, 16385, 32000, 128256])
@pytest.mark.parametrize("mode", ["fwd+bwd", "fwd"])
def test_plan_is_what_the_launchers_launch(n_classes, mode):
    n_rows = 4
    plan = plan_ce.call_plan(n_rows, n_classes, "bf16", mode, device=torch.device(DEVICE))
    lp = plan.launcher
    expected = ([plan.host_kernels[0]] + lp.kernels[:lp.launches_fwd] + plan.host_kernels[1:]
                + lp.kernels[lp.launches_fwd:][:plan.launches_bwd])
    calls = _launched(n_rows, n_classes, torch.bfloat16, mode)
    assert [fn.__name__ for fn, *_ in calls] == [name for name, _, _ in expected]
    assert len(calls) == plan.launches_fwd + plan.launches_bwd
    for (_fn, grid, _, kwargs), (name, planned_grid, consts) in zip(calls, expected,
                                                                   strict=True):
        assert tuple(grid) == tuple(planned_grid), name
        for key, value in consts.items():
            if key in CUDA_ONLY_OPTIONS and DEVICE != "cuda":
                continue  # launch options the launchers pass on CUDA only
            assert kwargs.get(key) == value, (name, key, kwargs.get(key), value)


def test_describe_prints_every_asked_shape():
    args = parse_args(["plan", "--op", "ce", "--dtype", "bf16", "--shape", "8192x128256",
                       "ce fp32 4096x32000 fwd"])
    text = plan_ce.describe(args)
    assert "ce bf16 8192x128256 fwd+bwd" in text and "ce fp32 4096x32000 fwd" in text
    assert "launches: forward 3" in text and "HBM per logit" in text


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="NxV"):
        plan_ce.parse_shape("8192*128256", ["bf16"], ["fwd+bwd"])
