"""fusedgrad.convert_batchnorm / convert_sync_batchnorm and their reports (mirrors
ops/batch_norm_convert.py). timm models: test_batch_norm_timm.py (extras)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fusedgrad as fg

from _distributed import run_workers
from helpers import DEVICE, assert_close


class MyBatchNorm(nn.BatchNorm2d):
    """A user's subclass: its forward differs, so no converter may replace it."""

    def forward(self, x):
        return super().forward(x) + 1


class FrozenBatchNorm2d(nn.Module):
    """Stand-in for torchvision's/timm's frozen batch norm (recognised by its name)."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))

    def forward(self, x):
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _small_net():
    net = _small_net_layers()
    with torch.no_grad():  # non-trivial affine parameters: no symmetric, near-zero gradients
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return net


def _small_net_layers():
    # Convolutions without bias and a ReLU between consecutive norms: a bias (or scale) feeding
    # straight into BatchNorm has an exactly-zero gradient, whose rounding noise no relative
    # comparison can judge.
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 5, 3, padding=1, bias=False), torch.nn.BatchNorm2d(5, momentum=None),
        torch.nn.ReLU(), torch.nn.Flatten(2), torch.nn.BatchNorm1d(5), torch.nn.Flatten(),
        torch.nn.Linear(5 * 36, 4),
    ).to(DEVICE)


def test_convert_batchnorm_conv_net():
    net = _small_net()
    ref = copy.deepcopy(net)
    old_params = {id(p) for p in net.parameters()}
    fused = fg.convert_batchnorm(net)
    kinds = [type(m) for m in fused.modules()]
    assert fg.BatchNorm2d in kinds and fg.BatchNorm1d in kinds
    assert torch.nn.BatchNorm2d not in kinds  # exact torch type replaced everywhere
    assert {id(p) for p in fused.parameters()} == old_params  # same Parameter objects
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, device=DEVICE)
        if step == 2:
            fused.eval()
            ref.eval()
        lr, lf = ref(x).square().sum(), fused(x).square().sum()
        lr.backward()
        lf.backward()
        assert_close(lf, lr, torch.float32, f"step {step} loss")
        for (name, pr), pf in zip(ref.named_parameters(), fused.parameters(), strict=True):
            assert_close(pf.grad, pr.grad, torch.float32, f"step {step} grad {name}")
        for (name, br), bf in zip(ref.named_buffers(), fused.buffers(), strict=True):
            if br.is_floating_point():
                assert_close(bf, br, torch.float32, f"step {step} {name}")
            else:
                assert torch.equal(bf, br)


def test_convert_batchnorm_root_and_training_flag():
    bn = torch.nn.BatchNorm3d(3, affine=False, device=DEVICE).eval()
    out = fg.convert_batchnorm(bn)
    assert type(out) is fg.BatchNorm3d and not out.training and out.weight is None
    assert out.running_mean is bn.running_mean


def test_convert_batchnorm_report():
    net = nn.Sequential(nn.BatchNorm2d(4), nn.SyncBatchNorm(4), fg.BatchNorm2d(4),
                        MyBatchNorm(4), nn.Sequential(FrozenBatchNorm2d(4), nn.BatchNorm1d(4)),
                        fg.BatchNormAct2d(4))
    out, report = fg.convert_batchnorm(net, report=True)
    assert out is net
    assert [(path, new) for path, _, new in report.converted] == [
        ("0", "fusedgrad.batch_norm_modules.BatchNorm2d"),
        ("4.1", "fusedgrad.batch_norm_modules.BatchNorm1d")]
    left = {path: why for path, _, why in report.left}
    assert list(left) == ["1", "2", "3", "4.0", "5"]
    assert "convert_sync_batchnorm" in left["1"]
    assert "already" in left["2"] and "already" in left["5"]
    assert "subclass" in left["3"] and "frozen" in left["4.0"]
    assert type(net[3]) is MyBatchNorm and type(net[4][0]) is FrozenBatchNorm2d
    assert report.counts() == {
        "torch.nn.modules.batchnorm.BatchNorm2d -> fusedgrad.batch_norm_modules.BatchNorm2d": 1,
        "torch.nn.modules.batchnorm.BatchNorm1d -> fusedgrad.batch_norm_modules.BatchNorm1d": 1}
    assert str(report).startswith("converted 2, left 5")


def test_lazy_batch_norm_converts_after_its_first_forward():
    net = nn.Sequential(nn.LazyBatchNorm2d())
    _, report = fg.convert_batchnorm(net, report=True)
    assert report.converted == [] and "run one forward" in report.left[0][2]
    net(torch.randn(2, 3, 4, 4, device=DEVICE))  # LazyBatchNorm2d becomes nn.BatchNorm2d
    _, report = fg.convert_batchnorm(net, report=True)
    assert type(net[0]) is fg.BatchNorm2d and report.left == []


def _act_net():
    """Conv net with BatchNorm + activation layers (one fusable activation, one not, one
    behind a drop layer) and a plain BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, bias=False), fg.BatchNormAct2d(5, act_layer=nn.SiLU),
        nn.Conv2d(5, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        fg.BatchNormAct2d(4, act_layer=nn.Mish, drop_layer=nn.Identity),
        nn.Conv2d(4, 3, 1, bias=False), fg.BatchNormAct2d(3, act_layer=nn.ReLU),
    )


def _net_with_params(seed):
    torch.manual_seed(seed)
    net = _act_net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return net


def test_convert_sync_batchnorm_keeps_activations():
    # torch's converter (and fusedgrad's before) replaced BatchNormAct2d by a plain
    # SyncBatchNorm: the activation vanished and outputs went negative after a ReLU.
    net = _net_with_params(0).to(DEVICE)
    ref = copy.deepcopy(net)
    acts = [net[1].act, net[6].act, net[8].act]
    out, report = fg.convert_sync_batchnorm(net, report=True)
    assert [type(out[i]) for i in (1, 3, 6, 8)] == [fg.SyncBatchNormAct2d, fg.SyncBatchNorm,
                                                    fg.SyncBatchNormAct2d, fg.SyncBatchNormAct2d]
    assert [out[1].act, out[6].act, out[8].act] == acts  # the same module objects
    assert len(report.converted) == 4 and report.left == []
    x = torch.randn(4, 3, 6, 6, device=DEVICE)
    y = out(x)
    assert (y >= 0).all()  # the last layer's ReLU is there
    assert_close(y, ref(x), torch.float32, "y (one process: no synchronisation)")


def test_convert_sync_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                        nn.Sequential(fg.BatchNorm1d(5, momentum=None)), nn.SyncBatchNorm(2))
    weight = net[1].weight
    out = fg.convert_sync_batchnorm(net, process_group=None)
    assert [type(m) for m in (out[1], out[2][0], out[3])] == [fg.SyncBatchNorm] * 3
    assert out[1].weight is weight and out[2][0].momentum is None


def test_convert_sync_batchnorm_leaves_unknown_subclasses_with_a_warning():
    net = nn.Sequential(MyBatchNorm(4), FrozenBatchNorm2d(4), fg.SyncBatchNorm(4))
    with pytest.warns(UserWarning, match="0: .*MyBatchNorm.*left as is") as record:
        out, report = fg.convert_sync_batchnorm(net, report=True)
    assert len(record) == 1  # frozen and already-synced modules leave without a warning
    assert [type(m) for m in out] == [MyBatchNorm, FrozenBatchNorm2d, fg.SyncBatchNorm]
    assert [path for path, _, _ in report.left] == ["0", "1", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fg.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))


def sync_worker(rank, world_size, build, x, dy):
    """Rank's slice of x through convert_sync_batchnorm(build()) in training mode, two steps;
    returns outputs, input gradients, parameter gradients (local sums) and buffers."""
    model = fg.convert_sync_batchnorm(build())
    act_calls = {}
    for name, m in model.named_modules():
        if name.endswith(".act"):
            act_calls[name] = 0
            m.register_forward_hook(
                lambda m, i, o, _n=name: act_calls.update({_n: act_calls[_n] + 1}))
    n = x.shape[0] // world_size
    outs = []
    for step in range(2):
        xs = x[rank * n:(rank + 1) * n].clone().requires_grad_()
        model.zero_grad()
        y = model(xs)
        y.backward(dy[step][rank * n:(rank + 1) * n])
        outs.append(dict(y=y.detach(), dx=xs.grad,
                         grads={k: p.grad for k, p in model.named_parameters()}))
    kinds = sorted({type(m).__name__ for m in model.modules()})
    return outs, {k: b for k, b in model.named_buffers()}, kinds, act_calls


def check_sync_matches_one_process(build, x, dy, world_size=2):
    """convert_sync_batchnorm over ``world_size`` gloo ranks vs the unconverted model on the
    whole batch in one process."""
    results = run_workers(world_size, sync_worker, build, x, dy)
    ref = build()
    for step in range(2):
        xr = x.clone().requires_grad_()
        ref.zero_grad()
        yr = ref(xr)
        yr.backward(dy[step])
        what = f"step {step}"
        assert_close(torch.cat([r[0][step]["y"] for r in results]), yr, torch.float32,
                     f"{what} y")
        assert_close(torch.cat([r[0][step]["dx"] for r in results]), xr.grad, torch.float32,
                     f"{what} dx")
        for name, p in ref.named_parameters():
            # Each rank's gradient is the sum over its slice (DDP then averages).
            total = sum(r[0][step]["grads"][name] for r in results)
            assert_close(total, p.grad, torch.float32, f"{what} grad {name}")
    for _, buffers, _, _ in results:
        for name, b in ref.named_buffers():
            if b.is_floating_point():
                assert_close(buffers[name], b, torch.float32, name)
            else:
                assert torch.equal(buffers[name], b), name
    return results


def _build_act_net():
    return _net_with_params(0)


def test_convert_sync_batchnorm_two_ranks_matches_one_process():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 6, generator=gen) + 0.5
    dy = torch.randn(2, 4, 3, 5, 6, generator=gen)
    results = check_sync_matches_one_process(_build_act_net, x, dy)
    assert "SyncBatchNormAct2d" in results[0][2] and "BatchNormAct2d" not in results[0][2]
    # Synchronised and fused: SiLU and ReLU run inside the kernel, Mish as its module.
    assert results[0][3] == {"1.act": 0, "6.act": 2, "8.act": 0}
