"""``python -m bench static``: compile every launcher configuration without a GPU.

The configurations come from real calls: bench/launch_capture.py runs the public ops over
a grid of shapes, dtypes, layouts and features (on CPU tensors, Triton's launches stubbed
and recorded) and bench/static_check.py types each recorded launch with Triton's own
argument specialisation; one compilation per launcher choice (kernel, constexprs, pointer
dtypes, num_warps, num_stages, other options). For each and each target (sm_90 and sm_80
by default) this prints registers, spills, local memory, shared memory and the widest
global load read from the PTX (16 B = vectorised hot loads).

Exit status: 1 on any spill/local memory, shared memory over the architecture's limit,
a compile error, or a call of the grid that raised; 0 otherwise. Must run with Triton's
interpreter OFF (``bench/__main__`` removes TRITON_INTERPRET for this command); the
recording runs in a child process with it on.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (90, 80)
COMPILE_WORKERS = 2  # CI machines have 2 cores
REPO = Path(__file__).resolve().parent.parent


def record_launches() -> tuple[list, list[str]]:
    """(records, errors) of bench/launch_capture.py, run in a child process with Triton's
    interpreter on (the grid's CPU tensors need it)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "launches.pkl"
        res = subprocess.run([sys.executable, "-m", "bench.launch_capture", str(out)],
                             cwd=REPO, env=env, capture_output=True, text=True)
        if res.returncode != 0 or not out.exists():
            tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
            return [], [f"recording launches failed (exit {res.returncode}): "
                        + " | ".join(tail)]
        data = pickle.loads(out.read_bytes())
    return data["records"], data["errors"]


def collect_configs() -> tuple[list, list[str]]:
    """(configs, errors): one KernelConfig per launcher choice among the recorded launches."""
    from . import static_check

    records, errors = record_launches()
    try:
        configs = static_check.configs_from_records(records)
    except Exception as exc:  # noqa: BLE001 - reported, fails the run
        return [], errors + [f"typing the recorded launches failed: {type(exc).__name__}: "
                             f"{exc}"]
    return configs, errors


def compile_reports(configs: list, arch: int, workers: int = COMPILE_WORKERS):
    """[(config, CompileReport | None, error text)] for every config, in order.

    Compiles in parallel with ``static_check.compile_all``; if any compilation fails,
    compiles again one by one to say which configurations failed and why.
    """
    from . import static_check

    try:
        reports = static_check.compile_all(configs, arch, workers=workers)
        return [(c, r, "") for c, r in zip(configs, reports, strict=True)]
    except Exception:  # noqa: BLE001 - find the failing ones below
        pass
    out = []
    for c in configs:
        try:
            out.append((c, static_check.compile_config(c, arch), ""))
        except Exception as exc:  # noqa: BLE001
            msg = str(exc).strip().splitlines()
            out.append((c, None, f"{type(exc).__name__}: {msg[-1] if msg else ''}"[:300]))
    return out


def config_text(cfg) -> str:
    consts = " ".join(f"{k}={v}" for k, v in cfg.constexprs.items())
    extra = " ".join(f"{k}={v}" for k, v in getattr(cfg, "options", ())
                     if k == "maxnreg" or (k == "debug" and v))
    return f"warps={cfg.num_warps} stages={cfg.num_stages} {extra} {consts}".replace(
        "  ", " ").strip()


HEADER = ("kernel", "sm", "configuration", "regs", "spill B", "local B", "smem B",
          "widest load", "verdict")


def report_rows(results: list, arch: int) -> tuple[list[tuple], int]:
    rows, failures = [], 0
    for cfg, rep, err in results:
        if rep is None:
            failures += 1
            rows.append((cfg.name, arch, config_text(cfg), "-", "-", "-", "-", "-",
                         f"COMPILE ERROR {err}"))
            continue
        problems = rep.problems()
        failures += bool(problems)
        rows.append((cfg.name, arch, config_text(cfg), rep.registers, rep.spills,
                     rep.local_bytes, rep.shared_bytes, f"{rep.widest_load_bits // 8} B",
                     "; ".join(problems) if problems else "ok"))
    return rows, failures


def format_rows(rows: list[tuple]) -> str:
    rows = [HEADER] + rows
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(archs=ARCHS, workers: int = COMPILE_WORKERS, configs=None) -> int:
    """configs: compile these instead of the recorded launches (tests)."""
    t0 = time.time()
    errors = []
    if configs is None:
        configs, errors = collect_configs()
        print(f"static: {len(configs)} configurations from the launchers' recorded calls "
              f"({time.time() - t0:.1f} s)")
    for err in errors:
        print(f"static: GRID CALL FAILED {err}")
    failures = len(errors)
    if not configs:
        print("static: no kernel configurations to compile")
    else:
        all_rows = []
        for arch in archs:
            rows, bad = report_rows(compile_reports(configs, arch, workers), arch)
            all_rows += rows
            failures += bad
        print(format_rows(all_rows))
        narrow = sorted({r[0] for r in all_rows if r[7] not in ("-", "16 B")})
        if narrow:
            # Not a failure (a kernel may read scalars or int64 targets), but worth a look.
            print(f"static: widest global load under 16 B in: {', '.join(narrow)}")
    n = len(configs) * len(archs)
    verdict = "FAILED" if failures else "ok"
    print(f"static: {n} compilations ({len(configs)} configurations x sm_"
          f"{'/sm_'.join(map(str, archs))}), {failures} problem(s), "
          f"{time.time() - t0:.1f} s: {verdict}")
    return 1 if failures else 0
