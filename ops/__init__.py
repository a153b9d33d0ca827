"""fusedgrad: Triton training kernels as drop-in PyTorch ops.

    import fusedgrad as fg
    loss = fg.cross_entropy(logits, target)          # instead of F.cross_entropy
"""

from .batch_norm import batch_norm
from .batch_norm_act import BatchNormAct2d, SyncBatchNormAct2d
from .batch_norm_convert import ConversionReport, convert_batchnorm, convert_sync_batchnorm
from .batch_norm_modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .cross_entropy import CrossEntropyLoss, cross_entropy
from .linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from .sync_batch_norm import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "ConversionReport",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "SyncBatchNorm",
    "SyncBatchNormAct2d",
    "batch_norm",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "cross_entropy",
    "linear_cross_entropy",
]
