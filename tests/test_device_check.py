"""bench/device_check.sh on a machine without CUDA (as CI is): the dry run must stop at once
with a clear message (never run the interpreter suite and report green), and ``--list``
must show the GPU selection the lease will spend its time on, within the 9-minute budget."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="the device check is a bash script using coreutils' timeout")


def _env(tmp_path):
    # A fake compute-sanitizer first on PATH (as a CI image might have one): the dry run
    # must not reach it. It leaves a marker if it is ever called.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "compute-sanitizer"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'sanitizer-called'}\nexit 0\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run models a machine without CUDA")
def test_dry_run_without_cuda_exits_quickly(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "deadbee"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert "NO CUDA" in proc.stdout
    summary = (out / "summary.txt").read_text()
    assert "commit deadbee" in summary and "NO CUDA" in summary
    assert not (tmp_path / "sanitizer-called").exists()
    assert not (out / "tests.log").exists()  # no interpreter suite run in its place


def test_list_shows_the_planned_selection(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--list"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    worst = int(re.search(r"worst case: (\d+) s", text).group(1))
    assert worst <= 540
    passes = dict(re.findall(r"^pass (\w+): python -m bench (.*)$", text, re.M))
    assert set(passes) == {"ce", "compile", "bn"}
    ce_block = text.split("pass ce:")[1].split("pass compile:")[0]
    for vocab in (32000, 128256, 256000):
        for mode in ("fwd+bwd", "fwd", "bwd"):
            assert re.search(rf"^\s+ce bf16 8192x{vocab} {re.escape(mode)}\s", ce_block, re.M), \
                (vocab, mode)
    assert "--impl fusedgrad inplace torch liger" in passes["ce"]
    assert "--impl compile" in passes["compile"]
    assert "memcheck: bench smoke, then" in text
    for probe in ("correct", "host", "big", "ncu", "2^31"):
        assert probe in text


def test_render_and_summary_from_returned_json(tmp_path, capsys):
    # What a lease returns is turned into markdown (the README's headline table) and the
    # printed summary offline, from the JSON alone.
    sys.path.insert(0, str(ROOT))
    from bench import device_probes, report
    from bench.synthetic import META, synthetic_records

    records = synthetic_records()
    half = len(records) // 2
    report.write_json(tmp_path / "bench-ce.json", META, records[:half])
    report.write_json(tmp_path / "bench-compile.json", META, records[half:])
    (tmp_path / "probe-host.json").write_text(
        '{"probe": "host", "results": [{"name": "host ce", "ok": true, "host_us": 40.0}]}')
    out = tmp_path / "md"
    assert device_probes.main(["render", str(tmp_path / "bench-ce.json"),
                               str(tmp_path / "bench-compile.json"), "--out", str(out),
                               "--combined", "run"]) == 0
    md = (out / "run.md").read_text()
    assert "## Headline" in md
    assert device_probes.main(["summary", str(tmp_path), "--merge",
                               str(tmp_path / "probes.json")]) == 0
    printed = capsys.readouterr().out
    assert "bench-ce.json" in printed and "host ce" in printed
    assert '"host_us": 40.0' in (tmp_path / "probes.json").read_text()
