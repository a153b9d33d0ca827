"""Device helpers for constructs whose behaviour differs between Triton versions.

Each helper here exists because the obvious spelling works on one Triton and fails (or
changes meaning) on another; tests/test_triton_compat.py pins every one of them down on
whatever Triton is installed, and CI runs that file on the oldest and newest Triton.
"""

import triton
import triton.language as tl


@triton.jit
def mask_if(mask, flag):
    """``mask`` where the scalar ``flag`` is non-zero, else all False: an i1 block.

    ``mask``: an int1 block (any shape) or scalar. ``flag``: a runtime integer or int1
    scalar (a kernel argument, ``tl.program_id``, a loaded value). No constexprs.

    Why not ``mask & (flag != 0)``: combining a block mask with a *scalar* comparison
    broadcasts an int1 scalar, and Triton 3.9's interpreter then holds the result as int32
    data and refuses it as a load/store mask ("mask has unsupported dtype"); 3.6 accepted it.
    Broadcasting the integer flag first and comparing the block keeps int1 data on every
    version and compiles to the same code as the original (``tl.where(flag != 0, mask,
    False)`` also works in the interpreter but costs the fp32 single-block cross-entropy
    kernel at 32 warps a spill on sm_90).
    """
    return mask & (tl.broadcast_to(flag, mask.shape) != 0)
