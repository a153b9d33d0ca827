"""fusedgrad.SyncBatchNorm over 2 and 3 gloo processes vs one BatchNorm over the whole batch
(mirrors ops/sync_batch_norm.py). Workers run on CPU with the Triton interpreter."""

import pytest
import torch
import torch.nn.functional as F

import fusedgrad as fg
from fusedgrad.sync_batch_norm import SyncBatchNorm

from _distributed import run_workers
from helpers import DEVICE, assert_close

C = 3


def _global_batch(sizes, spatial, dtype, seed):
    """Deterministic whole batch, upstream gradient and initial module state."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn((n, C) + spatial, generator=gen) * 2 + 1
    dy = torch.randn((n, C) + spatial, generator=gen)
    weight = torch.rand(C, generator=gen) + 0.5
    bias = torch.randn(C, generator=gen)
    return x.to(dtype), dy.to(dtype), weight, bias


def _param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce",
                "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "barrier")


def _count_collectives(log):
    """Record (name, elements sent) of every torch.distributed collective (in a worker)."""
    import torch.distributed as dist

    def wrap(name, fn):
        def counted(*args, **kwargs):
            sent = args[1] if name.startswith("all_gather") else args[0] if args else None
            log.append((name, sent.numel() if isinstance(sent, torch.Tensor) else None))
            return fn(*args, **kwargs)
        return counted

    for name in _COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _worker(rank, world_size, cases):
    """Run every case on this rank's slice; return what the parent compares."""
    log = []
    _count_collectives(log)
    results = []
    for sizes, spatial, dtype, memory_format, momentum, *act in cases:
        x, dy, weight, bias = _global_batch(sizes, spatial, dtype, seed=len(results))
        # An optional (activation, parameter): fused into the synchronised kernels.
        norm = (lambda bn, t, _a=tuple(act[0]): bn.norm(t, *_a)) if act else \
            (lambda bn, t: bn(t))
        start = sum(sizes[:rank])
        xs = x[start:start + sizes[rank]].contiguous(memory_format=memory_format)
        dys = dy[start:start + sizes[rank]]
        # float64 input gets float64 parameters and buffers; half input float32 ones.
        bn = SyncBatchNorm(C, momentum=momentum, dtype=_param_dtype(dtype))
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        xs.requires_grad_()
        outs = []
        for _ in range(2):  # two steps: running statistics and num_batches_tracked evolve
            xs.grad = None
            bn.weight.grad = bn.bias.grad = None
            log.clear()
            y = norm(bn, xs)
            forward_calls = list(log)
            log.clear()
            y.backward(dys)
            outs.append(dict(y=y.detach(), dx=xs.grad.clone(), dw=bn.weight.grad.clone(),
                             db=bn.bias.grad.clone(), forward_calls=forward_calls,
                             backward_calls=list(log),
                             stride_ok=y.stride() == xs.stride() or xs.numel() == 0))
        results.append(dict(steps=outs, rm=bn.running_mean.clone(), rv=bn.running_var.clone(),
                            nbt=bn.num_batches_tracked.clone(),
                            eval_y=norm(bn.eval(), xs.detach()).detach()))
    return results


# float64 activations for the reference (fusedgrad.batch_norm's names).
_REFERENCE_ACT = {
    "silu": lambda z, _p: F.silu(z),
    "gelu_tanh": lambda z, _p: F.gelu(z, approximate="tanh"),
    "leaky_relu": lambda z, p: F.leaky_relu(z, p),
}


def _check(world_results, cases):
    for case_index, (sizes, spatial, dtype, _fmt, momentum, *act) in enumerate(cases):
        x, dy, weight, bias = _global_batch(sizes, spatial, dtype, seed=case_index)
        activation = _REFERENCE_ACT[act[0][0]] if act else (lambda z, _p: z)
        param = act[0][1] if act else None
        # float64 reference: one BatchNorm over the concatenated batch, two steps.
        rm = torch.zeros(C, dtype=torch.float64)
        rv = torch.ones(C, dtype=torch.float64)
        for step in range(2):
            # detach(): a fresh leaf each step (x.double() of float64 is x itself).
            xr = x.detach().double().requires_grad_()
            wr = weight.detach().double().requires_grad_()
            br = bias.detach().double().requires_grad_()
            factor = 1.0 / (step + 1) if momentum is None else momentum
            yr = activation(F.batch_norm(xr, rm, rv, wr, br, training=True, momentum=factor),
                            param)
            yr.backward(dy.double())
            per_rank = [r[case_index]["steps"][step] for r in world_results]
            what = f"case {case_index} step {step}"
            assert all(p["stride_ok"] for p in per_rank), what
            # Exactly one collective each way: (count, mean, M2) and (sum dy, sum dy x_hat).
            for p in per_rank:
                assert p["forward_calls"] == [("all_gather", 3 * C)], p["forward_calls"]
                assert p["backward_calls"] == [("all_reduce", 2 * C)], p["backward_calls"]
            assert_close(torch.cat([p["y"] for p in per_rank]), yr, dtype, f"{what} y")
            assert_close(torch.cat([p["dx"] for p in per_rank]), xr.grad, dtype, f"{what} dx")
            # As torch's SyncBatchNorm: parameter gradients are per-rank partial sums.
            assert_close(sum(p["dw"] for p in per_rank), wr.grad, dtype, f"{what} dweight")
            assert_close(sum(p["db"] for p in per_rank), br.grad, dtype, f"{what} dbias")
        for r in world_results:
            assert_close(r[case_index]["rm"], rm, _param_dtype(dtype), "running_mean")
            assert_close(r[case_index]["rv"], rv, _param_dtype(dtype), "running_var")
            assert int(r[case_index]["nbt"]) == 2
        eval_ref = activation(F.batch_norm(x.double(), rm, rv, weight.double(), bias.double()),
                              param)
        assert_close(torch.cat([r[case_index]["eval_y"] for r in world_results]), eval_ref,
                     dtype, "eval y")


@pytest.mark.compat
def test_two_ranks_uneven_batches():
    cases = [
        ((3, 5), (4, 6), torch.float32, torch.contiguous_format, 0.1),  # uneven N
        ((2, 4), (7,), torch.float32, torch.contiguous_format, None),   # 1-D, cumulative
        ((4, 2), (5, 4), torch.float16, torch.channels_last, 0.1),      # half, NHWC
        ((5, 3), (), torch.bfloat16, torch.contiguous_format, 0.1),     # (N, C), bfloat16
        # Fused activations in the synchronised path (SyncBatchNormAct2d's), half dtypes.
        ((3, 2), (3, 4), torch.float16, torch.channels_last, 0.1, ("silu", None)),
        ((2, 3), (5,), torch.bfloat16, torch.contiguous_format, 0.1, ("gelu_tanh", None)),
    ]
    _check(run_workers(2, _worker, cases), cases)


def test_three_ranks_with_an_empty_rank():
    cases = [
        ((2, 0, 3), (4, 5), torch.float32, torch.channels_last, 0.1),   # rank 1 holds nothing
        ((1, 4, 2), (3, 2, 3), torch.float64, torch.contiguous_format, None),  # 3-D, float64
        # A fused activation with a parameter while one rank holds nothing.
        ((3, 0, 2), (2, 3), torch.float32, torch.contiguous_format, None, ("leaky_relu", 0.2)),
    ]
    _check(run_workers(3, _worker, cases), cases)


def _single_rank_worker(rank, world_size):
    # A world of one: no collective at all, plain BatchNorm.
    log = []
    _count_collectives(log)
    x = torch.randn(4, C, 5)
    bn, ref = SyncBatchNorm(C), torch.nn.BatchNorm1d(C)
    y = bn(x)
    y.sum().backward()
    return log, (y - ref(x)).abs().max().item(), (bn.running_var - ref.running_var).abs().max()


def test_world_size_one_is_batchnorm():
    log, y_diff, rv_diff = run_workers(1, _single_rank_worker)[0]
    assert log == [] and y_diff < 1e-5 and rv_diff < 1e-6


def test_not_distributed_is_batchnorm():
    # No process group: SyncBatchNorm is BatchNorm (torch's own refuses CPU tensors here).
    ref = torch.nn.BatchNorm2d(C, device=DEVICE)
    bn = SyncBatchNorm(C, device=DEVICE)
    assert isinstance(bn, torch.nn.SyncBatchNorm)
    bn.load_state_dict(ref.state_dict())
    x = torch.randn(4, C, 5, 6, device=DEVICE, requires_grad=True)
    y = bn(x)
    assert_close(y, ref(x), torch.float32, "y")
    assert_close(bn.running_var, ref.running_var, torch.float32, "running_var")
    assert fg.SyncBatchNorm is SyncBatchNorm


def test_convert_sync_batchnorm():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.Sequential(fg.BatchNorm1d(5, momentum=None)))
    weight = net[1].weight
    out = fg.convert_sync_batchnorm(net, process_group=None)
    assert type(out[1]) is SyncBatchNorm and type(out[2][0]) is SyncBatchNorm
    assert out[1].weight is weight and out[2][0].momentum is None


def _failing_worker(rank, world_size):
    if rank == 1:
        raise ValueError("expected failure on rank 1")


def test_run_workers_propagates_child_errors():
    with pytest.raises(RuntimeError, match="expected failure on rank 1"):
        run_workers(2, _failing_worker)


def _double_backward_worker(rank, world_size):
    bn = SyncBatchNorm(C)
    x = torch.randn(3, C, 4, requires_grad=True)
    y = bn(x)
    # create_graph=True itself works; differentiating the gradient must fail loudly, not
    # silently drop SyncBatchNorm's second-order terms.
    (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    try:
        (gx * gx).sum().backward()
    except RuntimeError as e:
        return gx.requires_grad, str(e)
    return gx.requires_grad, None


def test_double_backward_raises_clearly():
    for connected, message in run_workers(2, _double_backward_worker):
        assert connected and message is not None
        assert "SyncBatchNorm: double backward" in message and "not supported" in message
