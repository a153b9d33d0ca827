"""Fused linear + cross-entropy benchmark, and an end-to-end small-Llama training step.

* ``lce``: ``loss = cross_entropy(x @ W^T, t)`` forward + backward into x and W (bf16),
  at 8192 tokens x 4096 hidden x 128256 classes (Llama-3 8B's head) and, for ``--quick``,
  4096 x 2048 x 128256. Implementations:
    - fusedgrad: :func:`fusedgrad.linear_cross_entropy` (chunked, no logits);
    - torch: eager ``x @ W.t()`` + ``F.cross_entropy`` (logits and their gradient exist);
    - torch.compile of that;
    - torch.lce: torch's own ``F.linear_cross_entropy`` with chunking on
      (``options=LinearCrossEntropyOptions()``; unavailable before torch 2.13);
    - liger: Liger-Kernel's ``LigerFusedLinearCrossEntropyFunction`` (when importable).
  Records carry ``ms``, ``peak_mem_bytes``/``peak_extra_bytes`` (what the step allocates
  beyond its inputs) and ``tflops`` (3 matrix products of 2 N H V flops each). No bytes
  model: the step is bound by its matrix products.
* ``e2e llama``: one training step (forward, loss, backward; no optimizer) of a small
  Llama built from a config (random weights, bf16) on 4 x 2048 tokens and the 128256
  vocabulary, stock vs ``fusedgrad.integrations.transformers.apply(model,
  fused_linear=True)``. Needs transformers; otherwise the records say unavailable.

Memory model of fusedgrad's op (``fusedgrad.linear_cross_entropy.largest_intermediate_bytes``):
the chunk's logits (rows_per_chunk x V in the input dtype, rows_per_chunk ~ N H / V) and
the fp32 weight-gradient accumulator (V x H x 4 bytes for bf16/fp16 weights), against
N x V x E for the logits (and as much again for their gradient) without fusion.
"""

from __future__ import annotations

import copy
import importlib

from .common import (
    COMPILE,
    FUSED,
    LIGER,
    TORCH,
    TORCH_LCE,
    Case,
    Context,
    compiled,
    fused_op,
    lm_head_inputs,
    lm_head_step,
    run_impl,
    run_impls,
    skipped,
    with_tflops,
)

SHAPES = ((8192, 4096, 128256), (4096, 2048, 128256))  # (tokens, hidden, vocab)
QUICK_SHAPE = (4096, 2048, 128256)
# e2e: the small Llama (config only, random weights) and its batch.
LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, vocab_size=128256,
             max_position_embeddings=2048)
LLAMA_BATCH, LLAMA_SEQ = 4, 2048


def case_name(tokens: int, hidden: int, vocab: int) -> str:
    return f"lce bf16 {tokens}x{hidden}x{vocab} fwd+bwd"


def llama_case_name() -> str:
    return (f"e2e llama h{LLAMA['hidden_size']} l{LLAMA['num_hidden_layers']} bf16 "
            f"{LLAMA_BATCH}x{LLAMA_SEQ}->{LLAMA['vocab_size']} step")


def cases() -> list[Case]:
    out = [Case(family="linear_cross_entropy", name=case_name(n, h, v), dtype="bf16",
                mode="fwd+bwd", shape={"tokens": n, "hidden": h, "vocab": v}, size=n * v,
                quick=(n, h, v) == QUICK_SHAPE,
                impls=(FUSED, TORCH, COMPILE, TORCH_LCE, LIGER), run=run_case)
           for n, h, v in SHAPES]
    out.append(Case(family="e2e", name=llama_case_name(), dtype="bf16", mode="step",
                    shape={"batch": LLAMA_BATCH, "seq": LLAMA_SEQ, **LLAMA},
                    size=LLAMA_BATCH * LLAMA_SEQ * LLAMA["vocab_size"], quick=False,
                    impls=(FUSED, TORCH), run=run_llama_step))
    return out


def liger_fused_linear_cross_entropy():
    """Liger-Kernel's fused linear cross-entropy as ``fn(x, W, t) -> loss``, or (None, why).

    The op module directly (``liger_kernel.transformers`` would import transformers);
    the leading positional arguments (input, weight, target, bias, ce_weight,
    ignore_index, lse_square_scale, label_smoothing, reduction) are the same in the
    liger-kernel releases we know."""
    try:
        mod = importlib.import_module("liger_kernel.ops.fused_linear_cross_entropy")
        fn_cls = mod.LigerFusedLinearCrossEntropyFunction
    except Exception as exc:  # noqa: BLE001
        return None, (f"Liger-Kernel not importable ({type(exc).__name__}: {exc}); "
                      "install the `liger` extra or carry its wheel (bench/fetch_wheels.sh)")

    def liger_lce(x, w, t):
        out = fn_cls.apply(x, w, t, None, None, -100, 0.0, 0.0, "mean")
        return out[0] if isinstance(out, tuple) else out

    return liger_lce, ""


def torch_chunked_linear_cross_entropy():
    """torch's ``F.linear_cross_entropy`` with its chunked path, or (None, why)."""
    import torch
    import torch.nn.functional as F

    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if not hasattr(F, "linear_cross_entropy") or options_cls is None:
        return None, f"torch {torch.__version__} has no F.linear_cross_entropy (2.13+)"
    options = options_cls()

    def torch_lce(x, w, t):
        return F.linear_cross_entropy(x, w, t, options=options)

    return torch_lce, ""


def run_case(case: Case, ctx: Context) -> list[dict]:
    import torch.nn.functional as F

    tokens, hidden, vocab = (case.shape[k] for k in ("tokens", "hidden", "vocab"))
    make_inputs, leaves, set_bytes = lm_head_inputs(case, ctx)

    def eager(x, w, t):
        return F.cross_entropy(x @ w.t(), t)

    fg_lce, fg_reason = fused_op("linear_cross_entropy")
    table = {
        FUSED: (fg_lce, fg_reason),
        TORCH: (eager, ""),
        COMPILE: lambda: (compiled(eager), ""),
        TORCH_LCE: torch_chunked_linear_cross_entropy(),
        LIGER: liger_fused_linear_cross_entropy(),
    }
    flops = 3 * 2 * tokens * hidden * vocab

    def measure(impl, fn):
        return with_tflops(run_impl(case, ctx, impl, make_inputs, lm_head_step(fn),
                                    set_bytes=set_bytes, min_bytes=0,
                                    bytes_model="none (matmul-bound)", leaves=leaves), flops)

    return run_impls(case, ctx, table, measure)


def run_llama_step(case: Case, ctx: Context) -> list[dict]:
    import torch

    try:
        transformers = importlib.import_module("transformers")
        from fusedgrad.integrations import transformers as fg_hf
    except Exception as exc:  # noqa: BLE001
        why = f"transformers not importable ({type(exc).__name__}: {exc})"
        return [skipped(case, impl, why, status="unavailable") for impl in case.impls
                if impl in ctx.impls]
    cfg_keys = {k: case.shape[k] for k in LLAMA if k in case.shape}
    cfg = transformers.LlamaConfig(**cfg_keys, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(device=ctx.device, dtype=torch.bfloat16)
    base.train()
    batch, seq, vocab = case.shape["batch"], case.shape["seq"], case.shape["vocab_size"]
    set_bytes = batch * seq * 8 * 2

    def make_inputs():
        ids = torch.randint(0, vocab, (batch, seq), device=ctx.device)
        return {"ids": ids, "labels": ids.clone()}

    records = []
    for impl in case.impls:
        if impl not in ctx.impls:
            continue
        model = copy.deepcopy(base)
        if impl == FUSED:
            fg_hf.apply(model, fused_linear=True)
        params = [p for p in model.parameters() if p.requires_grad]

        def step(s, _model=model):
            out = _model(input_ids=s["ids"], labels=s["labels"])
            out.loss.backward()
            return out.loss

        try:
            records.append(run_impl(case, ctx, impl, make_inputs, step, set_bytes=set_bytes,
                                    min_bytes=0, bytes_model="none (model step)",
                                    leaves=lambda s, _p=params: _p))
        finally:
            fg_hf.revert()
            del model
    return records
