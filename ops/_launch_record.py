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


# A planned launch: a function of the tensor arguments only (see make_launch).
Launch = Callable[..., None]


def make_launch(kernel, grid: tuple, tensors: tuple[str, ...], scalars: tuple,
                options: dict) -> Launch:
    """One kernel launch decided ahead of the call: ``launch(*tensors)`` runs
    ``kernel[grid](*tensors, *scalars, **options)``.

    ``tensors`` names the kernel's tensor arguments, in order; the scalar arguments that
    follow them and the constexprs and launch options are fixed here. The tensors only
    provide data pointers (and dtypes): shapes and strides are among the scalars, so a
    tensor may be passed as any view of the planned one with the same first element
    (e.g. the (N, C) logits for their (N, 1, C) rows view).

    The launch is a generated function with every scalar and option spelled out as an
    argument of ``kernel.run`` (what ``kernel[grid](...)`` calls, without the proxy it
    builds per launch): a call with literal keywords costs ~0.3 us less than one unpacking
    a dict, and a plain function call less than a method forwarding ``*args``. ``run`` is
    looked up per call: whatever ``run`` the kernel's class has then (bench/host.py stubs
    it). The function carries ``kernel``, ``grid``, ``tensors``, ``scalars`` and
    ``options`` as attributes.
    """
    namespace = {"kernel": kernel, "grid": grid}
    args = list(tensors)
    for i, value in enumerate(scalars):
        namespace[f"s{i}"] = value
        args.append(f"s{i}")
    for name, value in options.items():
        namespace[f"o_{name}"] = value
        args.append(f"{name}=o_{name}")
    args += ["grid=grid", "warmup=False"]
    name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
    source = (f"def launch_{name}({', '.join(tensors)}):\n"
              f"    kernel.run({', '.join(args)})\n")
    exec(source, namespace)  # noqa: S102  (built from identifiers above, values bound by name)
    launch = namespace[f"launch_{name}"]
    launch.kernel, launch.grid, launch.tensors = kernel, grid, tensors
    launch.scalars, launch.options = scalars, options
    return launch


def NO_LAUNCH(*tensors) -> None:  # noqa: N802  (a constant, like the launches it stands for)
    """Nothing to launch (e.g. no rows)."""
