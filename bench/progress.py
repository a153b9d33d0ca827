"""Progress while the benchmark runs: tqdm when present, plain lines otherwise."""

from __future__ import annotations

import sys
import time


class _Plain:
    """Minimal stand-in for tqdm: one line per step, with elapsed time."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.t0 = total, desc, 0, time.time()

    def set_postfix_str(self, text: str) -> None:
        print(f"[{self.n + 1}/{self.total}] {text} ({time.time() - self.t0:.0f} s)",
              file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        print(f"{self.desc}: {self.n}/{self.total} done in {time.time() - self.t0:.0f} s",
              file=sys.stderr, flush=True)


def progress(total: int, desc: str = "bench", plain: bool = False):
    """A progress object with ``set_postfix_str``, ``update``, ``write``, ``close``."""
    if not plain:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="case", dynamic_ncols=True,
                        file=sys.stderr)
        except Exception:  # noqa: BLE001 - tqdm missing: plain text
            pass
    return _Plain(total, desc)
