"""bench/report.py on synthetic records: JSON writer, terminal table, markdown summary."""

import json
import math
import sys
from pathlib import Path

import pytest

# bench/ is a folder of the repository (run as `python -m bench`), not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.common import COMPILE, FUSED, FUSED_INPLACE, LIGER, TORCH, add_speedups  # noqa: E402
from bench.synthetic import COPY_GBPS, FACTOR, META, synthetic_records  # noqa: E402


def test_speedups_are_peer_time_over_fused_time():
    records = synthetic_records()
    fused = [r for r in records if r["impl"] == FUSED]
    assert fused
    for r in fused:
        assert r["speedup"][TORCH] == pytest.approx(FACTOR[FUSED] / FACTOR[TORCH])
        assert r["speedup"][COMPILE] == pytest.approx(FACTOR[FUSED] / FACTOR[COMPILE])
        # Liger was unavailable: no speed-up against it rather than a made-up one.
        assert LIGER not in r["speedup"]
    for r in records:
        if r["impl"] in (TORCH, COMPILE, LIGER):
            assert r["speedup"] == {}


def test_speedup_ignores_failed_peers():
    records = synthetic_records()
    case = records[0]["case"]
    for r in records:
        if r["case"] == case and r["impl"] == TORCH:
            r.update(status="oom", ms=None)
    add_speedups(records)
    fused = next(r for r in records if r["case"] == case and r["impl"] == FUSED)
    assert TORCH not in fused["speedup"] and COMPILE in fused["speedup"]


def test_json_round_trip(tmp_path):
    records = synthetic_records()
    path = report.write_json(tmp_path / "sub" / "gpu-2026-11-27.json", META, records)
    meta, back = report.read_json(path)
    assert meta == META
    assert back == json.loads(json.dumps(records))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    raw = json.loads(path.read_text())
    assert raw["schema"] == report.SCHEMA


def test_json_refuses_nan(tmp_path):
    # A NaN time is a broken measurement: the writer must not turn it into invalid JSON.
    records = synthetic_records()
    records[0]["ms"] = math.nan
    with pytest.raises(ValueError):
        report.write_json(tmp_path / "x.json", META, records)


def test_read_json_rejects_other_schema(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"schema": 0, "meta": {}, "records": []}))
    with pytest.raises(ValueError, match="schema"):
        report.read_json(p)


def test_results_stem_is_filesystem_safe():
    assert report.results_stem("NVIDIA H100 80GB HBM3", "2026-11-27") == \
        "nvidia-h100-80gb-hbm3-2026-11-27"


def test_table_has_every_record_once():
    records = synthetic_records()
    text = report.format_table(records)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["case", "impl", "ms"]
    body = [ln for ln in lines[2:] if ln.strip()]
    assert len(body) == len(records)
    # Each case's name is printed once, on its first line.
    for case in {r["case"] for r in records}:
        assert sum(ln.startswith(case) for ln in body) == 1
    assert "unavailable: Liger-Kernel not importable" in text
    assert "2.00x" in text  # fusedgrad vs torch


def test_markdown_summary():
    records = synthetic_records()
    md = report.markdown_summary(META, records)
    assert md.startswith("# fusedgrad benchmark: NVIDIA H100 80GB HBM3, 2026-11-27")
    assert f"{COPY_GBPS:,.0f} GB/s" in md
    headline = md.split("## Headline")[1].split("\n## ")[0]
    # Headline: the preferred cases present in the run plus the end-to-end steps.
    assert "ce bf16 8192x128256 fwd+bwd" in headline
    assert "bn bf16 cl 64x64x56x56 fwd+bwd" in headline
    assert "e2e lm_head" in headline
    assert "ce bf16 4096x32000 fwd+bwd" not in headline
    for title in ("## Cross-entropy", "## BatchNorm (training)", "## End-to-end training steps"):
        assert title in md
    # The fused column shows the faster variant (inplace, marked with a dagger) and its
    # speed-up against torch eager.
    ce_row = next(ln for ln in headline.splitlines() if "8192x128256" in ln)
    assert "†" in ce_row
    assert f"{FACTOR[FUSED_INPLACE]:.2f}x" in ce_row
    # Missing peers are summarised once per reason, not once per case.
    not_measured = md.split("## Not measured")[1]
    assert not_measured.count("liger: unavailable") == 1
    assert "3 cases" in not_measured


def test_markdown_of_filtered_run_uses_first_case_per_family():
    records = [r for r in synthetic_records() if r["case"] == "ce bf16 4096x32000 fwd+bwd"]
    headline = report.markdown_summary(META, records).split("## Headline")[1]
    assert "ce bf16 4096x32000 fwd+bwd" in headline


def test_write_markdown(tmp_path):
    p = report.write_markdown(tmp_path / "s.md", META, synthetic_records())
    assert p.read_text().startswith("# fusedgrad benchmark")


def test_markdown_marks_partial_runs():
    md = report.markdown_summary(dict(META, complete=False), synthetic_records())
    assert "**Partial run**" in md
    assert "**Partial run**" not in report.markdown_summary(dict(META, complete=True),
                                                            synthetic_records())
