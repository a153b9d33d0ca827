"""bench/static.py: collecting launcher configs, verdicts, and one real offline compile."""

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/ is a folder of the repository (run as `python -m bench`), not an installed package.
sys.path.insert(0, str(REPO))

from bench import static  # noqa: E402
from fusedgrad import static_check  # noqa: E402


def _report(**kw):
    base = dict(name="k", arch=90, num_warps=4, registers=32, spill_stores=0, spill_loads=0,
                local_bytes=0, shared_bytes=0, widest_load_bits=128)
    base.update(kw)
    return static_check.CompileReport(**base)


def _cfg(name="k"):
    return static_check.KernelConfig(name=name, fn=None, signature={}, constexprs={"BLOCK": 64},
                                     num_warps=4)


def test_verdicts_fail_on_spills_shared_and_compile_errors():
    results = [
        (_cfg("clean"), _report(), ""),
        (_cfg("spills"), _report(spill_stores=8, spill_loads=8, local_bytes=16), ""),
        (_cfg("smem"), _report(shared_bytes=static_check.SHARED_LIMIT_BYTES[90] + 1), ""),
        (_cfg("broken"), None, "CompilationError: boom"),
    ]
    rows, failures = static.report_rows(results, 90)
    assert failures == 3
    verdicts = {r[0]: r[-1] for r in rows}
    assert verdicts["clean"] == "ok"
    assert verdicts["spills"].startswith("spills")
    assert "shared memory" in verdicts["smem"]
    assert verdicts["broken"].startswith("COMPILE ERROR")
    clean = next(r for r in rows if r[0] == "clean")
    assert clean[2] == "warps=4 stages=1 BLOCK=64"
    assert clean[7] == "16 B"  # 128-bit loads
    table = static.format_rows(rows)
    assert table.splitlines()[0].split()[:3] == ["kernel", "sm", "configuration"]


def test_missing_or_incomplete_launchers_are_reported_not_fatal(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fusedgrad._bench_test_noconfigs",
                        types.ModuleType("fusedgrad._bench_test_noconfigs"))
    rc = static.main(archs=(90,), modules=("_bench_test_absent", "_bench_test_noconfigs"))
    out = capsys.readouterr().out
    assert rc == 0
    assert "_bench_test_absent: not available (module not present" in out
    assert "_bench_test_noconfigs: not available (has no static_configs())" in out
    assert "no kernel configurations to compile" in out


def test_broken_launcher_fails_the_run(monkeypatch, capsys):
    mod = types.ModuleType("fusedgrad._bench_test_broken")

    def static_configs():
        raise RuntimeError("bad heuristic table")

    mod.static_configs = static_configs
    monkeypatch.setitem(sys.modules, "fusedgrad._bench_test_broken", mod)
    rc = static.main(archs=(90,), modules=("_bench_test_broken",))
    assert rc == 1
    assert "bad heuristic table" in capsys.readouterr().out


TOY = textwrap.dedent("""
    import sys, types
    from bench import cli, static

    def toy_configs():
        from fusedgrad.kernels import _probe
        from fusedgrad.static_check import KernelConfig
        return [KernelConfig(name="probe", fn=_probe.probe_kernel,
                             signature={"out_ptr": "*fp32"}, constexprs={}, num_warps=1,
                             aligned=("out_ptr",))]

    mod = types.ModuleType("fusedgrad._bench_toy_launch")
    mod.static_configs = toy_configs
    sys.modules["fusedgrad._bench_toy_launch"] = mod
    real_main = static.main
    static.main = lambda archs, workers: real_main(archs, workers, modules=("_bench_toy_launch",))
    sys.exit(cli.main(["static", "--arch", "90", "80"]))
""")


def test_static_command_compiles_for_sm90_and_sm80_with_interpreter_set():
    # TRITON_INTERPRET=1 in the environment (as under the test suite): `bench static` must
    # turn it off before triton is imported, or nothing could be compiled for a GPU.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", TOY], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("probe ")]
    assert [ln.split()[1] for ln in lines] == ["90", "80"]
    assert all(ln.rstrip().endswith("ok") for ln in lines)
    assert "2 compilations (1 configurations x sm_90/sm_80), 0 problem(s)" in res.stdout
