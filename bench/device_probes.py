"""GPU probes for bench/device_check.sh (one lease, one call): each writes one JSON file.

    python -m bench.device_probes preflight                 # versions, GPU; exit 3 without CUDA
    python -m bench.device_probes correct  --out F.json     # fusedgrad vs eager at bench sizes
    python -m bench.device_probes host     --out F.json     # host us, GPU us, graph replay us
    python -m bench.device_probes big      --out F.json     # > 2^31-element CE and BN vs eager
    python -m bench.device_probes ncu-target --vocab V      # one CE call (for ncu to profile)
    python -m bench.device_probes render F.json... --out DIR [--combined STEM]  # md + plots
    python -m bench.device_probes summary  DIR              # headline numbers of a run

Every probe catches its own errors into the JSON (a failing case is a record with its
reason, never a crash that loses the others) and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The benchmark's CE sizes (bench/cross_entropy.py, device check selection).
CE_ROWS = 8192
CE_VOCABS = (32000, 128256, 256000)
# Tolerance of bf16 results against eager bf16 (both vs an fp32 computation would be
# tighter; eager's own bf16 rounding is part of the difference): the suite's bf16 entry.
BF16_TOL = 1.6e-2
INT32_LIMIT = 2**31


def _write(path, payload) -> None:
    if path is None:
        print(json.dumps(payload, indent=1, default=str))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str, allow_nan=True) + "\n")


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 on the device; NaN/inf in out give inf."""
    import torch

    out = out.detach().double()
    ref = ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom else num


def _record(results: list, name: str, fn) -> None:
    """Run one check; its dict (plus name, ok, seconds) or its error goes to results."""
    t0 = time.perf_counter()
    try:
        rec = fn()
    except Exception as exc:  # noqa: BLE001 - a failing case must not lose the others
        rec = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}",
               "trace": traceback.format_exc()[-1500:]}
    rec = {"name": name, **rec, "seconds": round(time.perf_counter() - t0, 2)}
    results.append(rec)
    status = "ok" if rec.get("ok") else "FAIL"
    detail = {k: v for k, v in rec.items() if k not in ("name", "trace", "ok")}
    print(f"{name}: {status} {json.dumps(detail, default=str)}", flush=True)
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- preflight


def preflight(args) -> int:
    import importlib
    import subprocess
    import warnings

    warnings.simplefilter("ignore")  # import-order chatter (setuptools/distutils)

    info = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "numpy", "setuptools", "wheel", "pip", "pytest", "xdist",
                 "pytest_timeout", "matplotlib", "tqdm", "liger_kernel"):
        try:
            mod = importlib.import_module(name)
            info[name] = getattr(mod, "__version__", "present")
        except Exception as exc:  # noqa: BLE001
            info[name] = f"MISSING ({type(exc).__name__})"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["sms"] = p.multi_processor_count
        info["gpu_mem_gib"] = round(p.total_memory / 2**30, 1)
        info["capability"] = f"{p.major}.{p.minor}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_mode,driver_version,"
                              "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
    except Exception as exc:  # noqa: BLE001
        info["nvidia_smi"] = f"not available ({type(exc).__name__})"
    for k, v in info.items():
        print(f"  {k}: {v}")
    _write(args.out, info)
    if not info["cuda_available"]:
        print("NO CUDA: torch sees no GPU here; the device check needs one and stops now.")
        return 3
    return 0


# ----------------------------------------------------------------------------- correctness


def correct(args) -> int:
    """fusedgrad vs eager at the benchmarked CE sizes (bf16 8192 x V): loss and gradient,
    functional and inplace_backward, plus BatchNorm at one benchmarked shape."""
    import torch
    import torch.nn.functional as F

    import fusedgrad as fg

    results: list[dict] = []
    for vocab in args.vocabs:
        def ce_case(vocab=vocab):
            g = torch.Generator(device="cuda").manual_seed(vocab)
            x = torch.randn(CE_ROWS, vocab, device="cuda", dtype=torch.bfloat16, generator=g)
            t = torch.randint(0, vocab, (CE_ROWS,), device="cuda", generator=g)
            xr = x.float().requires_grad_(True)
            ref = F.cross_entropy(xr, t)
            ref.backward()
            out = {}
            for inplace in (False, True):
                base = x.clone().requires_grad_(True)
                xi = base * 1  # a non-leaf, as logits are
                loss = fg.cross_entropy(xi, t, inplace_backward=inplace)
                loss.backward()
                key = "inplace" if inplace else "functional"
                out[f"{key}_loss_err"] = rel_err(loss.float(), ref)
                out[f"{key}_grad_err"] = rel_err(base.grad.float(), xr.grad)
                del base, xi, loss
            out["ok"] = all(v <= BF16_TOL for v in out.values())
            return out

        _record(results, f"ce bf16 {CE_ROWS}x{vocab} fwd+bwd vs eager fp32", ce_case)

    def bn_case():
        x = torch.randn(64, 256, 56, 56, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.rand(256, device="cuda") + 0.5
        b = torch.randn(256, device="cuda")
        dy = torch.randn_like(x)
        rm, rv = torch.zeros(256, device="cuda"), torch.ones(256, device="cuda")
        xf = x.float().requires_grad_(True)
        ref = F.batch_norm(xf, rm.clone(), rv.clone(), w, b, training=True)
        ref.backward(dy.float())
        xg = x.clone().requires_grad_(True)
        y = fg.batch_norm(xg, rm, rv, w, b, training=True)
        y.backward(dy)
        out = {"y_err": rel_err(y.float(), ref), "dx_err": rel_err(xg.grad.float(), xf.grad)}
        out["ok"] = all(v <= BF16_TOL for v in out.values())
        return out

    _record(results, "bn bf16 cl 64x256x56x56 fwd+bwd vs eager fp32", bn_case)
    _write(args.out, {"probe": "correct", "results": results})
    return 0 if all(r.get("ok") for r in results) else 1


# ----------------------------------------------------------------------------- host overhead


def _host_probe(call, reps: int = 30) -> dict:
    """host us per call (no sync), GPU us per call (events), CUDA-graph replay us."""
    import torch

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    host = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        host.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    end.synchronize()
    out = {"host_us": statistics.median(host), "gpu_us": start.elapsed_time(end) * 1e3 / reps}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        g.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        out["graph_replay_us"] = start.elapsed_time(end) * 1e3 / reps
    except Exception as exc:  # noqa: BLE001 - the capture error is the answer
        torch.cuda.synchronize()
        out["graph_replay_us"] = None
        out["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def host(args) -> int:
    import torch
    import torch.nn.functional as F

    import fusedgrad as fg

    results: list[dict] = []
    # Small shapes: the host path dominates, as in a model's many small calls.
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 1024, (64,), device="cuda")
    anchor = torch.zeros((), device="cuda", requires_grad=True)

    def ce_step(fn):
        def call():
            fn(x + anchor.to(x.dtype), t).backward()
        return call

    for name, fn in (("fusedgrad", fg.cross_entropy), ("torch", F.cross_entropy)):
        _record(results, f"host ce bf16 64x1024 fwd+bwd {name}",
                lambda fn=fn: {"ok": True, **_host_probe(ce_step(fn))})
    xb = torch.randn(8, 64, 16, 16, device="cuda", dtype=torch.bfloat16)
    xb = xb.contiguous(memory_format=torch.channels_last)
    w = torch.ones(64, device="cuda", requires_grad=True)
    b = torch.zeros(64, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")

    def bn_step(fn):
        def call():
            fn(xb, rm, rv, w, b, training=True).sum().backward()
        return call

    for name, fn in (("fusedgrad", fg.batch_norm), ("torch", F.batch_norm)):
        _record(results, f"host bn bf16 cl 8x64x16x16 fwd+bwd {name}",
                lambda fn=fn: {"ok": True, **_host_probe(bn_step(fn))})
    # fusedgrad's graph capture must work (no host sync in the hot path).
    for r in results:
        if r["name"].endswith("fusedgrad") and r.get("graph_error"):
            r["ok"] = False
    _write(args.out, {"probe": "host", "results": results})
    return 0 if all(r.get("ok") for r in results) else 1


# ----------------------------------------------------------------------------- > 2^31 elements


def big(args) -> int:
    """One CE and one BatchNorm call of more than 2^31 elements against eager (int64
    addressing can only be proven on a device with the memory)."""
    import torch
    import torch.nn.functional as F

    import fusedgrad as fg

    results: list[dict] = []

    def ce_big():
        # 16400 x 131072 bf16 = 2.15e9 elements (4.3 GB; with gradient and references
        # about 26 GB): the last rows' offsets pass 2^31.
        n, v = 16400, 131072
        assert n * v > INT32_LIMIT
        x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
        t = torch.randint(0, v, (n,), device="cuda")
        base = x.clone().requires_grad_(True)
        loss = fg.cross_entropy(base * 1, t, reduction="none")
        loss.sum().backward()
        tail = slice(n - 64, n)  # rows past 2^31 elements: eager on those rows only
        xr = x[tail].float().requires_grad_(True)
        ref = F.cross_entropy(xr, t[tail], reduction="none")
        ref.sum().backward()
        out = {"elements": n * v, "tail_loss_err": rel_err(loss[tail].float(), ref),
               "tail_grad_err": rel_err(base.grad[tail].float(), xr.grad),
               "all_finite": bool(torch.isfinite(loss).all().item())}
        out["ok"] = out["all_finite"] and max(out["tail_loss_err"],
                                              out["tail_grad_err"]) <= BF16_TOL
        return out

    def bn_big():
        # (N, C, H, W) = (33, 64, 1024, 1000) bf16: 2.16e9 elements, n * stride_n past 2^31
        # for the last samples; contiguous (N not folded), channels reduce over N*H*W.
        shape = (33, 64, 1024, 1000)
        numel = 33 * 64 * 1024 * 1000
        assert numel > INT32_LIMIT
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
        y = fg.batch_norm(x, rm, rv, training=True)
        ref = F.batch_norm(x, torch.zeros(64, device="cuda"), torch.ones(64, device="cuda"),
                           training=True)
        out = {"elements": numel, "y_err": rel_err(y, ref),
               "last_sample_err": rel_err(y[-1], ref[-1])}
        out["ok"] = max(out["y_err"], out["last_sample_err"]) <= BF16_TOL
        return out

    _record(results, "ce bf16 16400x131072 (> 2^31 elements) vs eager", ce_big)
    _record(results, "bn bf16 33x64x1024x1000 (> 2^31 elements) vs eager", bn_big)
    _write(args.out, {"probe": "big", "results": results})
    return 0 if all(r.get("ok") for r in results) else 1


# ----------------------------------------------------------------------------- ncu target


def ncu_target(args) -> int:
    """One bf16 8192 x V fwd+bwd (grad_output 1) for Nsight Compute to profile."""
    import torch

    import fusedgrad as fg

    x = torch.randn(CE_ROWS, args.vocab, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, args.vocab, (CE_ROWS,), device="cuda")
    anchor = torch.zeros((), device="cuda", requires_grad=True)
    fg.cross_entropy(x + anchor.to(x.dtype), t).backward()  # compile outside the profile
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fg.cross_entropy(x + anchor.to(x.dtype), t).backward()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


# ----------------------------------------------------------------------------- offline


def render(args) -> int:
    """Markdown summary and plots for benchmark JSON files (offline, no GPU)."""
    from . import plots, report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.combined:
        # One table over every pass (e.g. the CE and compile passes side by side).
        meta, records = report.read_json(Path(args.files[0]))
        for path in args.files[1:]:
            records = records + report.read_json(Path(path))[1]
        from .common import add_speedups

        add_speedups(records)
        md = report.write_markdown(out / f"{args.combined}.md", meta, records)
        pngs, why = plots.write_plots(records, out, args.combined, meta.get("copy_gbps"))
        print(f"wrote {md}" + "".join(f", {p}" for p in pngs) + (f" (plots: {why})" if why else ""))
        return 0
    for path in args.files:
        meta, records = report.read_json(Path(path))
        stem = Path(path).stem
        md = report.write_markdown(out / f"{stem}.md", meta, records)
        pngs, why = plots.write_plots(records, out, stem, meta.get("copy_gbps"))
        print(f"{path}: wrote {md}" + "".join(f", {p}" for p in pngs)
              + (f" (plots: {why})" if why else ""))
    return 0


def summary(args) -> int:
    """Headline numbers of a device check: each benchmark record (ms per implementation,
    CUDA-graph ms) and every probe's result. ``folder`` holds probe-*.json and ncu-*.csv;
    --merge writes them as one JSON; --bench is where the bench-*.json files are."""
    from . import report

    folder = Path(args.folder)
    bench_dir = Path(args.bench) if args.bench else folder
    for path in sorted(bench_dir.glob("bench-*.json")):
        try:
            meta, records = report.read_json(path)
        except Exception as exc:  # noqa: BLE001
            print(f"{path.name}: unreadable ({exc})")
            continue
        print(f"== {path.name}: {meta.get('device')}, commit {meta.get('git_commit')}, copy "
              f"{meta.get('copy_gbps') or 0:,.0f} GB/s, complete={meta.get('complete')}")
        for case in report.cases_in_order(records):
            cells = []
            for r in (r for r in records if r["case"] == case):
                if r["status"] == "ok":
                    g = f" (graph {r['graph_ms']:.3f})" if r.get("graph_ms") else ""
                    cells.append(f"{r['impl']} {r['ms']:.3f} ms{g}")
                else:
                    cells.append(f"{r['impl']} {r['status']}")
            print(f"  {case}: " + "; ".join(cells))
    merged: dict = {"commit": os.environ.get("FUSEDGRAD_COMMIT"), "probes": {}, "ncu": {}}
    for path in sorted(folder.glob("probe-*.json")):
        name = path.stem[len("probe-"):]
        try:
            data = json.loads(path.read_text())
        except Exception as exc:  # noqa: BLE001
            print(f"{path.name}: unreadable ({exc})")
            continue
        merged["probes"][name] = data
        for r in data.get("results", []) if isinstance(data, dict) else []:
            keys = {k: v for k, v in r.items() if k not in ("name", "trace")}
            print(f"  {r['name']}: {json.dumps(keys, default=str)}")
    for path in sorted(folder.glob("ncu-*.csv")):
        text = path.read_text(errors="replace")
        rows = [line for line in text.splitlines() if "dram__bytes" in line]
        merged["ncu"][path.stem] = rows or text[-2000:]
        for line in rows:
            print(f"  {path.stem}: {line}")
    if args.merge:
        _write(args.merge, merged)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_probes")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("preflight", "correct", "host", "big"):
        s = sub.add_parser(name)
        s.add_argument("--out", default=None)
        if name == "correct":
            s.add_argument("--vocabs", type=int, nargs="+", default=list(CE_VOCABS))
    s = sub.add_parser("ncu-target")
    s.add_argument("--vocab", type=int, required=True)
    s = sub.add_parser("render")
    s.add_argument("files", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--combined", default=None, metavar="STEM",
                   help="one markdown/plot set over all files' records")
    s = sub.add_parser("summary")
    s.add_argument("folder")
    s.add_argument("--merge", default=None)
    s.add_argument("--bench", default=None)
    args = p.parse_args(argv)
    if args.cmd not in ("render", "summary", "preflight"):
        import torch

        if not torch.cuda.is_available():
            print(f"{args.cmd}: needs a CUDA device; torch sees none", file=sys.stderr)
            return 3
        os.environ.pop("TRITON_INTERPRET", None)
    return {"preflight": preflight, "correct": correct, "host": host, "big": big,
            "ncu-target": ncu_target, "render": render, "summary": summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
