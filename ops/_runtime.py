"""Shared by every op family: where kernels may run (and the errors users see when
they cannot), the accumulation dtype, and how host floats reach fp64 kernels.

Triton compiles kernels for CUDA devices. Without a GPU, Triton's interpreter
(``TRITON_INTERPRET=1``, set before ``triton`` is imported) runs the same
kernels on CPU tensors; that is how the test suite runs on CPU-only machines.
"""

from __future__ import annotations

import math
import struct

import torch

# Floating-point contraction (a * b + c as one fused multiply-add) in every compiled kernel,
# passed explicitly at each launch (``enable_fp_fusion=FP_FUSION``) rather than left to
# Triton's default: Triton <= 3.9 fuses by default, 3.10 announces the opposite, and a
# default that flips would silently change every result bit and the speed of the kernels.
# On: an FMA rounds once instead of twice, so each contraction is at least as accurate
# (the Welford merges, p - y scaled by coefficients, BatchNorm's a * dy + q * xhat + r), it is
# what CUDA's own kernels (nvcc --fmad=true) and hence torch's results use, and it is the
# setting every kernel was validated and tuned with. Results stay deterministic either way:
# the contraction is fixed at compile time. The interpreter ignores the option (NumPy rounds
# every operation separately).
FP_FUSION = True


def interpreter_active() -> bool:
    """True when ``@triton.jit`` kernels were built by Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels import _probe

    return isinstance(_probe.probe_kernel, InterpretedFunction)


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Raise a clear error when ``tensor`` lives where the kernels cannot run."""
    dev = tensor.device.type
    if dev == "cuda":
        return
    if dev == "cpu":
        if interpreter_active():
            return
        raise ValueError(
            f"fusedgrad: `{name}` is a CPU tensor, but fusedgrad's Triton kernels need a CUDA "
            "tensor. To run them on CPU (slowly, for testing) set the environment variable "
            "TRITON_INTERPRET=1 before `triton` is first imported, e.g. "
            "`TRITON_INTERPRET=1 python your_script.py`."
        )
    raise ValueError(f"fusedgrad: `{name}` is on device '{tensor.device}'; only CUDA (or CPU "
                     "under TRITON_INTERPRET=1) is supported.")


def check_same_device(ref_name: str, ref: torch.Tensor, name: str, other: torch.Tensor) -> None:
    if other.device != ref.device:
        raise ValueError(
            f"fusedgrad: `{name}` is on {other.device} but `{ref_name}` is on {ref.device}; "
            "they must be on the same device."
        )


def device_guard(tensor: torch.Tensor):
    """Context manager that makes ``tensor``'s CUDA device current (no-op on CPU)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    import contextlib

    return contextlib.nullcontext()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype of every kernel for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_f64(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo fp32: ~48 exact bits for fp64 math in a kernel.

    Compiled Triton passes Python floats as fp32, so kernels that compute in fp64
    take host scalars as such a pair and add the halves in fp64.
    """
    hi = _round_f32(value)
    return hi, _round_f32(value - hi)


def _round_f32(value: float) -> float:
    """value rounded to the nearest float32 (a struct round trip: exact, no tensor)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: round to +-inf like a float32 cast
        return math.copysign(math.inf, value)


# Tests set this to run the device branches of host_reads_free on CPU tensors (what a
# CUDA run executes), under a watcher that flags host synchronisation.
_CPU_AS_DEVICE = False


def host_reads_free(device: torch.device) -> bool:
    """True where reading tensor data on the host costs no synchronisation (CPU). Ops may
    then check data eagerly and raise; elsewhere they must assert on the device."""
    return device.type == "cpu" and not _CPU_AS_DEVICE
