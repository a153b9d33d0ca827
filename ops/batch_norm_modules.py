"""BatchNorm1d/2d/3d modules on fusedgrad's kernels (whole models: batch_norm_convert.py).

The classes subclass torch's, so parameters, buffers, ``state_dict`` (both ways),
``momentum=None``, ``track_running_stats=False``, ``affine=False``, ``train()``/``eval()``
and ``isinstance(m, torch.nn.BatchNorm2d)`` behave exactly as torch's; only ``forward``
changes. The one difference inside forward: with ``momentum=None`` torch reads
``num_batches_tracked`` back to the host to form 1/n; here the kernel reads it on the device.
"""

import torch

from ._bn_validate import validate_module_args
from .batch_norm import batch_norm_tracked


def module_state(bn: torch.nn.Module):
    """What a BatchNorm module's forward passes to the op, as torch's _BatchNorm decides it:
    (running_mean, running_var, training, num_batches_tracked). Counts the step: in training
    with tracked statistics ``num_batches_tracked`` is incremented (on the device), and is
    returned only for ``momentum=None`` (the kernel then reads 1/n on the device)."""
    num_batches_tracked = None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, factor 1/n on the device
            num_batches_tracked = bn.num_batches_tracked
    # As torch: batch statistics in training, and in eval when there are no buffers.
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_buffers = not bn.training or bn.track_running_stats
    return (bn.running_mean if use_buffers else None, bn.running_var if use_buffers else None,
            bn_training, num_batches_tracked)


def module_batch_norm(bn: torch.nn.Module, input: torch.Tensor, activation: str | None = None,
                      activation_param: float | None = None) -> torch.Tensor:
    """One BatchNorm module's forward (state as ``module_state``), with an optional activation
    the op fuses (a name in ``fusedgrad.batch_norm.FUSED_ACTIVATIONS``)."""
    running_mean, running_var, bn_training, num_batches_tracked = module_state(bn)
    return batch_norm_tracked(input, running_mean, running_var, bn.weight, bn.bias, bn_training,
                              bn.momentum, bn.eps, num_batches_tracked, activation=activation,
                              activation_param=activation_param)


class _FusedBatchNormForward:
    """forward() of torch's _BatchNorm, calling fusedgrad's batch norm; the constructor checks
    its arguments first (torch's does not)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, *args, **kwargs):
        validate_module_args(type(self).__name__, num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, *args, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return module_batch_norm(self, input)


class BatchNorm1d(_FusedBatchNormForward, torch.nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d ((N, C) or (N, C, L) input)."""


class BatchNorm2d(_FusedBatchNormForward, torch.nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d ((N, C, H, W) input, contiguous or channels_last)."""


class BatchNorm3d(_FusedBatchNormForward, torch.nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d ((N, C, D, H, W), contiguous or channels_last_3d)."""
