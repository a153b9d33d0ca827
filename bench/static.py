"""``python -m bench static``: compile every launcher configuration without a GPU.

For each kernel configuration that fusedgrad's launchers can choose (each launcher
module's ``static_configs()``, see ``fusedgrad.static_check``) and each target
(sm_90 and sm_80 by default) this prints registers, spills, local memory, shared
memory and the widest global load read from the PTX (16 B = vectorised hot loads).

Exit status: 1 on any spill/local memory, shared memory over the architecture's limit,
a compile error, or a launcher module that exists but fails to import; 0 otherwise. A
launcher module that does not exist yet (or has no ``static_configs``) is reported as
"not available" and does not fail the run. Must run with Triton's interpreter OFF
(``bench/__main__`` removes TRITON_INTERPRET for this command).
"""

from __future__ import annotations

import importlib
import time

ARCHS = (90, 80)
COMPILE_WORKERS = 2  # CI machines have 2 cores


def collect_configs(modules=None) -> tuple[list, list[tuple[str, str]], list[tuple[str, str]]]:
    """(configs, [(module, why not available)], [(module, import error)]).

    modules: launcher module names inside ``fusedgrad`` (default: every registered one,
    ``static_check.LAUNCHER_MODULES``).
    """
    from fusedgrad import static_check

    configs, unavailable, broken = [], [], []
    for mod in static_check.LAUNCHER_MODULES if modules is None else modules:
        full = f"fusedgrad.{mod}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name == full:
                unavailable.append((mod, "module not present in this checkout"))
            else:
                broken.append((mod, f"ModuleNotFoundError: {exc}"))
            continue
        except Exception as exc:  # noqa: BLE001 - a module that exists but is broken
            broken.append((mod, f"{type(exc).__name__}: {exc}"))
            continue
        fn = getattr(module, "static_configs", None)
        if fn is None:
            unavailable.append((mod, "has no static_configs()"))
            continue
        try:
            configs.extend(fn())
        except Exception as exc:  # noqa: BLE001
            broken.append((mod, f"static_configs() raised {type(exc).__name__}: {exc}"))
    return configs, unavailable, broken


def compile_reports(configs: list, arch: int, workers: int = COMPILE_WORKERS):
    """[(config, CompileReport | None, error text)] for every config, in order.

    Compiles in parallel with ``static_check.compile_all``; if any compilation fails,
    compiles again one by one to say which configurations failed and why.
    """
    from fusedgrad import static_check

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
    return f"warps={cfg.num_warps} stages={cfg.num_stages} {consts}".strip()


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


def main(archs=ARCHS, workers: int = COMPILE_WORKERS, modules=None) -> int:
    t0 = time.time()
    configs, unavailable, broken = collect_configs(modules)
    for mod, why in unavailable:
        print(f"static: fusedgrad.{mod}: not available ({why})")
    for mod, why in broken:
        print(f"static: fusedgrad.{mod}: IMPORT ERROR {why}")
    failures = len(broken)
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
