"""fusedgrad: Triton training kernels as drop-in PyTorch ops.

    import fusedgrad as fg
    loss = fg.cross_entropy(logits, target)          # instead of F.cross_entropy
"""

__version__ = "0.1.0"
