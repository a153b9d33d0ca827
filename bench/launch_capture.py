"""Every kernel launch fusedgrad's launchers make, recorded from real calls (for
``python -m bench static``).

The public ops run on small CPU tensors over a grid of shapes, dtypes, layouts and
features chosen to cross every switch of the launchers' heuristics, with Triton's
launches stubbed (bench/host.py): each launch is recorded (kernel, argument summaries,
constexprs and launch options such as num_warps, num_stages, maxnreg), never run. The
offline compile (bench/static_check.py) types the arguments with Triton's own
specialisation, so no kernel's parameter list is restated anywhere.

Two passes: the grid as it is, and the grid again with the launchers' int64-offset
decision forced on (``needs_large_offsets``; a real int64 case needs > 2^31 elements):
the LARGE_OFFSETS variants are compiled with 32-bit stride arguments, the kernels
computing every address in 64 bits either way.

Run as ``python -m bench.launch_capture OUT`` in a process with TRITON_INTERPRET=1 (CPU
tensors need the interpreter's kernels); bench/static.py does that and reads OUT back.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Iterator

# Vocabulary sizes: both sides of every block-size switch of the CE launchers (powers of two
# and one more) up to past 256k, and the LLM vocabularies.
CE_VOCABS = (1, 128, 129, 1024, 1025, 2048, 2049, 4096, 4097, 8192, 8193, 16384, 16385,
             32000, 65537, 128256, 262144, 262145)
# BatchNorm inner extents (spatial size, or channels for channels_last) across its tiles;
# each tile also gets a multiple of 16 (the aligned variant real shapes hit). Channels_last
# C = 1, 3, 8: flat tiles (one row; padded rows; the widest power of two).
BN_EXTENTS = (1, 3, 8, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513, 1024, 1025, 2048,
              2049, 4096, 4097)


def _kernel_ref(fn) -> tuple[str, str]:
    inner = getattr(fn, "fn", fn)
    return inner.__module__, inner.__name__


def _ce_calls(torch, fg) -> Iterator[tuple[str, Callable]]:
    F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    for dtype in (F32, BF16, F16, F64):
        for vocab in CE_VOCABS:
            for prob in (False, True):
                def call(dtype=dtype, vocab=vocab, prob=prob):
                    x = torch.randn(2, vocab).to(dtype).requires_grad_(True)
                    t = (torch.rand(2, vocab, dtype=dtype) if prob
                         else torch.randint(0, vocab, (2,)))
                    fg.cross_entropy(x, t).backward()
                    # reduction="none": a per-row grad_output for the rescale kernel
                    fg.cross_entropy(x, t, reduction="none").backward(torch.rand(2).to(dtype))
                    # class weights and label smoothing, alone and together (kernels
                    # may specialise on each)
                    w = torch.rand(vocab)
                    fg.cross_entropy(x.detach(), t, weight=w)
                    fg.cross_entropy(x.detach(), t, label_smoothing=0.1)
                    fg.cross_entropy(x.detach(), t, weight=w, label_smoothing=0.1,
                                     z_loss=1e-4, softcap=30.0)
                    if prob:  # the probability-target gradient kernel (target.requires_grad)
                        fg.cross_entropy(x.detach(), t.clone().requires_grad_(), weight=w,
                                         softcap=30.0).backward()
                yield f"ce {dtype} V={vocab} prob={prob}", call

    def features(dtype):
        x = torch.randn(3, 300).to(dtype)
        t = torch.randint(0, 300, (3,))
        xg = x.clone().requires_grad_(True)
        loss = fg.cross_entropy(xg * 1, t, reduction="none")
        loss.backward(torch.rand(3).to(dtype))  # per-row grad_output
        (fg.cross_entropy(xg, t, reduction="sum") * 2).backward()
        fg.cross_entropy(x, t, reduction="sum", divisor=torch.tensor(7))
        fg.cross_entropy(x, t, reduction="sum", divisor=torch.tensor(7.0))
        fg.cross_entropy(x, t, reduction="sum", divisor=3.0)
        fg.cross_entropy(x, t.to(torch.int32))
        fg.cross_entropy(xg * 1, t, inplace_backward=True).backward()
        # spatial logits (N, C, H, W): the class axis is strided
        xs = torch.randn(2, 7, 3, 4).to(dtype).requires_grad_(True)
        fg.cross_entropy(xs, torch.randint(0, 7, (2, 3, 4))).backward()
        fg.cross_entropy(xs, torch.softmax(torch.randn(2, 7, 3, 4), 1).to(dtype)).backward()

    for dtype in (F32, BF16, F16, F64):
        yield f"ce features {dtype}", lambda dtype=dtype: features(dtype)


def _vocab_parallel_calls(torch, fg) -> Iterator[tuple[str, Callable]]:
    import torch.distributed as dist

    if not dist.is_available():
        return

    def call(dtype, vocab, prob):
        x = torch.randn(2, vocab).to(dtype).requires_grad_(True)
        t = torch.rand(2, vocab, dtype=dtype) if prob else torch.randint(0, vocab, (2,))
        group = dist.group.WORLD
        fg.cross_entropy(x, t, process_group=group).backward()
        fg.cross_entropy(x.detach(), t, weight=torch.rand(vocab), process_group=group)

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for vocab in (1, 129, 1025, 5000):
            for prob in (False, True):
                yield (f"vocab-parallel {dtype} V={vocab} prob={prob}",
                       lambda d=dtype, v=vocab, p=prob: call(d, v, p))


def _bn_calls(torch, fg) -> Iterator[tuple[str, Callable]]:
    acts = sorted(getattr(fg.batch_norm, "FUSED_ACTIVATIONS", ()) or [None])

    def call(dtype, shape, channels_last, activation):
        x = torch.randn(*shape).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        C = shape[1]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        rm, rv = torch.zeros(C, dtype=acc), torch.ones(C, dtype=acc)
        w = torch.rand(C, dtype=acc).requires_grad_(True)
        b = torch.rand(C, dtype=acc).requires_grad_(True)
        kw = {"activation": activation} if activation else {}
        fg.batch_norm(x, rm, rv, w, b, training=True, **kw).sum().backward()
        fg.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), training=False, **kw)
        fg.batch_norm(x, None, None, None, None, training=True, residual=x.detach(),
                      **kw).sum().backward()

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for extent in BN_EXTENTS:
            # spatial-inner (contiguous, S = extent) and channel-inner (channels_last,
            # C = extent) layouts; the other extent 16 (aligned sizes and strides)
            yield (f"bn {dtype} S={extent}",
                   lambda d=dtype, e=extent: call(d, (2, 16, e, 1), False, None))
            yield (f"bn {dtype} cl C={extent}",
                   lambda d=dtype, e=extent: call(d, (2, e, 4, 4), True, None))
        for act in acts:
            # every fused activation at the widest tile of each layout (the most registers;
            # an activation adds the same few to every tile): S = 4096 spatial-inner,
            # C = 128 channel-inner
            yield (f"bn {dtype} act={act}",
                   lambda d=dtype, a=act: (call(d, (2, 16, 4096, 1), False, a),
                                           call(d, (2, 128, 4, 4), True, a)))
            if dtype in (torch.float32, torch.bfloat16):
                # flat tiles (channels_last, C <= 8) with each activation at the most
                # registers: C = 7 (per-lane parameters vary along both tile axes, the
                # longest select) and C = 8 (the widest power-of-two tile). fp16 compiles
                # like bf16.
                yield (f"bn {dtype} flat act={act}",
                       lambda d=dtype, a=act: (call(d, (2, 7, 4, 4), True, a),
                                               call(d, (2, 8, 4, 4), True, a)))

    def sync_call(dtype):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return
        import importlib

        # the function, not the module: like torch's, a world of one takes the local path
        sync = importlib.import_module("fusedgrad.sync_batch_norm").sync_batch_norm
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.randn(2, 16, 4, 4).to(dtype).requires_grad_(True)
        w = torch.rand(16, dtype=acc).requires_grad_(True)
        sync(x, torch.zeros(16, dtype=acc), torch.ones(16, dtype=acc), w,
             torch.zeros(16, dtype=acc), 0.1, 1e-5).sum().backward()

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        yield f"sync bn {dtype}", lambda d=dtype: sync_call(d)


def _lce_calls(torch, fg) -> Iterator[tuple[str, Callable]]:
    lce = getattr(fg, "linear_cross_entropy", None)
    if lce is None:
        return
    for dtype in (torch.float32, torch.bfloat16):
        def call(dtype=dtype):
            x = torch.randn(4, 16).to(dtype).requires_grad_(True)
            w = torch.randn(300, 16).to(dtype).requires_grad_(True)
            lce(x, w, torch.randint(0, 300, (4,))).backward()
        yield f"linear_cross_entropy {dtype}", call


CALL_SOURCES = (_ce_calls, _vocab_parallel_calls, _bn_calls, _lce_calls)


@contextlib.contextmanager
def _forced_large_offsets():
    """The launchers' int64-offset decision forced on (see the module docstring)."""
    import importlib

    patched = []
    for name in ("fusedgrad._ce_launch", "fusedgrad._bn_launch"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "needs_large_offsets"):
            patched.append((mod, mod.needs_large_offsets))
            mod.needs_large_offsets = lambda *tensors: True
    try:
        yield
    finally:
        for mod, fn in patched:
            mod.needs_large_offsets = fn


@contextlib.contextmanager
def _world_of_one():
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def collect() -> tuple[list[tuple], list[str]]:
    """(records, errors): records are (kernel module, kernel name, args, kwargs) of every
    distinct launch; errors describe calls of the grid that raised."""
    import torch

    import fusedgrad as fg

    from .host import stubbed_launches

    torch.manual_seed(0)
    seen, records, errors = set(), [], []
    with _world_of_one(), stubbed_launches(record=True) as counter:
        for large in (False, True):
            ctx = _forced_large_offsets() if large else contextlib.nullcontext()
            with ctx:
                for source in CALL_SOURCES:
                    for label, call in source(torch, fg):
                        start = len(counter.calls)
                        try:
                            call()
                        except Exception as exc:  # noqa: BLE001 - reported, fails the run
                            tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
                            errors.append(f"{label}{' (large offsets)' if large else ''}: "
                                          f"{type(exc).__name__}: {exc} [{tb}]")
                        for fn, _grid, args, kwargs in counter.calls[start:]:
                            rec = (*_kernel_ref(fn), args, kwargs)
                            key = repr(rec)
                            if key not in seen:
                                seen.add(key)
                                records.append(rec)
                        del counter.calls[start:]
    return records, errors


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("bench.launch_capture: run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    records, errors = collect()
    with open(argv[0], "wb") as f:
        pickle.dump({"records": records, "errors": errors}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
