"""bench/static.py, bench/static_check.py and bench/launch_capture.py: configurations from
recorded launcher calls, verdicts, and one real offline compile."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# bench/ is a folder of the repository (run as `python -m bench`), not an installed package.
sys.path.insert(0, str(REPO))

from bench import launch_capture, static, static_check  # noqa: E402


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


def test_failing_grid_call_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(static, "collect_configs", lambda: ([], ["ce V=7: RuntimeError: x"]))
    assert static.main(archs=(90,)) == 1
    out = capsys.readouterr().out
    assert "GRID CALL FAILED ce V=7" in out and "FAILED" in out.splitlines()[-1]


@pytest.fixture(scope="module")
def ce_records():
    # The cross-entropy part of the grid, recorded in this (interpreter) process.
    import fusedgrad as fg  # noqa: F401  (the launchers the grid calls)

    old = launch_capture.CALL_SOURCES
    launch_capture.CALL_SOURCES = (launch_capture._ce_calls,)
    try:
        records, errors = launch_capture.collect()
    finally:
        launch_capture.CALL_SOURCES = old
    assert not errors, errors
    return records


def test_grid_reaches_every_block_choice_of_the_ce_launcher(ce_records):
    # Every (BLOCK_V, SINGLE_BLOCK) the launcher's heuristic gives for the grid's vocabularies
    # was really launched, with and without int64 offsets.
    import torch

    from fusedgrad import _ce_launch as launch

    launched = {(kw.get("BLOCK_V"), kw.get("SINGLE_BLOCK"), kw.get("LARGE_OFFSETS"))
                for mod, name, _, kw in ce_records if name == "cross_entropy_fwd_bwd_kernel"}
    for dtype in (torch.float32, torch.float64):
        for vocab in launch_capture.CE_VOCABS:
            block_v, single = launch.fused_block_v(vocab, dtype, False)
            if not single and hasattr(launch, "choose_path"):
                continue  # long rows may take another kernel (the split-row path)
            for large in (False, True):
                assert (block_v, single, large) in launched, (dtype, vocab, large)
    names = {name for _, name, _, _ in ce_records}
    assert {"ce_prep_kernel", "ce_finish_kernel", "scale_grad_kernel"} <= names


def test_recorded_launches_become_typed_configs(ce_records):
    # Triton's own specialisation types the arguments: no parameter list is restated.
    # (Needs the real JIT functions: run in a child process without the interpreter.)
    import pickle

    code = textwrap.dedent("""
        import pickle, sys
        from bench import static_check
        configs = static_check.configs_from_records(pickle.load(sys.stdin.buffer))
        prep = [c for c in configs if c.fn.__name__ == "ce_prep_kernel"]
        c = prep[0]
        assert c.signature["target_ptr"] in ("*i64", "*i32", "*u8"), c.signature
        assert c.signature["BLOCK"] == "constexpr" and dict(c.options)["debug"] is True
        assert "reduce_ptr" in c.aligned and c.num_stages >= 1
        print(len(configs), len(prep))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         input=pickle.dumps(ce_records), timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    n_configs, n_prep = map(int, res.stdout.split())
    assert n_prep >= 4 and n_configs > n_prep  # divisor modes, weights; the other kernels


TOY = textwrap.dedent("""
    import sys
    from bench import cli, static

    def toy_configs():
        from fusedgrad.kernels import _probe
        from bench.static_check import KernelConfig
        return [KernelConfig(name="probe", fn=_probe.probe_kernel,
                             signature={"out_ptr": "*fp32"}, constexprs={}, num_warps=1,
                             aligned=("out_ptr",))]

    real_main = static.main
    static.main = lambda archs, workers: real_main(archs, workers, configs=toy_configs())
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
