"""Offline (no-GPU) compilation of kernel configurations and their resource report.

Triton compiles for a GPU it does not have: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` yields PTX and a cubin on any machine.
From those we read what the interpreter cannot show: registers, spills, local
memory, shared memory and the widest global load (are hot loads 16 bytes wide?).

Each launcher module exposes ``static_configs()`` returning every
:class:`KernelConfig` its heuristics can choose; tests and ``python -m bench
static`` compile them all.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

# Shared memory a single CTA may use (opt-in maximum) per compute capability.
SHARED_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One compilation of one kernel, as a launcher would launch it.

    name: label for reports. fn: the ``@triton.jit`` function.
    signature: every argument name -> Triton type string ("*fp32", "i32", "i64",
        "fp32", or "constexpr"), in the kernel's argument order.
    constexprs: values of the constexpr arguments (including any integer argument
        specialised to the constant 1, as Triton does for unit strides at run time).
    aligned: arguments Triton would see as 16-divisible at run time (pointers from
        the caching allocator; sizes/strides that are multiples of 16).
    num_warps / num_stages / maxnreg: launch options.
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    aligned: tuple = ()
    num_stages: int = 1
    maxnreg: int | None = None  # register cap per thread, as the launcher passes it


@dataclasses.dataclass
class CompileReport:
    name: str
    arch: int
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    local_bytes: int
    shared_bytes: int
    widest_load_bits: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def problems(self) -> list[str]:
        out = []
        if self.spills or self.local_bytes:
            out.append(f"spills ({self.spill_stores} B stores, {self.spill_loads} B loads, "
                       f"{self.local_bytes} B local)")
        limit = SHARED_LIMIT_BYTES.get(self.arch)
        if limit is not None and self.shared_bytes > limit:
            out.append(f"shared memory {self.shared_bytes} B > limit {limit} B")
        return out


_LD_GLOBAL = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def widest_global_load_bits(ptx: str) -> int:
    """Width in bits of the widest ``ld.global`` in ``ptx`` (128 = 16-byte vector loads)."""
    best = 0
    for m in _LD_GLOBAL.finditer(ptx):
        vec = int(m.group(1) or 1)
        best = max(best, vec * int(m.group(2)))
    return best


def _attrs(cfg: KernelConfig) -> dict:
    names = list(cfg.signature)
    return {(names.index(a),): [["tt.divisibility", 16]] for a in cfg.aligned
            if a in names and cfg.signature[a] != "constexpr"}


def compile_config(cfg: KernelConfig, arch: int = 90) -> CompileReport:
    """Compile ``cfg`` for ``sm_<arch>`` without a GPU and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    src = ASTSource(fn=cfg.fn, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs),
                    attrs=_attrs(cfg))
    from ._runtime import FP_FUSION

    # The same fp-fusion setting the launchers pass (not Triton's version-dependent default).
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                     "enable_fp_fusion": FP_FUSION,
                                     **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {})})
    ptx = kernel.asm["ptx"]
    # ptxas -v gives exact register / spill counts for the PTX Triton produced.
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "k.ptx"
        ptx_path.write_text(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch == 90 else
                              f"--gpu-name=sm_{arch}", str(ptx_path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    regs = int(_PTXAS_USED.search(log).group(1))
    spill = _PTXAS_SPILL.search(log)
    stack = _PTXAS_STACK.search(log)
    return CompileReport(
        name=cfg.name, arch=arch, num_warps=cfg.num_warps, registers=regs,
        spill_stores=int(spill.group(1)) if spill else 0,
        spill_loads=int(spill.group(2)) if spill else 0,
        local_bytes=int(stack.group(1)) if stack else 0,
        shared_bytes=int(kernel.metadata.shared),
        widest_load_bits=widest_global_load_bits(ptx),
    )


def _kernel_ref(fn) -> tuple[str, str]:
    """(module, name) of a @triton.jit function, interpreted or not."""
    inner = getattr(fn, "fn", fn)
    return inner.__module__, inner.__name__


def _compile_spec(spec: dict, arch: int) -> CompileReport:
    """Worker entry point: resolve the kernel by name (JIT functions do not pickle)."""
    import importlib

    module, name = spec.pop("fn_ref")
    fn = getattr(importlib.import_module(module), name)
    return compile_config(KernelConfig(fn=fn, **spec), arch)


def compile_all(configs: Iterable[KernelConfig], arch: int = 90,
                workers: int | None = None) -> list[CompileReport]:
    """Compile many configurations in worker processes (compilation is CPU bound).

    Workers are fresh processes without TRITON_INTERPRET, so this works from a
    process whose kernels run in Triton's interpreter (the CPU test suite).
    """
    import concurrent.futures as cf
    import multiprocessing as mp
    import os

    configs = list(configs)
    if not configs:
        return []
    specs = []
    for c in configs:
        spec = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "fn"}
        spec["fn_ref"] = _kernel_ref(c.fn)
        specs.append(spec)
    workers = workers or max(1, min(len(configs), os.cpu_count() or 1))
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            return list(pool.map(_compile_spec, specs, [arch] * len(specs), chunksize=4))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


# Launcher modules (inside the fusedgrad package) that expose ``static_configs()``.
LAUNCHER_MODULES = ("_ce_launch", "_bn_launch", "_ce_target_grad")


def all_static_configs() -> list[KernelConfig]:
    """Every kernel configuration any fusedgrad launcher can choose."""
    import importlib

    configs: list[KernelConfig] = []
    for mod in LAUNCHER_MODULES:
        configs.extend(importlib.import_module(f"fusedgrad.{mod}").static_configs())
    return configs
