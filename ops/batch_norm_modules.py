"""BatchNorm1d/2d/3d modules on fusedgrad's kernels, and convert_batchnorm for whole models.

The classes subclass torch's, so parameters, buffers, ``state_dict`` (both ways),
``momentum=None``, ``track_running_stats=False``, ``affine=False``, ``train()``/``eval()``
and ``isinstance(m, torch.nn.BatchNorm2d)`` behave exactly as torch's; only ``forward``
changes. The one difference inside forward: with ``momentum=None`` torch reads
``num_batches_tracked`` back to the host to form 1/n; here the kernel reads it on the device.
"""

import torch

from .batch_norm import _batch_norm_impl


class _FusedBatchNormForward:
    """forward() of torch's _BatchNorm, calling fusedgrad's batch norm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        num_batches_tracked = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, factor 1/n on the device
                num_batches_tracked = self.num_batches_tracked
        # As torch: batch statistics in training, and in eval when there are no buffers.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return _batch_norm_impl(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight, self.bias, bn_training, self.momentum, self.eps, num_batches_tracked)


class BatchNorm1d(_FusedBatchNormForward, torch.nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d ((N, C) or (N, C, L) input)."""


class BatchNorm2d(_FusedBatchNormForward, torch.nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d ((N, C, H, W) input, contiguous or channels_last)."""


class BatchNorm3d(_FusedBatchNormForward, torch.nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d ((N, C, D, H, W), contiguous or channels_last_3d)."""


_FUSED = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
          torch.nn.BatchNorm3d: BatchNorm3d}


def adopt_state(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """Give ``new`` (built on the meta device) ``old``'s Parameter and buffer objects and
    mode: an optimizer holding them keeps working and nothing is copied or moved."""
    if old.affine:
        new.weight = old.weight
        new.bias = old.bias
    new.running_mean = old.running_mean
    new.running_var = old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _convert_one(bn: torch.nn.Module) -> torch.nn.Module:
    fused_cls = _FUSED[type(bn)]
    new = fused_cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, device="meta")
    return adopt_state(new, bn)


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every torch.nn.BatchNorm1d/2d/3d in ``module`` (exact types; subclasses such as
    SyncBatchNorm or already-fused modules are left alone) by fusedgrad's, sharing the same
    parameters and buffers (same device, dtype and values). Returns the converted module (a
    new object if ``module`` itself is a BatchNorm)."""
    if type(module) in _FUSED:
        return _convert_one(module)
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            module.add_module(name, converted)
    return module
