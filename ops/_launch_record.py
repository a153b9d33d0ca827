"""Kernel launches decided once per call signature, and the caches that hold them.

A launcher is split in two halves. The plan half decides everything that depends only on
shapes, strides, dtypes, the device and scalar argument values (path, grid, constexprs,
launch options, the packed scalar arguments) and returns :class:`Launch` records; it is
cached. The launch half passes the tensors and nothing else, so a call whose signature was
seen before costs a dictionary lookup and the launches themselves.

Cached plans read module-level tunables of the launcher modules (ops/_ce_launch.py's
``FORCE_PATH``, block widths, ``needs_large_offsets``...), which tests and benchmarks set
with ``setattr`` (pytest's monkeypatch). Such a module is *watched* (:func:`watch`):
setting any of its attributes clears every registered cache, so a changed tunable takes
effect on the next call. (Mutating a tunable dict in place is not seen: assign a new one.)
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable

# Clear functions of every cache holding plans (cached_plan functions, callers' dicts).
_CLEARERS: list[Callable[[], None]] = []
# Entries per cached plan function: enough for every shape of a training run
# (a few per model); a run with ever-changing shapes re-plans the least recent.
PLAN_CACHE_SIZE = 512


def cached_plan(fn):
    """A plan function, memoised on its (hashable) arguments; cleared by :func:`invalidate`."""
    cached = functools.lru_cache(maxsize=PLAN_CACHE_SIZE)(fn)
    _CLEARERS.append(cached.cache_clear)
    return cached


def register_cache(clear: Callable[[], None]) -> None:
    """Have :func:`invalidate` call ``clear`` (e.g. a caller's ``dict.clear``)."""
    _CLEARERS.append(clear)


def invalidate() -> None:
    """Drop every cached plan (a tunable changed)."""
    for clear in _CLEARERS:
        clear()


class _WatchedModule(types.ModuleType):
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        invalidate()

    def __delattr__(self, name):
        super().__delattr__(name)
        invalidate()


def watch(module_name: str) -> None:
    """Invalidate the cached plans whenever an attribute of this module is set."""
    sys.modules[module_name].__class__ = _WatchedModule


class Launch:
    """One kernel launch decided ahead of the call: the kernel, its grid, the scalar
    arguments that follow the tensors, and the constexprs and launch options.

    ``launch(*tensors)`` runs ``kernel[grid](*tensors, *scalars, **options)``. The tensors
    only provide data pointers (and dtypes): shapes and strides are in ``scalars``, so a
    tensor may be passed as any view of the planned one with the same first element
    (e.g. the (N, C) logits for their (N, 1, C) rows view).
    """

    __slots__ = ("kernel", "grid", "scalars", "options", "_run")

    def __init__(self, kernel, grid: tuple, scalars: tuple, options: dict):
        self.kernel = kernel
        self.grid = grid
        self.scalars = scalars
        self.options = options
        self._run = kernel[grid]  # Triton's launcher for this grid, built once

    def __call__(self, *tensors) -> None:
        self._run(*tensors, *self.scalars, **self.options)

    def __repr__(self) -> str:
        name = getattr(getattr(self.kernel, "fn", self.kernel), "__name__", "?")
        return f"Launch({name}, grid={self.grid}, {self.options})"


class _NoLaunch:
    """Nothing to launch (e.g. no rows)."""

    __slots__ = ()

    def __call__(self, *tensors) -> None:
        pass

    def __repr__(self) -> str:
        return "NO_LAUNCH"


NO_LAUNCH = _NoLaunch()
