"""Run a test function in several gloo processes on CPU (Triton interpreter in each child).

    from _distributed import run_workers

    def _body(rank, world_size, shape):      # module-level (pickled by reference)
        ...                                   # torch.distributed is initialised (gloo)
        return some_picklable_result

    results = run_workers(2, _body, (4, 3))   # [result of rank 0, result of rank 1]

The children are spawned (not forked), set ``TRITON_INTERPRET=1`` before anything imports
Triton (patched for numpy >= 2.4 by tests/_interp_compat.py; where that cannot work the
test skips with the reason), join a gloo process group on a free localhost port, run
``fn(rank, world_size, *args)`` and send back its return value. A child's exception fails
the parent with the child's traceback; a child that hangs is killed after ``timeout`` seconds.
"""

import os
import pickle
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, payload: bytes, results) -> None:
    # Before unpickling `fn` (which imports its module, hence fusedgrad, hence triton).
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        # The test suite's conftest must come first (it refuses a Triton imported before it);
        # test modules may import fusedgrad before helpers/conftest.
        import torch.distributed as dist

        import _interp_compat
        import conftest  # noqa: F401

        if not _interp_compat.apply():
            raise RuntimeError(_interp_compat.reason())
        fn, args = pickle.loads(payload)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        # Every rank has connected before any may finish and tear the group down (a fast rank
        # leaving early breaks a slow rank's connection set-up).
        dist.barrier()
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: B036 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def run_workers(world_size: int, fn, *args, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return the
    per-rank return values (rank order). ``fn`` and ``args`` must be picklable (``fn``
    defined at module level). Skips the calling test, with the reason, where Triton's
    interpreter cannot run (tests/_interp_compat.py), e.g. on a CUDA machine whose numpy
    is too new for its Triton's interpreter."""
    import _interp_compat

    if not _interp_compat.usable():
        import pytest

        pytest.skip(_interp_compat.reason())
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    payload = pickle.dumps((fn, args))
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(rank, world_size, port, payload, results),
                         daemon=True) for rank in range(world_size)]
    for p in procs:
        p.start()
    outs, failures = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(outs) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and failures:
                break
            if remaining <= 0:
                raise TimeoutError(f"run_workers: {world_size - len(outs) - len(failures)} "
                                   f"worker(s) still running after {timeout:.0f} s")
            try:
                rank, ok, data = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(dead) > len(failures):
                    raise RuntimeError(f"run_workers: a worker died with exit code "
                                       f"{dead[0].exitcode} without reporting") from None
                continue
            if ok:
                outs[rank] = pickle.loads(data)
            else:
                failures.append((rank, data))
                # The others may now fail too (a peer left the collective) or hang: give
                # them a moment to report, then fail with every traceback.
                deadline = min(deadline, time.monotonic() + 3.0)
    finally:
        for p in procs:
            p.join(timeout=0 if failures else 5)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        ranks = ", ".join(str(r) for r, _ in failures)
        details = "\n".join(f"--- worker rank {r} ---\n{tb}" for r, tb in failures)
        raise RuntimeError(f"run_workers: worker rank(s) {ranks} failed (tracebacks in the "
                           f"order they reported):\n{details}")
    return [outs[r] for r in range(world_size)]
