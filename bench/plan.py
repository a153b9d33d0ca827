"""``python -m bench plan``: what the launcher does for one call, from its own code.

    python -m bench plan --op ce --dtype bf16 --shape 8192x128256
    python -m bench plan --op bn --dtype bf16 --shape 256x64x56x56 --layout cl

Prints the path the launcher takes, its kernels and grids, launches per call and the
modelled HBM bytes per element. The numbers come from the launcher's own planning
functions (nothing is restated here), so the benchmark's bytes models, which use the
same functions, cannot drift from what runs.

Each op family has its own module, ``bench/plan_<op>.py``, exposing
``describe(args) -> str``; this file only dispatches.
"""

from __future__ import annotations

import importlib

# --op value (after bench.cli's aliases) -> module with describe(args)
PLANNERS = {
    "cross_entropy": "bench.plan_ce",
    "batch_norm": "bench.plan_bn",
    "linear_cross_entropy": "bench.plan_lce",
}


def main(args) -> int:
    ops = args.op or ["cross_entropy"]
    rc = 0
    for op in ops:
        mod_name = PLANNERS.get(op)
        if mod_name is None:
            print(f"python -m bench plan: no planner for --op {op}")
            rc = 2
            continue
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name != mod_name:
                raise
            print(f"python -m bench plan: {op}: not available in this checkout")
            rc = 2
            continue
        print(mod.describe(args))
    return rc
