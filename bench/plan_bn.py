"""``python -m bench plan --op bn``: BatchNorm's kernels, grids, launches and bytes per
element for plain BatchNorm and the fused epilogues (BN + ReLU, BN + add + ReLU, ...), next
to torch's eager ops. Every number comes from the launcher's ``plan_batch_norm``.

    python -m bench plan --op bn --dtype bf16 --shape 256x64x56x56 --layout cl
"""

from __future__ import annotations

DEFAULT_SHAPE = "256x64x56x56"
# (label, activation, residual): the epilogues a ResNet / EfficientNet block uses.
EPILOGUES = (("BN", "identity", False), ("BN+ReLU", "relu", False),
             ("BN+add+ReLU", "relu", True), ("BN+SiLU", "silu", False),
             ("BN+add", "identity", True))


def describe(args) -> str:
    import torch

    from fusedgrad import _bn_launch as L

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp64": torch.float64}
    dtype_names = getattr(args, "dtype", None) or ["bf16"]
    shapes = [s for s in (getattr(args, "shape", None) or [DEFAULT_SHAPE]) if "x" in s]
    layouts = getattr(args, "layout", None) or ["channels_last"]
    lines = []
    for shape_text in shapes or [DEFAULT_SHAPE]:
        shape = tuple(int(v) for v in shape_text.split("x"))
        for layout in layouts:
            for name in dtype_names:
                dtype = dtypes[name]
                cl = layout == "channels_last" and len(shape) in (4, 5)
                base = L.plan_batch_norm(shape, dtype, channels_last=cl)
                lay = base.layout
                lines.append(
                    f"batch_norm {name} {shape_text} {layout}: (N, C, S) = ({lay.N}, {lay.C}, "
                    f"{lay.S}), {lay.orientation}, tile {lay.block_c}x{lay.block_s}, "
                    f"{lay.splits} splits x {lay.n_cblocks} channel blocks")
                for kname, grid, meta in base.kernels_fwd + base.kernels_bwd:
                    consts = " ".join(f"{k}={v}" for k, v in meta.items())
                    lines.append(f"  {kname:22s} grid {grid[0]:>8d}  {consts}")
                elem = torch.empty((), dtype=dtype).element_size()
                lines.append(f"  {'training fwd+bwd':14s} {'launches':>8s} {'acc/elem':>8s} "
                             f"{'torch':>6s} {'GB moved':>9s} {'torch GB':>9s}")
                for label, act, res in EPILOGUES:
                    p = L.plan_batch_norm(shape, dtype, channels_last=cl, activation=act,
                                          residual=res)
                    n = lay.N * lay.C * lay.S
                    lines.append(
                        f"  {label:14s} {p.launches_fwd + p.launches_bwd:8d} "
                        f"{p.bytes_per_elem_fwd_bwd:8d} {p.torch_accesses_fwd_bwd:6d} "
                        f"{p.hbm_bytes(elem) / 1e9:9.3f} "
                        f"{n * p.torch_accesses_fwd_bwd * elem / 1e9:9.3f}")
                lines.append("  acc/elem: tensor-sized reads + writes per element (x elem size "
                             "= bytes); torch: its eager BatchNorm, add and activation ops")
    return "\n".join(lines)
