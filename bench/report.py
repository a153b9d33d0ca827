"""Results out: the JSON file, the terminal table and the markdown summary.

Everything here works on plain record dicts (see ``bench.common.RECORD_KEYS``), so it
is tested on synthetic records without a GPU.

JSON layout (``schema`` 1)::

    {"schema": 1,
     "meta": {"device": ..., "torch": ..., "triton": ..., "driver": ..., "cuda": ...,
              "liger_kernel": ..., "copy_gbps": ..., "date": ..., "command": ..., ...},
     "records": [{"family": ..., "case": ..., "impl": ..., "ms": ..., ...}, ...]}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from .common import COMPILE, COMPILE_MAX, FUSED, FUSED_INPLACE, LIGER, TORCH, TORCH_LCE

SCHEMA = 1
IMPL_ORDER = (FUSED, FUSED_INPLACE, TORCH, COMPILE, COMPILE_MAX, LIGER, TORCH_LCE)
PEER_COLUMNS = (TORCH, COMPILE, COMPILE_MAX, LIGER)
FAMILY_TITLES = {"cross_entropy": "Cross-entropy", "batch_norm": "BatchNorm (training)",
                 "linear_cross_entropy": "Fused linear + cross-entropy",
                 "e2e": "End-to-end training steps"}
# Cases the README's headline table is made of (those present in a run are used).
HEADLINE_CASES = (
    "ce bf16 8192x128256 fwd+bwd",
    "ce bf16 16384x256000 fwd+bwd",
    "ce fp32 4096x32000 fwd+bwd",
    "bn bf16 cl 64x64x56x56 fwd+bwd",
    "bn bf16 cl 256x256x14x14 fwd+bwd",
    "bn fp32 contig 64x256x14x14 fwd+bwd",
    "bn bf16 contig 16x3x512x512 fwd+bwd",
)
MIB = 2**20


# --- file names and environment ------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_stem(device: str, date: str) -> str:
    """``<gpu>-<date>``, e.g. ``nvidia-h100-80gb-hbm3-2026-11-27``."""
    return f"{slug(device)}-{date}"


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except Exception:  # noqa: BLE001 - nvidia-smi absent or hung
        return None


def git_commit() -> str | None:
    # A copy of the checkout without .git (the device machine's) gets it from the caller.
    if os.environ.get("FUSEDGRAD_COMMIT"):
        return os.environ["FUSEDGRAD_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict:
    """Device and software versions (CUDA must be available)."""
    import torch
    import triton

    from .common import liger_version

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "l2_bytes": int(getattr(props, "L2_cache_size", 0) or 0),
        "memory_bytes": int(props.total_memory),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "driver": driver_version(),
        "liger_kernel": liger_version(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S"),
        "command": " ".join(["python -m bench"] + sys.argv[1:]),
    }


# --- JSON ----------------------------------------------------------------------------


def write_json(path: Path, meta: dict, records: list[dict]) -> Path:
    """Write ``{"schema", "meta", "records"}`` atomically (a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"schema": SCHEMA, "meta": meta, "records": records}, f, indent=1,
                  allow_nan=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: unknown results schema {data.get('schema')!r}")
    return data["meta"], data["records"]


# --- formatting helpers --------------------------------------------------------------


def fmt_ms(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_num(x, digits=0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def fmt_mib(n) -> str:
    return "-" if n is None else f"{n / MIB:,.0f}"


def fmt_speedup(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def cases_in_order(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["case"], None)
    return list(seen)


def _impl_sort_key(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _status_text(r: dict) -> str:
    return "ok" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"


# --- terminal table ------------------------------------------------------------------


TABLE_HEADER = ("case", "impl", "ms", "graph ms", "GB/s", "%copy", "peak MiB", "vs torch",
                "vs compile", "vs max-at", "vs liger", "status")


def table_rows(records: list[dict]) -> list[tuple]:
    rows = []
    for case in cases_in_order(records):
        recs = sorted((r for r in records if r["case"] == case),
                      key=lambda r: _impl_sort_key(r["impl"]))
        for r in recs:
            sp = r.get("speedup") or {}
            rows.append((case, r["impl"], fmt_ms(r["ms"]), fmt_ms(r.get("graph_ms")),
                         fmt_num(r["gbps"]), fmt_num(r["pct_copy_bw"]),
                         fmt_mib(r["peak_mem_bytes"]), fmt_speedup(sp.get(TORCH)),
                         fmt_speedup(sp.get(COMPILE)), fmt_speedup(sp.get(COMPILE_MAX)),
                         fmt_speedup(sp.get(LIGER)), _status_text(r)[:60]))
    return rows


def format_table(records: list[dict]) -> str:
    """Fixed-width table for the terminal: one line per (case, implementation)."""
    rows = [TABLE_HEADER] + table_rows(records)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = []
    prev_case = None
    for i, row in enumerate(rows):
        case = row[0]
        if i > 1 and case != prev_case:
            lines.append("")
        shown = list(row)
        if i > 0 and case == prev_case:
            shown[0] = ""  # print each case's name once
        cells = zip(shown, widths, strict=True)
        left = (0, 1, len(TABLE_HEADER) - 1)  # case, impl, status
        lines.append("  ".join(str(c).ljust(w) if j in left else str(c).rjust(w)
                               for j, (c, w) in enumerate(cells)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
        prev_case = case
    return "\n".join(lines)


# --- markdown summary ----------------------------------------------------------------


def _best_fused(recs: list[dict]) -> dict | None:
    ok = [r for r in recs if r["impl"] in (FUSED, FUSED_INPLACE) and r["status"] == "ok"]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def _cell(r: dict | None, show_gbps: bool) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"]
    if show_gbps and r.get("gbps"):
        return f"{fmt_ms(r['ms'])} ({fmt_num(r['gbps'])})"
    return fmt_ms(r["ms"])


def summary_rows(records: list[dict], case_names: list[str]) -> list[list[str]]:
    """One row per case: best fusedgrad variant against each peer."""
    rows = []
    for case in case_names:
        recs = [r for r in records if r["case"] == case]
        if not recs:
            continue
        by_impl = {r["impl"]: r for r in recs}
        fused = _best_fused(recs)
        show_gbps = any(r.get("gbps") for r in recs)
        fused_label = "-" if fused is None else _cell(fused, show_gbps) + (
            " †" if fused["impl"] == FUSED_INPLACE else "")
        row = [case, fused_label,
               "-" if fused is None or fused.get("pct_copy_bw") is None
               else f"{fused['pct_copy_bw']:.0f}%"]
        row += [_cell(by_impl.get(p), show_gbps) for p in PEER_COLUMNS]
        sp = (fused or {}).get("speedup") or {}
        row += [fmt_speedup(sp.get(p)) for p in PEER_COLUMNS]
        torch_rec = by_impl.get(TORCH)
        row.append(f"{fmt_mib((fused or {}).get('peak_mem_bytes'))} / "
                   f"{fmt_mib((torch_rec or {}).get('peak_mem_bytes'))}")
        rows.append(row)
    return rows


SUMMARY_HEADER = ["case", "fusedgrad ms (GB/s)", "% copy BW", "torch ms", "torch.compile ms",
                  "max-autotune ms", "Liger ms", "vs torch", "vs compile", "vs max-autotune",
                  "vs Liger",
                  "peak MiB fusedgrad / torch"]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def headline_cases(records: list[dict]) -> list[str]:
    present = cases_in_order(records)
    chosen = [c for c in HEADLINE_CASES if c in present]
    chosen += [c for c in present if c.startswith("e2e ")]
    if not chosen:  # a filtered run: first case of each family
        seen = set()
        for r in records:
            if r["family"] not in seen:
                seen.add(r["family"])
                chosen.append(r["case"])
    return chosen


def markdown_summary(meta: dict, records: list[dict]) -> str:
    """The summary the README's headline table is copied from."""
    lines = [f"# fusedgrad benchmark: {meta.get('device', '?')}, {meta.get('date', '?')}", ""]
    lines.append(
        f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, CUDA "
        f"{meta.get('cuda', '?')}, driver {meta.get('driver', '?')}, Liger-Kernel "
        f"{meta.get('liger_kernel') or 'not installed'}; commit {meta.get('git_commit', '?')}; "
        f"`{meta.get('command', 'python -m bench')}`.")
    if meta.get("complete") is False:
        lines.append("**Partial run**: the benchmark stopped (or is still running) before its "
                     "last case; the tables hold what was measured so far.")
    if meta.get("copy_gbps"):
        lines.append(f"Device-to-device copy in the same run: **{meta['copy_gbps']:,.0f} GB/s** "
                     "(bytes read + written).")
    lines += [
        "",
        "Median of `triton.testing.do_bench` after warm-up, inputs rotated through at least "
        "4x the L2. GB/s = the case's *minimal* bytes (inputs read once, outputs written "
        "once; the same for every implementation) / time. fusedgrad column: its faster "
        "variant († = `inplace_backward=True`). Peak memory: `torch.cuda.max_memory_allocated` "
        "during one call, inputs included. Speed-up = peer time / fusedgrad time.",
        "",
        "## Headline",
        "",
    ]
    lines += _md_table(SUMMARY_HEADER, summary_rows(records, headline_cases(records)))
    for family, title in FAMILY_TITLES.items():
        names = [c for c in cases_in_order(records)
                 if any(r["case"] == c and r["family"] == family for r in records)]
        if not names:
            continue
        lines += ["", f"## {title}", ""]
        lines += _md_table(SUMMARY_HEADER, summary_rows(records, names))
    problems = [r for r in records if r["status"] not in ("ok",)]
    if problems:
        lines += ["", "## Not measured", ""]
        # One line per (implementation, status, reason): a missing peer is one line, not 60.
        groups: dict[tuple, list[str]] = {}
        for r in problems:
            groups.setdefault((r["impl"], r["status"], r["reason"]), []).append(r["case"])
        for (impl, status, reason), names in groups.items():
            where = names[0] if len(names) == 1 else f"{len(names)} cases, e.g. {names[0]}"
            lines.append(f"- {impl}: {status} in {where}: {reason}")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, meta: dict, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_summary(meta, records))
    return path
