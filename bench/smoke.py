"""Correctness smoke: tiny fused ops against a float64 PyTorch reference.

Run as ``python -m bench smoke``. Without CUDA the kernels run on CPU tensors through
Triton's interpreter: ``bench/__main__`` sets ``TRITON_INTERPRET=1`` before anything
imports ``triton``. With CUDA the same checks (plus a few multi-block shapes) run
compiled kernels; the GPU check script runs them under compute-sanitizer's memcheck.

Errors are ||out - ref|| / ||ref|| judged with the test suite's own tolerance table
(``tests/helpers.py``: REL_TOL, rel_err), and outputs are NaN-poisoned before each
kernel (``fusedgrad._alloc.poisoned_outputs``) so an unwritten element cannot pass.
Exit status: 0 when every available op passed, 1 on any failure, 2 when the tolerance
table cannot be loaded (then nothing can be judged). An op that has not landed in this
checkout is reported as "not available", never as a pass.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_helpers():
    # tests/helpers.py imports tests/conftest.py, which picks the interpreter when there
    # is no CUDA and insists that triton is not imported yet: import it first.
    tests_dir = str(REPO / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import helpers  # noqa: E402

    return helpers.REL_TOL, helpers.rel_err


class Checker:
    def __init__(self, rel_tol, rel_err):
        self.rel_tol, self.rel_err = rel_tol, rel_err
        self.passed = self.failed = self.unavailable = 0

    def compare(self, label: str, pairs: list[tuple[str, object, object]], dtype) -> None:
        tol = self.rel_tol[dtype]
        parts, ok = [], True
        for what, out, ref in pairs:
            err = self.rel_err(out, ref)
            ok &= err <= tol
            parts.append(f"{what} {err:.1e}")
        self.passed += ok
        self.failed += not ok
        print(f"smoke {label}: rel err {', '.join(parts)} (tol {tol:.0e}) "
              f"{'ok' if ok else 'FAIL'}", flush=True)

    def error(self, label: str, exc: Exception) -> None:
        self.failed += 1
        print(f"smoke {label}: FAIL, raised {type(exc).__name__}: {exc}", flush=True)

    def not_available(self, label: str, reason: str) -> None:
        self.unavailable += 1
        print(f"smoke {label}: not available ({reason})", flush=True)


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# (dtype, rows, vocab, label_smoothing, inplace_backward). Why each exists: a short odd
# row; bf16 with ignored rows and smoothing through the inplace path; a row longer than
# the single-block limit (32768), the two-pass path.
CE_CASES_CPU = [("fp32", 6, 37, 0.0, False), ("bf16", 5, 1000, 0.1, True),
                ("fp32", 2, 40000, 0.0, False)]
# On CUDA, also multi-row blocks at LM sizes (cheap there, even under memcheck).
CE_CASES_CUDA = CE_CASES_CPU + [("bf16", 64, 50257, 0.0, False), ("fp32", 33, 128256, 0.0, True)]
# (dtype, N, C, H, W, channels_last, training). Odd spatial sizes; channels_last bf16;
# eval mode (running statistics).
BN_CASES_CPU = [("fp32", 4, 3, 5, 5, False, True), ("bf16", 2, 8, 4, 3, True, True),
                ("fp32", 3, 4, 2, 5, False, False)]
BN_CASES_CUDA = BN_CASES_CPU + [("fp16", 8, 64, 28, 28, True, True),
                                ("fp32", 16, 3, 64, 64, False, True)]


def check_cross_entropy(chk: Checker, device: str, cases) -> None:
    import torch
    import torch.nn.functional as F

    from .common import fused_op

    ce, reason = fused_op("cross_entropy")
    for dtype_name, rows, vocab, smoothing, inplace in cases:
        label = (f"cross_entropy {dtype_name} {rows}x{vocab} smoothing={smoothing} "
                 f"inplace_backward={inplace}")
        if ce is None:
            chk.not_available(label, reason)
            continue
        dtype = getattr(torch, DTYPES[dtype_name])
        x = (3 * torch.randn(rows, vocab, dtype=torch.float64)).to(dtype)
        t = torch.randint(0, vocab, (rows,))
        t[0] = -100  # one ignored row (ignore_index default)
        x64 = x.to(torch.float64).requires_grad_()
        ref = F.cross_entropy(x64, t, label_smoothing=smoothing)
        ref.backward()
        try:
            xd = x.to(device).requires_grad_()
            # inplace_backward writes the gradient into its input's storage: hand it a
            # non-leaf copy and read the gradient from the leaf.
            logits = xd * 1 if inplace else xd
            loss = ce(logits, t.to(device), label_smoothing=smoothing, inplace_backward=inplace)
            loss.backward()
            chk.compare(label, [("loss", loss, ref), ("grad", xd.grad, x64.grad)], dtype)
        except Exception as exc:  # noqa: BLE001
            chk.error(label, exc)


def check_batch_norm(chk: Checker, device: str, cases) -> None:
    import torch
    import torch.nn.functional as F

    from .common import fused_op

    bn, reason = fused_op("batch_norm")
    for dtype_name, n, c, h, w, cl, training in cases:
        label = (f"batch_norm {dtype_name} {n}x{c}x{h}x{w} "
                 f"{'channels_last' if cl else 'contiguous'} "
                 f"{'training' if training else 'eval'}")
        if bn is None:
            chk.not_available(label, reason)
            continue
        dtype = getattr(torch, DTYPES[dtype_name])
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = (1.5 * torch.randn(n, c, h, w, dtype=torch.float64) + 0.5).to(dtype)
        weight = 1 + 0.2 * torch.randn(c)
        bias = 0.2 * torch.randn(c)
        rm0, rv0 = 0.1 * torch.randn(c), 1 + 0.1 * torch.rand(c)
        dy = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)

        x64, w64, b64 = (t.to(torch.float64).requires_grad_() for t in (x, weight, bias))
        rm64, rv64 = rm0.double(), rv0.double()
        y64 = F.batch_norm(x64, rm64, rv64, w64, b64, training=training)
        y64.backward(dy.double())
        try:
            xd = x.to(device).to(memory_format=fmt).requires_grad_()
            wd, bd = (t.to(device).requires_grad_() for t in (weight, bias))
            rm, rv = rm0.to(device), rv0.to(device)
            y = bn(xd, rm, rv, wd, bd, training=training)
            y.backward(dy.to(device).to(memory_format=fmt))
            pairs = [("y", y, y64), ("dx", xd.grad, x64.grad), ("dweight", wd.grad, w64.grad),
                     ("dbias", bd.grad, b64.grad)]
            if training:
                pairs += [("running_mean", rm, rm64), ("running_var", rv, rv64)]
            chk.compare(label, pairs, dtype)
        except Exception as exc:  # noqa: BLE001
            chk.error(label, exc)


def main() -> int:
    t0 = time.time()
    try:
        rel_tol, rel_err = _load_helpers()
    except Exception as exc:  # noqa: BLE001
        print(f"smoke: cannot load the tolerance table from tests/helpers.py "
              f"({type(exc).__name__}: {exc}); nothing judged")
        return 2
    import torch

    from fusedgrad import _alloc

    device = "cuda" if torch.cuda.is_available() else "cpu"
    how = "compiled kernels" if device == "cuda" else "Triton's interpreter (TRITON_INTERPRET=1)"
    print(f"smoke: fused ops vs float64 reference on {device}, {how}", flush=True)
    torch.manual_seed(0)
    chk = Checker(rel_tol, rel_err)
    with _alloc.poisoned_outputs():
        check_cross_entropy(chk, device, CE_CASES_CUDA if device == "cuda" else CE_CASES_CPU)
        check_batch_norm(chk, device, BN_CASES_CUDA if device == "cuda" else BN_CASES_CPU)
    print(f"smoke: {chk.passed} passed, {chk.failed} failed, {chk.unavailable} not available "
          f"({time.time() - t0:.1f} s)", flush=True)
    return 1 if chk.failed else 0
