"""Synthetic records (real cases, made-up times) for testing the report, table and plots
without a GPU: ``python -c "import bench.synthetic"`` needs no CUDA."""

from . import batch_norm, cross_entropy, e2e
from .common import (
    COMPILE,
    COMPILE_MAX,
    FUSED,
    FUSED_INPLACE,
    LIGER,
    TORCH,
    add_speedups,
    new_record,
    skipped,
)

COPY_GBPS = 3000.0
META = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27", "torch": "2.11.0",
        "triton": "3.6.0", "cuda": "13.0", "driver": "580.159.04", "liger_kernel": None,
        "git_commit": "abc1234", "command": "python -m bench --quick", "copy_gbps": COPY_GBPS}
# Made-up speeds relative to torch eager (time = torch time / factor).
FACTOR = {FUSED: 2.0, FUSED_INPLACE: 2.5, TORCH: 1.0, COMPILE: 1.25, COMPILE_MAX: 1.3,
          LIGER: 1.6}


def _timed(case, impl, torch_ms, min_bytes):
    ms = torch_ms / FACTOR[impl]
    rec = new_record(case, impl, ms=ms, bytes=min_bytes or None, bytes_model="minimal",
                     peak_mem_bytes=(3 if impl == TORCH else 2) * 2**30,
                     peak_extra_bytes=2**30, input_sets=1,
                     graph_ms=0.9 * ms if case.family == "cross_entropy" else None)
    if min_bytes:
        rec["gbps"] = min_bytes / (ms * 1e-3) / 1e9
        rec["pct_copy_bw"] = 100 * rec["gbps"] / COPY_GBPS
    return rec


def synthetic_records() -> list[dict]:
    """Two cross-entropy sizes, two BatchNorm shapes, the LM-head step; Liger missing."""
    ce = [c for c in cross_entropy.cases()
          if c.name in ("ce bf16 8192x128256 fwd+bwd", "ce bf16 4096x32000 fwd+bwd")]
    bn = [c for c in batch_norm.cases()
          if c.name in ("bn bf16 cl 64x64x56x56 fwd+bwd", "bn bf16 cl 64x128x28x28 fwd+bwd")]
    lm = e2e.cases()[0]
    records = []
    for case in ce + bn + [lm]:
        if case.family == "cross_entropy":
            min_bytes = cross_entropy.minimal_bytes(case.shape["rows"], case.shape["vocab"],
                                                    case.dtype, case.mode)
        elif case.family == "batch_norm":
            min_bytes = batch_norm.minimal_bytes(tuple(case.shape[k] for k in "NCHW"),
                                                 case.dtype, case.mode)
        else:
            min_bytes = 0
        torch_ms = case.size / 1e8
        for impl in case.impls:
            if impl == LIGER:
                records.append(skipped(case, impl, "Liger-Kernel not importable",
                                       status="unavailable"))
            else:
                records.append(_timed(case, impl, torch_ms, min_bytes))
    add_speedups(records)
    return records
