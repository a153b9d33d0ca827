"""fusedgrad.batch_norm's eager host path: everything a call decides without reading tensor
data, decided once per call signature.

A call's signature is the input's plan (shape, strides, dtype, device, target programs: the
plan cache of ops/_bn_launch.py) together with ``signature(...)`` of the other arguments:
training, momentum, eps, the epilogue, and the shape, dtype, device and contiguity of every
other tensor (everything the argument checks read). The first call with a signature checks
its arguments and builds a :class:`Call`, kept on the plan (``Plan.calls``); every later call
is a lookup, the allocations, the launches with prebuilt arguments (``_bn_launch.Launch``) and
autograd. Nothing read at launch time is cached: the kernels are looked up on their module and
test poisoning is read by the allocators, so flipping either takes effect at once.
"""

from __future__ import annotations

import torch

from . import _alloc
from . import _bn_launch as L
from ._runtime import acc_dtype

# Signatures kept per plan before its table is cleared (bounds memory when a caller varies,
# say, eps from call to call).
CALLS_PER_PLAN = 64


def as_acc(t, acc):
    """A contiguous [C] view of t in the accumulation dtype (a copy only if needed)."""
    if t is None or (t.dtype == acc and t.is_contiguous()):
        return t  # the kernels index a contiguous [C] tensor: its shape does not matter
    return t.reshape(-1).to(acc).contiguous()


def copy_back(buffer, acc_copy):
    """Buffers in another dtype (a .half() module) were updated in an acc copy."""
    if buffer is not None and acc_copy.data_ptr() != buffer.data_ptr():
        buffer.copy_(acc_copy.view_as(buffer))


def signature(running_mean, running_var, weight, bias, training, momentum, eps,
              num_batches_tracked, activation, activation_param, residual) -> tuple:
    """Everything but the input that the argument checks and the launches depend on: each
    tensor's shape, dtype, device and contiguity (strides for the residual), and the
    scalars with their types (True == 1, but a bool momentum is an error)."""
    return (training, momentum.__class__, momentum, eps.__class__, eps, activation,
            activation_param.__class__, activation_param, num_batches_tracked is None,
            None if weight is None else
            (weight.shape, weight.dtype, weight.device, weight.is_contiguous()),
            None if bias is None else
            (bias.shape, bias.dtype, bias.device, bias.is_contiguous()),
            None if running_mean is None else
            (running_mean.shape, running_mean.dtype, running_mean.device,
             running_mean.is_contiguous()),
            None if running_var is None else
            (running_var.shape, running_var.dtype, running_var.device,
             running_var.is_contiguous()),
            None if residual is None else
            (residual.shape, residual.stride(), residual.dtype, residual.device))


def find(input, sig) -> Call | None:
    """The Call of a signature seen before (``input`` read in place), else None."""
    plan = L.planned(input)
    return None if plan is None else plan.calls.get(sig)


def build(x, sig, running_mean, running_var, weight, bias, residual, training, momentum,
          cumulative, eps, activation, slope) -> Call:
    """The Call of a prepared input ``x`` (read in place) and checked arguments, kept for the
    next call with the same signature."""
    plan = L.make_plan(x)
    call = plan.calls.get(sig)
    if call is None:
        if len(plan.calls) >= CALLS_PER_PLAN:
            plan.calls.clear()
        call = plan.calls[sig] = Call(plan, x, running_mean, running_var, weight, bias,
                                      residual, training, momentum, cumulative, eps,
                                      activation, slope)
    return call


class Call:
    """One call signature's decisions: the launches of the forward (statistics with the
    running-buffer update, normalise with the epilogue) and, built on first use, of each
    backward variant (which gradients are asked for), and which tensors need converting."""

    __slots__ = ("plan", "dtype", "acc", "training", "eps", "activation", "slope", "count",
                 "has_weight", "has_bias", "has_residual", "weight_grad_cast", "bias_grad_cast",
                 "convert_params", "convert_running", "copy_residual", "update", "read_nbt",
                 "recompute_z", "C", "n_cblocks", "stats_parts", "reduce_parts", "stats",
                 "apply", "_backward")

    def __init__(self, plan, x, running_mean, running_var, weight, bias, residual, training,
                 momentum, cumulative, eps, activation, slope):
        acc = acc_dtype(x.dtype)
        self.plan, self.dtype, self.acc = plan, x.dtype, acc
        self.training, self.eps, self.activation, self.slope = training, eps, activation, slope
        self.count = plan.N * plan.S  # values per channel
        self.has_weight, self.has_bias = weight is not None, bias is not None
        self.has_residual = residual is not None
        # Parameter gradients are computed in acc: converted back if the parameters are not.
        self.weight_grad_cast = weight.dtype if weight is not None and weight.dtype != acc else None
        self.bias_grad_cast = bias.dtype if bias is not None and bias.dtype != acc else None
        self.convert_params = any(as_acc(t, acc) is not t for t in (weight, bias))
        self.convert_running = any(as_acc(t, acc) is not t for t in (running_mean, running_var))
        self.copy_residual = residual is not None and L.match_layout(residual, x) is not residual
        # The backward recomputes z = bn(x) + residual only for an activation's derivative:
        # bias and residual are read (and kept for it) only then.
        self.recompute_z = activation != "identity"
        self.update = training and running_mean is not None
        self.read_nbt = self.update and cumulative
        # Scratch sizes: split partials (3 fields forward, 2 backward) and tickets.
        self.C, self.n_cblocks = plan.C, plan.n_cblocks
        self.stats_parts, self.reduce_parts = 3 * plan.splits * plan.C, 2 * plan.splits * plan.C
        self.stats = (L.stats_launch(plan, eps, momentum, self.update, self.read_nbt, True)
                      if training else None)
        self.apply = L.apply_launch(plan, not training, self.has_weight, self.has_bias,
                                    self.has_residual, eps, activation, slope, training)
        self._backward = {}

    def forward(self, x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                keep_stats):
        """(y, residual as the kernels read it, mean, scale): two launches in training, one
        in eval. mean is the [2, C] statistics tensor in training (its first row: the kernels
        take its address); scale is invstd (training) or the running variance (eval; copied
        if keep_stats, so that a later in-place update of the buffers cannot reach the
        backward, as in torch)."""
        acc, dev = self.acc, x.device
        if self.copy_residual:
            residual = L.match_layout(residual, x)
        if self.convert_params:
            weight, bias = as_acc(weight, acc), as_acc(bias, acc)
        rm, rv = running_mean, running_var
        if self.convert_running:
            rm, rv = as_acc(rm, acc), as_acc(rv, acc)
        with L.device_guard(x):
            if self.training:
                part, tickets, _ = L.scratch(x, acc, self.stats_parts, self.n_cblocks)
                mean = _alloc.new_empty(part, 2, self.C)  # part: acc, on dev
                self.stats(x, part, tickets, mean, rm if self.update else mean,
                           rv if self.update else mean,
                           num_batches_tracked if self.read_nbt else L.dummy_i64(dev))
                if self.convert_running and self.update:
                    copy_back(running_mean, rm)
                    copy_back(running_var, rv)
                scale = mean[1]
            elif keep_stats:
                mean = torch.stack((running_mean.detach().reshape(-1),
                                    running_var.detach().reshape(-1))).to(acc)
                scale = mean[1]
            else:
                mean, scale = rm, rv
            y = _alloc.empty_like(x)
            self.apply(x, residual if residual is not None else x, y, mean, scale,
                       weight if weight is not None else mean,
                       bias if bias is not None else mean)
        return y, residual, mean, scale

    def _backward_launches(self, want_dx, want_params, want_dres):
        key = (want_dx, want_params, want_dres)
        launches = self._backward.get(key)
        if launches is None:
            reduce = grad = None
            has_bias = self.has_bias and self.recompute_z
            has_residual = self.has_residual and self.recompute_z
            if self.training or want_params:
                reduce = L.bwd_reduce_launch(self.plan, self.dtype, not self.training, self.eps,
                                             want_params, self.has_weight, has_bias,
                                             has_residual, self.activation, self.slope)
            if want_dx or want_dres:
                grad = L.grad_input_launch(self.plan, self.dtype, self.count,
                                           not self.training, self.has_weight, has_bias,
                                           has_residual, self.training, self.eps,
                                           self.activation, self.slope, want_dx, want_dres,
                                           reduce is not None)
            launches = self._backward[key] = (reduce, grad)
        return launches

    def backward(self, grad_y, x, weight, bias, residual, mean, scale, want_dx, want_params,
                 want_dres):
        """(dx, dweight, dbias, dresidual), None where not asked for (want_params: both
        dweight and dbias, in the parameters' dtypes). bias and residual: None unless
        recompute_z. One reduction launch (sum g and sum g * x_hat; in eval only for the
        parameters' gradients), then one launch for dx and d(residual)."""
        reduce, grad = self._backward_launches(want_dx, want_params, want_dres)
        acc, C = self.acc, self.C
        dy = grad_y if grad_y.stride() == x.stride() else L.match_layout(grad_y, x)
        if self.convert_params:
            weight, bias = as_acc(weight, acc), as_acc(bias, acc)
        w = weight if weight is not None else mean
        b = bias if bias is not None else mean
        res = residual if residual is not None else x
        sums = gw = gb = dx = dres = None
        with L.device_guard(x):
            if reduce is not None:
                part, tickets, sums = L.scratch(x, acc, self.reduce_parts, self.n_cblocks,
                                                2 * C)
                if want_params:
                    gw, gb = _alloc.new_empty(mean, C), _alloc.new_empty(mean, C)
                reduce(x, dy, res, mean, scale, w, b, part, tickets, sums,
                       gw if want_params else sums, gb if want_params else sums)
            if grad is not None:
                dx = _alloc.empty_like(x) if want_dx else None
                dres = _alloc.empty_like(x) if want_dres else None
                grad(x, dy, res, dx if want_dx else x, dres if want_dres else x, mean, scale,
                     w, b, sums if sums is not None else mean, mean)
        if want_params and self.weight_grad_cast is not None:
            gw = gw.to(self.weight_grad_cast)
        if want_params and self.bias_grad_cast is not None:
            gb = gb.to(self.bias_grad_cast)
        return dx, gw, gb, dres
