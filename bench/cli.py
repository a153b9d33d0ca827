"""Command line of ``python -m bench``.

    python -m bench                      # CUDA: every benchmark; no CUDA: smoke + static
    python -m bench --quick              # a short selection (< 3 min on an H100)
    python -m bench --op ce --dtype bf16 --shape 128256 --mode fwd+bwd
    python -m bench --list --quick       # what would run (no GPU needed)
    python -m bench static [--arch 90 80]
    python -m bench smoke
    python -m bench host                 # launches, device ops, host us per call vs torch
    python -m bench plan --op ce --dtype bf16 --shape 8192x128256

Triton's interpreter must be chosen before ``triton`` is first imported, so this module
imports neither triton nor fusedgrad at module level; each command decides first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"
OP_ALIASES = {"ce": "cross_entropy", "cross_entropy": "cross_entropy", "cross-entropy":
              "cross_entropy", "bn": "batch_norm", "batch_norm": "batch_norm", "batchnorm":
              "batch_norm", "e2e": "e2e", "step": "e2e", "lce": "linear_cross_entropy",
              "linear_cross_entropy": "linear_cross_entropy"}
LAYOUT_ALIASES = {"cl": "channels_last", "channels_last": "channels_last", "nhwc":
                  "channels_last", "contig": "contiguous", "contiguous": "contiguous",
                  "nchw": "contiguous"}


def _split(values) -> list[str]:
    """Accept both ``--dtype bf16 fp32`` and ``--dtype bf16,fp32``."""
    out = []
    for v in values or ():
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="fusedgrad benchmarks vs PyTorch eager, torch.compile and Liger-Kernel; "
                    "without CUDA: a correctness smoke through Triton's interpreter and the "
                    "offline kernel report.")
    p.add_argument("command", nargs="?", default="run",
                   choices=("run", "static", "smoke", "host", "plan"),
                   help="run (default): benchmarks on CUDA, else smoke + static; static: "
                        "offline compile report; smoke: tiny correctness check; host: "
                        "launches, device ops and host us per call vs torch (no GPU needed); "
                        "plan: the launcher's path, kernels, grids and bytes for a case")
    sel = p.add_argument_group("selection (run)")
    sel.add_argument("--quick", action="store_true", help="short selection (< 3 min on an H100)")
    sel.add_argument("--op", nargs="+", metavar="OP",
                     help="ce|cross_entropy, bn|batch_norm, lce|linear_cross_entropy, e2e "
                          "(comma or space separated)")
    sel.add_argument("--dtype", nargs="+", metavar="DT", help="fp32, bf16, fp16")
    sel.add_argument("--mode", nargs="+", metavar="M",
                     help="fwd, fwd+bwd, bwd (backward only, CE), step")
    sel.add_argument("--layout", nargs="+", metavar="L", help="contiguous|contig, channels_last|cl")
    sel.add_argument("--shape", nargs="+", metavar="S",
                     help="keep cases whose name contains any of these, e.g. 128256 or x56x56")
    sel.add_argument("--impl", nargs="+", metavar="I",
                     help="fusedgrad, inplace, torch, compile, liger, torch.lce (default: all)")
    sel.add_argument("--list", action="store_true", help="print the selected cases and exit")
    out = p.add_argument_group("output (run)")
    out.add_argument("--out", type=Path, default=DEFAULT_OUT,
                     help=f"results folder (default {DEFAULT_OUT.relative_to(REPO)})")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    out.add_argument("--plain", action="store_true", help="plain-text progress (no tqdm)")
    out.add_argument("--rep-ms", type=int, default=None,
                     help="do_bench measuring window per implementation (ms)")
    cpu = p.add_argument_group("without CUDA (run)")
    cpu.add_argument("--no-static", action="store_true", help="skip the static report")
    cpu.add_argument("--no-smoke", action="store_true", help="skip the interpreter smoke")
    ho = p.add_argument_group("host")
    ho.add_argument("--reps", type=int, default=200,
                    help="timed calls per case and implementation (default 200)")
    ho.add_argument("--verbose", action="store_true", help="list the other device ops")
    st = p.add_argument_group("static")
    st.add_argument("--arch", nargs="+", type=int, default=None, help="sm targets (default 90 80)")
    st.add_argument("--workers", type=int, default=2, help="parallel compilations (default 2)")
    args = p.parse_args(argv)
    try:
        args.op = [OP_ALIASES[o.lower()] for o in _split(args.op)] or None
        args.layout = [LAYOUT_ALIASES[v.lower()] for v in _split(args.layout)] or None
    except KeyError as exc:
        p.error(f"unknown value {exc.args[0]!r} for --op/--layout")
    args.dtype = _split(args.dtype) or None
    args.mode = _split(args.mode) or None
    args.shape = _split(args.shape) or None
    from .common import DTYPE_NAMES, IMPL_ALIASES

    for d in args.dtype or ():
        if d not in DTYPE_NAMES:
            p.error(f"unknown --dtype {d!r} (choose from {', '.join(DTYPE_NAMES)})")
    for m in args.mode or ():
        if m not in ("fwd", "fwd+bwd", "bwd", "step"):
            p.error(f"unknown --mode {m!r} (choose from fwd, fwd+bwd, bwd, step)")
    impls = _split(args.impl)
    bad = [i for i in impls if i.lower() not in IMPL_ALIASES]
    if bad:
        p.error(f"unknown --impl {bad[0]!r} (choose from {', '.join(sorted(IMPL_ALIASES))})")
    args.impl = {IMPL_ALIASES[i.lower()] for i in impls} or None
    return args


def all_cases():
    from . import batch_norm, cross_entropy, e2e, linear_cross_entropy

    return (cross_entropy.cases() + batch_norm.cases() + e2e.cases()
            + linear_cross_entropy.cases())


def select_cases(cases, args) -> list:
    """The cases the command line asks for, in a stable order."""
    out = []
    for c in cases:
        if args.quick and not c.quick:
            continue
        if args.op and c.family not in args.op:
            continue
        if args.dtype and c.dtype not in args.dtype:
            continue
        if args.mode and c.mode not in args.mode:
            continue
        if args.layout and c.layout and c.layout not in args.layout:
            continue
        if args.shape and not any(s in c.name for s in args.shape):
            continue
        if args.impl and not set(c.impls) & args.impl:
            continue
        out.append(c)
    return out


def _subprocess_env(interpret: bool) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_without_cuda(args) -> int:
    print("python -m bench: timings need a CUDA device, and torch sees none here.\n"
          "Running instead: a correctness smoke of the fused ops through Triton's interpreter, "
          "then the offline kernel report (`python -m bench static`).", flush=True)
    rc = 0
    if not args.no_smoke:
        # A separate process: the smoke needs TRITON_INTERPRET=1, the static report needs it
        # off, and the choice is fixed once triton is imported.
        rc |= subprocess.run([sys.executable, "-m", "bench", "smoke"], cwd=REPO,
                             env=_subprocess_env(interpret=True)).returncode
    if not args.no_static:
        cmd = [sys.executable, "-m", "bench", "static", "--workers", str(args.workers)]
        if args.arch:
            cmd += ["--arch", *map(str, args.arch)]
        rc |= subprocess.run(cmd, cwd=REPO, env=_subprocess_env(interpret=False)).returncode
    return 1 if rc else 0


def run_benchmarks(args, cases, *, device: str = "cuda", measure=None) -> int:
    """Run ``cases`` and write the JSON, markdown, plots and table.

    device/measure: only for the tests' CPU dry run (see tests/test_bench_cli.py).
    """
    import torch

    from . import plots, report, timing
    from .common import IMPL_ALIASES, LIGER, Context, add_speedups, liger_cross_entropy

    impls = args.impl or set(IMPL_ALIASES.values())
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for every implementation
    meta = report.environment()
    copy = timing.copy_bandwidth_gbps()
    meta.update(copy_gbps=copy["gbps"], copy_bytes=copy["bytes"], quick=bool(args.quick),
                complete=False)
    print(f"{meta['device']}: torch {meta['torch']}, triton {meta['triton']}, driver "
          f"{meta['driver']}, Liger-Kernel {meta['liger_kernel'] or 'not installed'}; "
          f"copy bandwidth {copy['gbps']:,.0f} GB/s", flush=True)
    liger_fn, liger_reason = liger_cross_entropy()
    if LIGER in impls and liger_fn is None:
        print(f"liger: skipped, {liger_reason}", flush=True)
    ctx = Context(impls=impls, copy_gbps=copy["gbps"],
                  rep_ms=args.rep_ms or (timing.QUICK_REP_MS if args.quick else timing.REP_MS),
                  device=device, measure=measure)
    stem = report.results_stem(meta["device"], meta["date"])
    json_path = args.out / f"{stem}.json"
    md_path = args.out / f"{stem}.md"
    records: list[dict] = []
    bar = progress_bar(len(cases), args)
    t0 = time.time()
    try:
        for case in cases:
            bar.set_postfix_str(case.name)
            recs = case.run(case, ctx)
            records += recs
            add_speedups(records)
            for r in recs:
                if r["status"] != "ok":
                    bar.write(f"  {case.name} / {r['impl']}: {r['status']}: {r['reason']}")
            # Written after every case: a run stopped by a time limit keeps what it measured.
            report.write_json(json_path, meta, records)
            report.write_markdown(md_path, meta, records)
            bar.update(1)
    finally:
        bar.close()
    meta.update(complete=True, seconds=round(time.time() - t0, 1))
    report.write_json(json_path, meta, records)
    report.write_markdown(md_path, meta, records)
    print()
    print(report.format_table(records))
    print()
    written = [json_path, md_path]
    if args.no_plot:
        print("plots: skipped (--no-plot)")
    else:
        pngs, why = plots.write_plots(records, args.out, stem, copy["gbps"])
        written += pngs
        if why:
            print(f"plots: none written: {why}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def progress_bar(total, args):
    from .progress import progress

    return progress(total, desc="bench", plain=args.plain)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "static":
        # Compiling for a GPU target needs the real JIT, not the interpreter.
        if "triton" not in sys.modules:
            os.environ.pop("TRITON_INTERPRET", None)
        elif os.environ.get("TRITON_INTERPRET") == "1":
            return subprocess.run([sys.executable, "-m", "bench", *sys.argv[1:]], cwd=REPO,
                                  env=_subprocess_env(interpret=False)).returncode
        from . import static

        return static.main(archs=tuple(args.arch or static.ARCHS), workers=args.workers)

    import torch  # does not import triton

    has_cuda = torch.cuda.is_available()
    if args.command == "plan":
        from . import plan

        return plan.main(args)
    if args.command == "host":
        from . import host

        return host.main(args)
    if args.command == "smoke":
        if not has_cuda:
            os.environ["TRITON_INTERPRET"] = "1"
        from . import smoke

        return smoke.main()

    cases = select_cases(all_cases(), args)
    if args.list or has_cuda:
        if not cases:
            print("python -m bench: no case matches the selection", file=sys.stderr)
            return 2
    if args.list:
        for c in cases:
            print(f"{c.name:50s} {c.family:14s} impls: {', '.join(c.impls)}")
        print(f"{len(cases)} case(s)")
        return 0
    if not has_cuda:
        return run_without_cuda(args)
    args.out.mkdir(parents=True, exist_ok=True)
    return run_benchmarks(args, cases)
