"""fusedgrad: Triton training kernels as drop-in PyTorch ops.

    import fusedgrad as fg
    loss = fg.cross_entropy(logits, target)          # instead of F.cross_entropy
"""

__version__ = "0.1.0"

from .cross_entropy import CrossEntropyLoss, cross_entropy  # noqa: E402
from .batch_norm import batch_norm  # noqa: E402
from .batch_norm_modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm  # noqa: E402, E501
from .sync_batch_norm import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402
