"""bench/plots.py on synthetic records: one PNG per op family with GB/s data."""

import sys
from pathlib import Path

import pytest

# bench/ is a folder of the repository (run as `python -m bench`), not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots  # noqa: E402
from bench.synthetic import COPY_GBPS, synthetic_records  # noqa: E402


def test_panels_group_by_kind_and_sort_by_size():
    data = plots.panels(synthetic_records())
    assert ("bf16", "fwd+bwd", "") in data  # cross-entropy (no layout)
    assert ("bf16", "fwd+bwd", "channels_last") in data
    for lines in data.values():
        for pts in lines.values():
            sizes = [s for s, _ in pts]
            assert sizes == sorted(sizes)
    # Unavailable implementations and GB/s-less records (e2e) draw no line.
    for lines in data.values():
        assert "liger" not in lines


@pytest.mark.skipif(plots.matplotlib_missing() is not None,
                    reason="matplotlib is not installed (the `bench`/`dev` extra)")
def test_write_plots_makes_one_png_per_family(tmp_path):
    paths, why = plots.write_plots(synthetic_records(), tmp_path, "gpu-2026-11-27", COPY_GBPS)
    assert why is None
    names = sorted(p.name for p in paths)
    # e2e records carry no GB/s, so no plot for them.
    assert names == ["gpu-2026-11-27-batch_norm.png", "gpu-2026-11-27-cross_entropy.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 10_000


def test_without_matplotlib_no_png_and_a_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    paths, why = plots.write_plots(synthetic_records(), tmp_path, "x")
    assert paths == [] and "matplotlib" in why
    assert list(tmp_path.iterdir()) == []
