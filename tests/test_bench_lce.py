"""The fused linear + cross-entropy benchmark (bench/linear_cross_entropy.py), its planner
(bench/plan_lce.py) and a CPU dry run of every implementation's step."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

# bench/ is a folder of the repository (run as `python -m bench`), not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import linear_cross_entropy as lce_bench  # noqa: E402
from bench import plan_lce  # noqa: E402
from bench.common import COMPILE, FUSED, LIGER, TORCH, TORCH_LCE, Context  # noqa: E402


def test_cases():
    big, quick, llama = lce_bench.cases()
    assert big.shape == {"tokens": 8192, "hidden": 4096, "vocab": 128256} and not big.quick
    assert quick.quick and quick.shape["tokens"] < big.shape["tokens"]
    for c in (big, quick):
        assert c.dtype == "bf16" and c.mode == "fwd+bwd"
        assert set(c.impls) == {FUSED, TORCH, COMPILE, TORCH_LCE, LIGER}
    assert llama.family == "e2e" and set(llama.impls) == {FUSED, TORCH}


def test_plan_memory_model():
    p = plan_lce.plan(8192, 4096, 128256, "bf16")
    assert p["chunk_rows"] == 256 and p["n_chunks"] == 32
    assert p["chunk_logits"] == 256 * 128256 * 2 <= 8192 * 4096 * 2
    assert p["weight_grad_fp32"] == 128256 * 4096 * 4
    assert p["logits_and_grad_unfused"] == 2 * 8192 * 128256 * 2
    assert plan_lce.plan(64, 8, 100, "fp32")["weight_grad_fp32"] == 0  # accumulates in place
    text = plan_lce.describe(type("A", (), {"shape": ["8192x4096x128256"], "dtype": ["bf16"]}))
    assert "32 of 256 rows" in text and "V*H*4" in text
    with pytest.raises(ValueError, match="TOKENSxHIDDENxVOCAB"):
        plan_lce.parse_shape("8192x128256")


def _fake_measure(make_inputs, step, set_bytes, leaves=lambda s: (), rep_ms=0):
    s = make_inputs()
    for _ in range(2):  # a second call must work on what the first left behind
        step(s)
        for t in leaves(s):
            assert t.grad is not None and torch.isfinite(t.grad.float()).all()
            t.grad = None
    return {"ms": 1.0, "peak_mem_bytes": 0, "peak_extra_bytes": 0, "input_sets": 1}


def test_dry_run_on_cpu():
    # Every implementation's step on tiny CPU shapes (kernels through the interpreter);
    # torch.compile is left out (C++ compilation on CPU takes minutes).
    if torch.cuda.is_available():
        pytest.skip("the dry run is for machines without CUDA (with CUDA, run the bench)")
    case = dataclasses.replace(lce_bench.cases()[1],
                               shape={"tokens": 6, "hidden": 8, "vocab": 40})
    ctx = Context(impls={FUSED, TORCH, TORCH_LCE, LIGER}, copy_gbps=1000.0, device="cpu",
                  measure=_fake_measure)
    records = {r["impl"]: r for r in case.run(case, ctx)}
    assert set(records) == {FUSED, TORCH, TORCH_LCE, LIGER}
    for impl in (FUSED, TORCH):
        assert records[impl]["status"] == "ok", records[impl]["reason"]
        assert records[impl]["tflops"] > 0
    for impl in (TORCH_LCE, LIGER):  # optional peers: measured, or said why not
        assert records[impl]["status"] in ("ok", "unavailable"), records[impl]["reason"]


def test_llama_step_dry_run_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the dry run is for machines without CUDA (with CUDA, run the bench)")
    shape = dict(lce_bench.cases()[2].shape, batch=1, seq=6, hidden_size=16,
                 intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=48)
    case = dataclasses.replace(lce_bench.cases()[2], shape=shape)
    ctx = Context(impls={FUSED, TORCH}, copy_gbps=1000.0, device="cpu", measure=_fake_measure)
    records = case.run(case, ctx)
    try:
        import transformers  # noqa: F401
    except ImportError:
        assert {r["status"] for r in records} == {"unavailable"}
        return
    assert [(r["impl"], r["status"]) for r in records] == [(FUSED, "ok"), (TORCH, "ok")], \
        [r["reason"] for r in records]
