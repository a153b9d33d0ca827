"""SyncBatchNorm on fusedgrad's BatchNorm kernels: batch statistics over every rank.

Collectives per training step (world size R > 1, C channels, acc = float32 or float64):
  forward:  one all_gather of each rank's (count, mean, M2) per channel: 3C acc values per
            rank in, 3RC out. Ranks may hold different batch sizes, including none; the
            per-rank statistics are merged on the device with Chan's formula in rank order.
  backward: one all_reduce (sum) of [sum g, sum g * x_hat]: 2C acc values (g = dy, or
            dy * act'(z) with a fused activation); then the same elementwise dx kernel as
            BatchNorm with the global count.
Running statistics use the global count (unbiased variance). As torch.nn.SyncBatchNorm,
weight and bias gradients are each rank's local sums (DDP averages them like any other
parameter gradient). Nothing is read back to the host. Outside a distributed run, with a
world size of 1, or in eval, the module is plain fusedgrad BatchNorm.
"""

import torch
import torch.distributed as dist

from . import _alloc
from . import _bn_launch as L
from ._bn_validate import validate, validate_epilogue, validate_module_args
from .batch_norm import ACTIVATIONS, LEAKY_RELU_DEFAULT_SLOPE, as_acc
from .batch_norm_modules import module_batch_norm, module_state


def _all_gather_stats(local: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """[R, 3, C]: every rank's local (count, mean, M2), in rank order (one collective)."""
    out = torch.empty((world_size,) + tuple(local.shape), dtype=local.dtype,
                      device=local.device)
    if dist.get_backend(group) == "nccl":
        dist.all_gather_into_tensor(out, local, group=group)
    else:  # gloo has no all_gather_into_tensor; still one collective
        dist.all_gather(list(out.unbind(0)), local, group=group)
    return out


_DOUBLE_BACKWARD_ERROR = (
    "fusedgrad.SyncBatchNorm: double backward (differentiating SyncBatchNorm's gradient, e.g. "
    "torch.autograd.grad(..., create_graph=True) then backward through the result) is not "
    "supported; use torch.nn.SyncBatchNorm for higher-order gradients")


class _NoDoubleBackward(torch.autograd.Function):
    """Passes the first ``n_grads`` tensors through unchanged, attached to the rest (what they
    depend on): differentiating them raises a clear error instead of silently dropping the
    second-order terms (the kernels' outputs are not connected to the graph otherwise)."""

    @staticmethod
    def forward(ctx, n_grads, *tensors):
        return tuple(tensors[:n_grads])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, cumulative, eps, group, world_size, activation, slope):
        acc = L.acc_dtype(x.dtype)
        C = x.shape[1]
        empty = x.numel() == 0
        xp = x if empty else L.prepare_input(x)
        plan = None if empty else L.make_plan(xp)
        if empty:  # this rank contributes count 0
            local = torch.zeros((3, C), dtype=acc, device=x.device)
        else:
            local = L.stats_local(xp, plan)
        gathered = _all_gather_stats(local, group, world_size)
        rm, rv = as_acc(running_mean, acc), as_acc(running_var, acc)
        mean, invstd, count = L.merge_stats_final(
            gathered, 3 * C, C, world_size, C, eps, rm, rv, num_batches_tracked, momentum,
            cumulative, want_count=True)
        if running_mean is not None:
            if rm.data_ptr() != running_mean.data_ptr():
                running_mean.copy_(rm.view_as(running_mean))
            if rv.data_ptr() != running_var.data_ptr():
                running_var.copy_(rv.view_as(running_var))
        w, b = as_acc(weight, acc), as_acc(bias, acc)
        y = _alloc.empty_like(x) if empty else L.apply(xp, plan, mean, invstd, False, w, b, eps,
                                                       activation=activation, slope=slope)
        ctx.save_for_backward(x, weight, bias, mean, invstd, count)
        ctx.eps, ctx.group, ctx.activation, ctx.slope = eps, group, activation, slope
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, mean, invstd, count = ctx.saved_tensors
        acc = L.acc_dtype(x.dtype)
        # The activation's derivative needs z = bn(x): recomputed from x, the statistics and
        # the affine parameters (never stored).
        w, b = as_acc(weight, acc), as_acc(bias, acc)
        act = dict(activation=ctx.activation, slope=ctx.slope)
        C = x.shape[1]
        if x.numel() == 0:
            sums = torch.zeros((2, C), dtype=acc, device=x.device)
            grad_weight = torch.zeros((C,), dtype=acc, device=x.device)
            grad_bias = torch.zeros((C,), dtype=acc, device=x.device)
        else:
            xp = L.prepare_input(x)
            plan = L.make_plan(xp)
            dy = L.match_layout(grad_y, xp)
            sums, grad_weight, grad_bias = L.bwd_reduce(xp, dy, plan, mean, invstd, False,
                                                        ctx.eps, True, w, b, **act)
        # The only backward collective: global (sum g, sum g * x_hat), 2C values
        # (g = dy * act'(z); g = dy without an activation).
        dist.all_reduce(sums, group=ctx.group)
        need = ctx.needs_input_grad
        dx = None
        if need[0]:
            if x.numel() == 0:
                dx = _alloc.empty_like(x)
            else:
                dx = L.grad_input(xp, dy, plan, mean, invstd, False, w, sums, count, True,
                                  ctx.eps, b, **act)[0]
        dw = grad_weight.to(weight.dtype) if (need[1] and weight is not None) else None
        db = grad_bias.to(bias.dtype) if (need[2] and bias is not None) else None
        if torch.is_grad_enabled():  # create_graph=True: a double backward must fail loudly
            grads = [g for g in (dx, dw, db) if g is not None]
            deps = [t for t in (x, weight, grad_y) if t is not None and t.requires_grad]
            if grads and deps:
                wrapped = iter(_NoDoubleBackward.apply(len(grads), *grads, *deps))
                dx, dw, db = (next(wrapped) if g is not None else None for g in (dx, dw, db))
        return (dx, dw, db) + (None,) * 10


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                    process_group=None, num_batches_tracked=None, *, activation=None,
                    activation_param=None):
    """Training-mode batch norm with statistics over every rank of ``process_group``
    (default: the world), then ``activation`` in the same kernel (fusedgrad.batch_norm's
    names). ``momentum=None`` needs ``num_batches_tracked`` (cumulative average, factor read
    on the device)."""
    validate(input, running_mean, running_var, weight, bias, True, momentum, eps,
             check_batch_size=False)
    activation, slope = validate_epilogue(input, activation, activation_param, None,
                                          activations=ACTIVATIONS,
                                          default_slope=LEAKY_RELU_DEFAULT_SLOPE)
    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    cumulative = momentum is None
    if cumulative and running_mean is not None and num_batches_tracked is None:
        raise TypeError("fusedgrad.sync_batch_norm: momentum=None needs num_batches_tracked")
    return _SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var,
        num_batches_tracked if cumulative else None, 0.0 if cumulative else float(momentum),
        cumulative, float(eps), group, world_size, activation, slope)


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """Drop-in for torch.nn.SyncBatchNorm (same constructor, ``process_group``, state_dict),
    on fusedgrad's kernels; works with gloo on CPU (Triton interpreter) and NCCL on CUDA."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, *args, **kwargs):
        validate_module_args(type(self).__name__, num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, *args, **kwargs)

    def sync_group(self):
        """The process group this forward synchronises over, or None: statistics are local
        in eval, outside a distributed run and with a world size of 1."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.norm(input)

    def norm(self, input: torch.Tensor, activation: str | None = None,
             activation_param: float | None = None) -> torch.Tensor:
        """This module's batch norm (synchronised while training in a distributed run) with
        an optional activation fused into the kernel (fusedgrad.batch_norm's names)."""
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self.sync_group()
        if group is None:
            return module_batch_norm(self, input, activation, activation_param)
        running_mean, running_var, _, num_batches_tracked = module_state(self)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                               self.momentum, self.eps, group, num_batches_tracked,
                               activation=activation, activation_param=activation_param)
