"""Test set-up shared by every test module.

With no CUDA device the suite switches Triton to its interpreter, which must be
decided before ``triton`` is first imported: the kernels then run on CPU tensors.
On a CUDA machine the same tests run the compiled kernels on the GPU.
"""

import os
import sys

if "triton" in sys.modules:  # pragma: no cover - guards the ordering assumption
    raise RuntimeError("triton was imported before tests/conftest.py could choose the backend")

import torch  # noqa: E402  (torch does not import triton at import time)

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
if os.environ.get("TRITON_INTERPRET") == "1":
    import _interp_compat  # noqa: E402

    # numpy >= 2.4 with Triton 3.6's interpreter (see tests/_interp_compat.py).
    INTERPRETER_USABLE = _interp_compat.apply()

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def world_of_one():
    """A gloo process group of this process alone (rank 0 of 1), for the vocab-parallel and
    SyncBatchNorm code paths in-process; destroyed after the test."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random data per test, but reproducible per test run.
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _poison_outputs():
    # Every output buffer a fusedgrad launcher allocates starts as NaN in tests,
    # so an element a kernel forgot to write cannot pass a comparison.
    from fusedgrad import _alloc

    with _alloc.poisoned_outputs():
        yield
