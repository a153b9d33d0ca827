"""One PNG per op family: achieved GB/s against problem size, one line per implementation.

Only families whose records carry GB/s are plotted (cross-entropy, BatchNorm; the
end-to-end steps have no bytes model). One panel per (dtype, mode[, layout]) so that a
line never mixes problems of different kinds. matplotlib is optional: without it
``write_plots`` returns no files and a reason, and the run goes on.
"""

from __future__ import annotations

from pathlib import Path

from .report import FAMILY_TITLES, IMPL_ORDER, _impl_sort_key


def matplotlib_missing() -> str | None:
    """None when plots can be drawn, else why not."""
    try:
        import matplotlib  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib is not importable ({type(exc).__name__}: {exc}); no PNG written"
    return None


def panels(records: list[dict]) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """{(dtype, mode, layout): {impl: [(size, gbps), ...] sorted by size}}."""
    out: dict[tuple, dict[str, list]] = {}
    for r in records:
        if r["status"] != "ok" or not r.get("gbps"):
            continue
        key = (r["dtype"], r["mode"], r.get("layout") or "")
        out.setdefault(key, {}).setdefault(r["impl"], []).append((r["size"], r["gbps"]))
    for lines in out.values():
        for pts in lines.values():
            # Several shapes can share a size (N x V = V x N): keep the best per size.
            best: dict[int, float] = {}
            for size, g in pts:
                best[size] = max(g, best.get(size, 0.0))
            pts[:] = sorted(best.items())
    return out


def plot_family(family: str, records: list[dict], path: Path, copy_gbps: float | None,
                title: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")  # headless: the GPU machine has no display
    import matplotlib.pyplot as plt

    data = panels([r for r in records if r["family"] == family])
    if not data:
        return None
    keys = sorted(data)
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for impl in sorted(data[key], key=_impl_sort_key):
            xs, ys = zip(*data[key][impl], strict=True)
            style = "-" if impl in IMPL_ORDER[:2] else "--"
            ax.plot(xs, ys, style, marker="o", markersize=3, label=impl)
        if copy_gbps:
            ax.axhline(copy_gbps, color="grey", linewidth=0.8, linestyle=":",
                       label="copy bandwidth")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)  # bandwidth from zero: no exaggerated gaps
        ax.set_title(" ".join(k for k in key if k), fontsize=10)
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s (minimal bytes)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title or FAMILY_TITLES.get(family, family))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(records: list[dict], out_dir: Path, stem: str,
                copy_gbps: float | None = None) -> tuple[list[Path], str | None]:
    """PNG per family with GB/s data: ``<out_dir>/<stem>-<family>.png``; (paths, reason)."""
    reason = matplotlib_missing()
    if reason:
        return [], reason
    paths = []
    for family in dict.fromkeys(r["family"] for r in records):
        p = plot_family(family, records, Path(out_dir) / f"{stem}-{family}.png", copy_gbps)
        if p is not None:
            paths.append(p)
    return paths, None
