"""``python -m bench plan --op lce``: what fusedgrad.linear_cross_entropy does for one call.

    python -m bench plan --op lce --dtype bf16 --shape 8192x4096x128256

Shape is TOKENS x HIDDEN x VOCAB. Prints the chunking (rows per chunk, chunks), the
cross-entropy kernel configuration each chunk runs, launches per call, the matrix-product
flops, and the memory model: the largest intermediates against the unfused logits. The
numbers come from the op's own functions (``fusedgrad.linear_cross_entropy``'s chunk rule
and memory model, the CE launcher's block heuristics), so they cannot drift from what runs.
"""

from __future__ import annotations

DEFAULT_SHAPE = (8192, 4096, 128256)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
# Per chunk: logits GEMM (addmm with a bias), the fused CE kernel, dx GEMM, dW GEMM
# (+ an add where the fp32 accumulation is not a single cuBLAS call), db reduction.
LAUNCHES_PER_CHUNK = {"gemm": 3, "ce_kernel": 1}


def parse_shape(text: str | None) -> tuple[int, int, int]:
    if not text:
        return DEFAULT_SHAPE
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) != 3:
        raise ValueError(f"--shape for lce is TOKENSxHIDDENxVOCAB, got {text!r}")
    return parts[0], parts[1], parts[2]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def plan(tokens: int, hidden: int, vocab: int, dtype_name: str = "bf16",
         chunk_size: int | None = None) -> dict:
    import torch

    from fusedgrad import _ce_launch as launch

    lce = __import__("fusedgrad.linear_cross_entropy", fromlist=["plan"])
    dtype = getattr(torch, DTYPES[dtype_name])
    mem = lce.largest_intermediate_bytes(tokens, hidden, vocab, dtype, chunk_size)
    block_v, single = launch.fused_block_v(vocab, dtype, False)
    elem = torch.empty((), dtype=dtype).element_size()
    return {
        **mem,
        "block_v": block_v,
        "single_block": single,
        "launches": mem["n_chunks"] * sum(LAUNCHES_PER_CHUNK.values()),
        "flops": 3 * 2 * tokens * hidden * vocab,
        "outputs": (tokens * hidden + vocab * hidden) * elem,
        "logits_and_grad_unfused": 2 * mem["logits_unfused"],
        # each chunk's dW product reads and writes the fp32 accumulator once
        "dw_accumulator_traffic": mem["n_chunks"] * 2 * mem["weight_grad_fp32"],
    }


def describe(args) -> str:
    shapes = [parse_shape(s) for s in (args.shape or [None])]
    dtypes = args.dtype or ["bf16"]
    lines = []
    for tokens, hidden, vocab in shapes:
        for dtype in dtypes:
            p = plan(tokens, hidden, vocab, dtype)
            passes = ("single block (1 read + 1 write per logit)" if p["single_block"]
                      else "two-pass (2 reads + 1 write per logit)")
            lines += [
                f"linear_cross_entropy {dtype} N={tokens} H={hidden} V={vocab}",
                f"  chunks: {p['n_chunks']} of {p['chunk_rows']} rows (chunk logits "
                f"<= input: rows ~ N*H/V, rounded down to a power of 2)",
                f"  CE kernel per chunk: BLOCK_V={p['block_v']}, "
                f"{passes}",
                f"  launches per call: {p['launches']} "
                f"({p['n_chunks']} x [3 GEMMs + CE kernel]; db adds a reduction with a bias)",
                f"  matrix-product flops: {p['flops'] / 1e12:.2f} TFLOP (3 x 2NHV)",
                "  memory model (largest intermediates):",
                f"    chunk logits/gradient  rows*V*E      = {_mib(p['chunk_logits'])}",
                f"    fp32 dW accumulator    V*H*4         = {_mib(p['weight_grad_fp32'])}",
                f"    outputs dx + dW        (N*H + V*H)*E = {_mib(p['outputs'])}",
                f"    unfused logits + grad  2*N*V*E       = "
                f"{_mib(p['logits_and_grad_unfused'])}",
                f"  fp32 dW accumulator traffic: chunks x 8*V*H = "
                f"{p['dw_accumulator_traffic'] / 1e9:,.1f} GB per call (a larger chunk_size "
                "trades chunk memory for fewer passes)",
                "",
            ]
    return "\n".join(lines).rstrip()
