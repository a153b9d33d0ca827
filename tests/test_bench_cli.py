"""bench/cli.py: selection from the command line, --list, and the no-GPU `python -m bench`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# bench/ is a folder of the repository (run as `python -m bench`), not an installed package.
sys.path.insert(0, str(REPO))

from bench import cli  # noqa: E402
from bench.common import COMPILE, LIGER, TORCH  # noqa: E402


def names(argv):
    return [c.name for c in cli.select_cases(cli.all_cases(), cli.parse_args(argv))]


def test_quick_selection():
    assert names(["--quick"]) == [
        "ce bf16 8192x128256 fwd+bwd", "ce bf16 8192x128256 fwd",
        "bn bf16 contig 16x3x512x512 fwd+bwd", "bn bf16 cl 64x64x56x56 fwd+bwd",
        "bn+relu bf16 cl 64x64x56x56 fwd+bwd", "bn+add+relu bf16 cl 64x64x56x56 fwd+bwd",
        "e2e lm_head bf16 8192x2048->128256 step", "e2e resnet_block bf16 cl 64x64x56x56 step",
        "e2e bottleneck bf16 cl 64x256x56x56 step",
        "e2e timm resnet50 bf16 cl 128x3x224x224 step",
        "e2e timm efficientnet_b0 bf16 cl 128x3x224x224 step",
        "lce bf16 4096x2048x128256 fwd+bwd",
    ]


def test_default_selects_everything():
    # CE: 60 + 4 few-row + 2 backward variants + 3 backward-only
    assert len(names([])) == len(cli.all_cases()) == 69 + 144 + 60 + 2 + 5 + 3


def test_filters_combine():
    got = names(["--op", "bn", "--dtype", "bf16", "--layout", "cl", "--shape", "x56x56",
                 "--mode", "fwd+bwd"])
    assert got == ["bn bf16 cl 64x64x56x56 fwd+bwd", "bn bf16 cl 256x64x56x56 fwd+bwd",
                   "bn+relu bf16 cl 64x64x56x56 fwd+bwd", "bn+relu bf16 cl 256x64x56x56 fwd+bwd",
                   "bn+add+relu bf16 cl 64x64x56x56 fwd+bwd",
                   "bn+add+relu bf16 cl 256x64x56x56 fwd+bwd"]


def test_comma_and_space_separated_lists_agree():
    assert names(["--op", "ce,e2e", "--dtype", "fp32"]) == names(["--op", "ce", "e2e",
                                                                  "--dtype", "fp32"])
    assert all(n.startswith("ce fp32") for n in names(["--op", "ce", "--dtype", "fp32"]))


def test_impl_filter_keeps_cases_that_have_it():
    got = cli.select_cases(cli.all_cases(), cli.parse_args(["--impl", "liger"]))
    assert got and all(LIGER in c.impls for c in got)
    assert {c.family for c in got} == {"cross_entropy", "e2e", "linear_cross_entropy"}
    assert cli.parse_args(["--impl", "eager,compile"]).impl == {TORCH, COMPILE}


@pytest.mark.parametrize("argv", [["--dtype", "fp8"], ["--op", "softmax"], ["--impl", "apex"],
                                  ["--mode", "back"], ["bogus"]])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_list_prints_selection_without_a_gpu(capsys):
    assert cli.main(["--list", "--quick", "--op", "ce"]) == 0
    out = capsys.readouterr().out
    assert "ce bf16 8192x128256 fwd+bwd" in out and out.rstrip().endswith("2 case(s)")


def test_list_with_empty_selection_fails(capsys):
    assert cli.main(["--list", "--op", "ce", "--dtype", "fp16"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="with CUDA `python -m bench` runs the real benchmarks")
def test_python_m_bench_without_gpu_runs_the_smoke():
    # The static report is exercised in test_bench_static.py (it takes a minute on the real
    # configurations), so it is left out here.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "bench", "--no-static"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "timings need a CUDA device" in out
    assert "Triton's interpreter (TRITON_INTERPRET=1)" in out
    summary = next(ln for ln in res.stdout.splitlines() if ln.startswith("smoke: ") and
                   "passed" in ln)
    assert " 0 failed" in summary and " 0 not available" in summary


def test_run_writes_json_markdown_plots_and_table(tmp_path, monkeypatch, capsys):
    # The CUDA run's output path, on CPU: tiny shapes, kernels through the interpreter,
    # a stand-in timer, and the device facts replaced by fixed ones.
    import dataclasses

    from bench import plots, report, timing
    from bench.synthetic import META

    if torch.cuda.is_available():
        pytest.skip("with CUDA, `python -m bench` itself exercises this path")
    monkeypatch.setattr(report, "environment", lambda: dict(META))
    monkeypatch.setattr(timing, "copy_bandwidth_gbps",
                        lambda: {"gbps": 1000.0, "bytes": 2**30, "ms": 1.0})
    tiny = {"ce bf16 8192x128256 fwd+bwd": {"rows": 3, "vocab": 37},
            "bn bf16 cl 64x64x56x56 fwd+bwd": {"N": 2, "C": 3, "H": 4, "W": 3}}
    cases = [dataclasses.replace(c, shape=tiny[c.name], size=100 * (i + 1))
             for i, c in enumerate(cli.all_cases()) if c.name in tiny]
    args = cli.parse_args(["--impl", "fusedgrad,inplace,torch", "--out", str(tmp_path),
                           "--plain"])
    times = iter([1.0, 0.5, 2.0, 0.8, 1.6] * 4)

    def fake_measure(make_inputs, step, set_bytes, leaves=lambda s: (), rep_ms=0, graph=False):
        step(make_inputs())
        return {"ms": next(times), "peak_mem_bytes": 2**20, "peak_extra_bytes": 0,
                "input_sets": 1}

    assert cli.run_benchmarks(args, cases, device="cpu", measure=fake_measure) == 0
    out = capsys.readouterr().out
    stem = report.results_stem(META["device"], META["date"])
    meta, records = report.read_json(tmp_path / f"{stem}.json")
    assert meta["complete"] is True and meta["copy_gbps"] == 1000.0
    assert [(r["case"], r["impl"], r["status"]) for r in records] == [
        ("ce bf16 8192x128256 fwd+bwd", "fusedgrad", "ok"),
        ("ce bf16 8192x128256 fwd+bwd", "fusedgrad (inplace)", "ok"),
        ("ce bf16 8192x128256 fwd+bwd", "torch", "ok"),
        ("bn bf16 cl 64x64x56x56 fwd+bwd", "fusedgrad", "ok"),
        ("bn bf16 cl 64x64x56x56 fwd+bwd", "torch", "ok"),
    ]
    assert records[0]["speedup"] == {"torch": 2.0}
    assert records[3]["speedup"] == {"torch": 2.0}  # 1.6 ms / 0.8 ms
    assert (tmp_path / f"{stem}.md").read_text().startswith("# fusedgrad benchmark")
    assert "ce bf16 8192x128256 fwd+bwd" in out and "2.00x" in out
    if plots.matplotlib_missing() is None:
        assert (tmp_path / f"{stem}-cross_entropy.png").exists()
        assert (tmp_path / f"{stem}-batch_norm.png").exists()
