"""Dry run of the timm model steps of bench/e2e.py on CPU (extras): timm's tiny test models
stand in for resnet50 / efficientnet_b0 (same code path: build, convert_batchnorm with its
report, autocast step, cross-entropy, backward into every parameter)."""

import dataclasses

import pytest
import torch
from test_bench_cases import _fake_measure  # also puts the repository root on sys.path

from bench import e2e  # noqa: E402
from bench.common import COMPILE, FUSED, TORCH, Context  # noqa: E402

from extras import require

# The stand-ins: timm's test_resnet (15 BatchNorm2d) and test_efficientnet (13 BatchNormAct2d).
STAND_INS = {"resnet50": "test_resnet", "efficientnet_b0": "test_efficientnet"}


@pytest.mark.extras
@pytest.mark.parametrize("model", list(STAND_INS))
def test_timm_step_dry_run(model):
    require("timm")
    if torch.cuda.is_available():
        pytest.skip("the dry run is for machines without CUDA (with CUDA, run the bench)")
    case = next(c for c in e2e.cases() if c.name.startswith(f"e2e timm {model} bf16"))
    case = dataclasses.replace(case, shape={"model": STAND_INS[model], "N": 2, "H": 32,
                                            "W": 32})
    ctx = Context(impls={FUSED, TORCH}, copy_gbps=1000.0, device="cpu", measure=_fake_measure)
    records = case.run(case, ctx)
    assert {r["impl"] for r in records} == set(case.impls) - {COMPILE}
    for r in records:
        assert r["status"] == "ok", (r["impl"], r["reason"])


def test_timm_step_without_timm(monkeypatch):
    # Without the models extra every implementation reports why, instead of failing the run.
    monkeypatch.setattr(e2e, "timm_model", lambda name: (None, "timm not importable (test)"))
    case = next(c for c in e2e.cases() if c.name.startswith("e2e timm resnet50 fp16"))
    ctx = Context(impls={FUSED, TORCH, COMPILE}, copy_gbps=1000.0, device="cpu",
                  measure=_fake_measure)
    records = case.run(case, ctx)
    assert [r["status"] for r in records] == ["unavailable"] * 3
    assert all("timm not importable" in r["reason"] for r in records)
