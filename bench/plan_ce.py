"""``python -m bench plan --op ce``: what one cross-entropy call does, from the launchers'
own planning code (nothing is restated here).

    python -m bench plan --op ce --dtype bf16 --shape 8192x128256
    python -m bench plan --op ce --shape "ce bf16 8192x256000 fwd+bwd"   # a benchmark case

For each shape (``NxV``, or the name of a benchmark case) and dtype it prints the path
the launcher takes, every kernel with its grid and constexprs, launches per call
(forward, and backward with grad_output == 1) and the modelled HBM bytes. The fused
kernels' part comes from ``fusedgrad._ce_launch.plan_cross_entropy``, the prep and
finishing kernels' part from ``fusedgrad._ce_prep.plan_host_kernels``. bench/cross_entropy.py
computes its ``kernel_bytes`` with :func:`fused_hbm_bytes` below, so the printed model and
the benchmark's GB/s cannot disagree.
"""

from __future__ import annotations

import dataclasses
import os
import re

DEFAULT_SHAPES = ("8192x32000", "8192x128256", "8192x256000")
TARGET_BYTES = 8  # int64 class indices
LOSS_BYTES = 4    # fp32 per-row loss (and logsumexp) in the accumulation dtype


@dataclasses.dataclass
class CallPlan:
    """Everything a call launches: host kernels around the launcher's plan."""

    n_rows: int
    n_classes: int
    dtype: str
    mode: str                 # "fwd+bwd" or "fwd"
    launcher: object          # the launcher's CEPlan
    host_kernels: list        # [(name, grid, constexprs)] of the prep/finish kernels

    @property
    def launches_fwd(self) -> int:
        return self.launcher.launches_fwd + len(self.host_kernels)

    @property
    def launches_bwd(self) -> int:
        return self.launcher.launches_bwd_go1 if self.mode == "fwd+bwd" else 0


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "fp64": torch.float64}[name]


def _elem_size(name: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[name]


def launcher_plan(n_rows: int, n_classes: int, dtype: str, mode: str, device=None):
    """The launcher's CEPlan for a class-index, unweighted call (device None: the
    launcher's model GPU; tests pass the device they run on)."""
    from fusedgrad import _ce_launch as launch

    return launch.plan_cross_entropy(n_rows, n_classes, _torch_dtype(dtype), prob_target=False,
                                     write_grad=mode == "fwd+bwd", has_weight=False,
                                     smoothing=False, device=device)


def call_plan(n_rows: int, n_classes: int, dtype: str, mode: str,
              reduction: str = "mean", device=None) -> CallPlan:
    from fusedgrad import _ce_prep

    return CallPlan(n_rows, n_classes, dtype, mode,
                    launcher_plan(n_rows, n_classes, dtype, mode, device),
                    _ce_prep.plan_host_kernels(n_rows, reduction))


def fused_hbm_bytes(n_rows: int, n_classes: int, dtype: str, mode: str,
                    grad_output_one: bool = True) -> int:
    """HBM bytes of fusedgrad's kernels for one call (mean over class targets): the
    launcher's model of the logits/gradient traffic, plus the targets (read by the prep
    and the fused kernel) and the per-row loss and logsumexp (written, then the loss
    read by the finishing kernel). A backward whose grad_output is not 1 rescales the
    gradient written in forward: one more read and write of it (the rescale kernel's
    docstring)."""
    plan = launcher_plan(n_rows, n_classes, dtype, mode)
    small = 2 * n_rows * TARGET_BYTES + 3 * n_rows * LOSS_BYTES
    rescale = 0 if grad_output_one or mode != "fwd+bwd" else 2 * n_rows * n_classes
    return plan.hbm_bytes(_elem_size(dtype)) + rescale * _elem_size(dtype) + small


# ---- command line ------------------------------------------------------------------------

_NXV = re.compile(r"^(\d+)x(\d+)$")
_CASE = re.compile(r"^ce (\w+) (\d+)x(\d+) (\S+)$")


def parse_shape(text: str, dtypes, modes) -> list[tuple[int, int, str, str]]:
    """(n_rows, n_classes, dtype, mode) for ``NxV`` (every dtype/mode asked) or a case name."""
    text = text.strip()
    m = _CASE.match(text)
    if m:
        return [(int(m.group(2)), int(m.group(3)), m.group(1), m.group(4))]
    m = _NXV.match(text)
    if not m:
        raise ValueError(f"--shape {text!r}: expected NxV (e.g. 8192x128256) or a benchmark "
                         "case name (e.g. 'ce bf16 8192x128256 fwd+bwd')")
    return [(int(m.group(1)), int(m.group(2)), d, mo) for d in dtypes for mo in modes]


def _fmt_kernel(name, grid, consts) -> str:
    c = " ".join(f"{k}={v}" for k, v in consts.items())
    return f"    {name:34s} grid {str(tuple(grid)):16s} {c}"


def _split_occupancy(lp) -> list[str]:
    """For the split-row path: members per row and programs per SM of the model GPU."""
    if lp.path != "split":
        return []
    from fusedgrad import _ce_launch as launch

    name, grid, consts = lp.kernels[0]
    members = -(-lp.n_classes // consts["CHUNK"])
    per_sm = launch.split_programs_per_sm()
    return [f"  split rows: {members} members of {consts['CHUNK']} classes per row; "
            f"{grid[0]} programs = {grid[0] / launch.MODEL_SMS:.2f} per SM "
            f"({per_sm} resident per SM x {launch.MODEL_SMS} SMs)"]


def format_plan(p: CallPlan) -> str:
    lp = p.launcher
    elem = _elem_size(p.dtype)
    logits = p.n_rows * p.n_classes * elem
    total = fused_hbm_bytes(p.n_rows, p.n_classes, p.dtype, p.mode)
    per_logit = lp.bytes_per_logit_fwd_bwd
    reads_writes = {1.0: "1 read", 2.0: "1 read + 1 write", 3.0: "2 reads + 1 write"}
    lines = [
        f"ce {p.dtype} {p.n_rows}x{p.n_classes} {p.mode} (class targets, mean)",
        f"  path: {lp.path}",
        *_split_occupancy(lp),
        "  forward kernels:",
        *(_fmt_kernel(*k) for k in p.host_kernels[:1]),
        *(_fmt_kernel(*k) for k in lp.kernels[:lp.launches_fwd]),
        *(_fmt_kernel(*k) for k in p.host_kernels[1:]),
        "  backward kernels (grad_output == 1):" + ("" if p.launches_bwd else " none"),
        *(_fmt_kernel(*k) for k in lp.kernels[lp.launches_fwd:][:p.launches_bwd]),
        f"  launches: forward {p.launches_fwd}, backward (grad_output == 1) {p.launches_bwd}"
        f" -> {p.launches_fwd + p.launches_bwd} per call",
        f"  HBM per logit: {per_logit:g}E ({reads_writes.get(per_logit, 'see kernels')}; "
        f"E = {elem} B)",
        f"  modelled HBM bytes: {total / 1e9:.3f} GB (logits {logits / 1e9:.3f} GB x "
        f"{per_logit:g}, + targets and per-row loss)",
    ]
    return "\n".join(lines)


def describe(args) -> str:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # plans need no GPU
    dtypes = args.dtype or ["bf16"]
    modes = getattr(args, "mode", None) or ["fwd+bwd"]
    shapes = args.shape or list(DEFAULT_SHAPES)
    out = []
    for text in shapes:
        for n_rows, n_classes, dtype, mode in parse_shape(text, dtypes, modes):
            out.append(format_plan(call_plan(n_rows, n_classes, dtype, mode)))
    return "\n\n".join(out)
