"""fusedgrad: Triton training kernels as drop-in PyTorch ops.

    import fusedgrad as fg
    loss = fg.cross_entropy(logits, target)          # instead of F.cross_entropy
"""

from .batch_norm import batch_norm
from .batch_norm_modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm
from .cross_entropy import CrossEntropyLoss, cross_entropy
from .sync_batch_norm import SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CrossEntropyLoss",
    "SyncBatchNorm",
    "batch_norm",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "cross_entropy",
]
