"""fusedgrad's benchmark and kernel report: ``python -m bench`` from the repository root.

On a CUDA device it times fusedgrad against PyTorch eager, ``torch.compile`` and
Liger-Kernel (cross-entropy, BatchNorm, two end-to-end training steps) and writes
``bench/results/<gpu>-<date>.json``, a markdown summary and one plot per op family.
Without a GPU it runs a correctness smoke test through Triton's interpreter and the
offline (no-GPU) compile report, ``python -m bench static``.

This package is deliberately NOT part of the installed ``fusedgrad`` wheel: it is a
tool of the repository. Nothing in it imports ``triton`` at import time, because
whether Triton's interpreter is on must be decided before the first import.
"""
