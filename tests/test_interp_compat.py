"""tests/_interp_compat.py and run_workers' skip: Triton 3.6's interpreter under numpy >= 2.4
(the device machine's numpy), where the distributed tests' gloo workers must either work
(patched) or skip with the stated reason."""

import pytest
import torch

import fusedgrad as fg

import _interp_compat
from _distributed import run_workers
from helpers import DEVICE


def _never_called(rank, world_size):  # pragma: no cover - the test skips before spawning
    raise AssertionError("run_workers spawned workers although the interpreter cannot run")


def test_run_workers_skips_where_the_interpreter_cannot_run(monkeypatch):
    from triton.runtime import interpreter

    # numpy >= 2.4 and a Triton whose interpreter has no patch point: skip, with the reason.
    monkeypatch.setattr(_interp_compat, "_numpy_needs_patch", lambda: True)
    monkeypatch.delattr(interpreter, "_patch_lang_tensor")
    with pytest.raises(pytest.skip.Exception, match=r"numpy .*>= 2\.4"):
        run_workers(2, _never_called)


@pytest.mark.skipif(DEVICE != "cpu", reason="the patch is for Triton's interpreter (CPU runs)")
def test_patched_interpreter_runs_kernels(monkeypatch):
    from triton.runtime import interpreter

    # Force the patch (this numpy may not need it) and run kernels that loop over runtime
    # bounds (__index__ of a scalar Triton tensor): the patched conversion must give the
    # same results. monkeypatch restores the original function afterwards.
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", interpreter._patch_lang_tensor)
    monkeypatch.setattr(_interp_compat, "_numpy_needs_patch", lambda: True)
    assert _interp_compat.apply()
    assert getattr(interpreter._patch_lang_tensor, "_fusedgrad_numpy_patch", False)
    x = torch.randn(3, 70)
    t = torch.randint(0, 70, (3,))
    torch.testing.assert_close(fg.cross_entropy(x, t),
                               torch.nn.functional.cross_entropy(x, t))
