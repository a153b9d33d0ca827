"""Triton 3.6's interpreter under numpy >= 2.4.

The interpreter turns a scalar Triton tensor into a Python int with ``int(array)``, where
the array has shape (1,). numpy 2.4 removed that conversion (deprecated since 1.25), so
every kernel that loops over a runtime bound fails with "only 0-dimensional arrays can be
converted to Python scalars". The device machine's image has numpy 2.5; the distributed
tests' gloo workers run the interpreter there. ``apply()`` patches the one conversion
(``.item()`` gives the same int for a one-element array) and reports whether the
interpreter is usable; callers skip with ``REASON`` when it is not.
"""

from __future__ import annotations

REASON = ("Triton's interpreter cannot run here: Triton {triton} with numpy {numpy} "
          "(numpy >= 2.4 removed int() of a one-element array, which that interpreter uses) "
          "and the compatibility patch in tests/_interp_compat.py did not apply")


def _numpy_needs_patch() -> bool:
    import numpy as np

    try:
        int(np.zeros((1,), dtype=np.int32))
    except TypeError:
        return True
    return False


def usable() -> bool:
    """Whether the interpreter can run in a process that calls apply() (without patching
    anything here: the caller may be running compiled kernels)."""
    if not _numpy_needs_patch():
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    return hasattr(interpreter, "_patch_lang_tensor")


def apply() -> bool:
    """Patch the interpreter if this numpy needs it; True when the interpreter can run."""
    if not _numpy_needs_patch():
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False  # internals moved: a newer Triton, which may not need the patch
    if getattr(original, "_fusedgrad_numpy_patch", False):
        return True

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._fusedgrad_numpy_patch = True
    interpreter._patch_lang_tensor = patched
    return True


def reason() -> str:
    import numpy as np
    import triton

    return REASON.format(triton=triton.__version__, numpy=np.__version__)
