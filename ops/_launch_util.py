"""Register budgets shared by the launchers: how many registers per thread (ptxas' maxnreg)
let a number of programs share an SM, and how many programs a register count leaves
resident. One formula, so a cap and the programs per SM a grid is sized for cannot drift
apart (the offline compile, ``python -m bench static``, checks that no capped variant
spills)."""

from __future__ import annotations

# sm_80 / sm_90, per SM: 32-bit registers, threads and resident blocks; per thread: the
# most registers ptxas may give.
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
MAX_REGS_PER_THREAD = 255
# Registers are allocated per warp in units of this many.
_REG_ALLOC_UNIT = 256


def register_cap(num_warps: int, programs_per_sm: int = 1) -> int:
    """maxnreg that lets ``programs_per_sm`` programs of ``num_warps`` warps share an SM's
    register file (at most 255 per thread)."""
    return min(MAX_REGS_PER_THREAD, REGS_PER_SM // (programs_per_sm * num_warps * 32))


def resident_programs(num_warps: int, regs_per_thread: int) -> int:
    """Programs of ``num_warps`` warps at ``regs_per_thread`` registers that an SM holds at
    once (registers, threads and the block limit; shared memory is the caller's concern)."""
    regs_per_warp = -(-regs_per_thread * 32 // _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    return max(0, min(THREADS_PER_SM // (32 * num_warps), by_regs, BLOCKS_PER_SM))


def maxnreg_option(cap: int | None) -> dict:
    """Launch options carrying a register cap: {} without one (None or 0: ptxas chooses)."""
    return {"maxnreg": cap} if cap else {}
