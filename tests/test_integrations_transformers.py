"""fusedgrad.integrations.transformers (ops/integrations/transformers.py) on tiny causal LMs
built from configs (random weights, no downloads): after apply(model) and after
apply(model, fused_linear=True) the loss and every parameter gradient equal the stock
model's (fp32), with -100 labels and with num_items_in_batch; revert() restores the stock
loss. Llama (plain lm_head) and Gemma2 (tied lm_head, final-logit soft-capping).
"""

import copy

import pytest
import torch

from extras import require
from helpers import DEVICE, assert_close

pytestmark = pytest.mark.extras

VOCAB = 160


def _config(family):
    transformers = require("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  attn_implementation="eager")
    if family == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    cfg = transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=5.0,
                                    query_pre_attn_scalar=16, sliding_window=8)
    return cfg, transformers.Gemma2ForCausalLM


def _models(family):
    cfg, cls = _config(family)
    torch.manual_seed(7)
    stock = cls(cfg).to(DEVICE).float().train()
    # Random (not zero-initialised) lm_head/norm weights so every gradient is non-trivial.
    with torch.no_grad():
        for p in stock.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return stock, copy.deepcopy(stock)


def _batch(ignore=True):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    labels = ids.clone()
    if ignore:
        labels[0, :4] = -100
        labels[1, 9:] = -100
    return ids.to(DEVICE), labels.to(DEVICE)


def _loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out, grads


def _compare(ours, stock, what):
    (out_a, grads_a), (out_b, grads_b) = ours, stock
    assert_close(out_a.loss, out_b.loss, torch.float32, f"{what} loss")
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        assert_close(grads_a[name], grads_b[name], torch.float32, f"{what} grad {name}",
                     factor=5.0)


@pytest.fixture(autouse=True)
def _always_revert():
    yield
    from fusedgrad.integrations import transformers as fg_hf

    fg_hf.revert()


@pytest.mark.parametrize("fused_linear", [False, True])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_apply_model_matches_stock(family, fused_linear):
    from fusedgrad.integrations import transformers as fg_hf

    stock, ours = _models(family)
    fg_hf.apply(ours, fused_linear=fused_linear)
    ids, labels = _batch()
    num_items = (labels[:, 1:] != -100).sum() + 3  # as if more tokens were accumulated
    for kwargs in (dict(labels=labels), dict(labels=labels, num_items_in_batch=num_items)):
        a = _loss_and_grads(ours, input_ids=ids, **kwargs)
        b = _loss_and_grads(stock, input_ids=ids, **kwargs)
        _compare(a, b, f"{family} fused_linear={fused_linear} {sorted(kwargs)}")
        if fused_linear:
            assert a[0].logits is None  # never materialised
        else:
            assert_close(a[0].logits, b[0].logits, torch.float32, "logits")
    # shift_labels given directly (sequence-parallel trainers pass them).
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    a = _loss_and_grads(ours, input_ids=ids, labels=labels, shift_labels=shift)
    b = _loss_and_grads(stock, input_ids=ids, labels=labels, shift_labels=shift)
    _compare(a, b, f"{family} shift_labels")

    fg_hf.revert()
    assert "_loss_function" not in ours.__dict__ and "forward" not in ours.__dict__
    a = _loss_and_grads(ours, input_ids=ids, labels=labels)
    b = _loss_and_grads(stock, input_ids=ids, labels=labels)
    assert torch.equal(a[0].loss, b[0].loss)  # the stock path again, bit for bit


def test_fused_eval_and_logits_to_keep_unchanged():
    from fusedgrad.integrations import transformers as fg_hf

    stock, ours = _models("gemma2")
    fg_hf.apply(ours, fused_linear=True)
    ids, labels = _batch()
    stock.eval()
    ours.eval()
    with torch.no_grad():
        a = ours(input_ids=ids, labels=labels)
        b = stock(input_ids=ids, labels=labels)
        assert a.logits is not None
        assert_close(a.logits, b.logits, torch.float32, "eval logits")
        assert_close(a.loss, b.loss, torch.float32, "eval loss")
        a = ours(input_ids=ids, logits_to_keep=1)
        b = stock(input_ids=ids, logits_to_keep=1)
        assert a.logits.shape == (2, 1, VOCAB)
        assert_close(a.logits, b.logits, torch.float32, "logits_to_keep")


def test_global_apply_and_revert():
    transformers = require("transformers")
    from transformers.loss import loss_utils

    from fusedgrad.integrations import transformers as fg_hf

    stock_fn = loss_utils.ForCausalLMLoss
    aliases = [k for k, v in loss_utils.LOSS_MAPPING.items() if v is stock_fn]
    assert "ForCausalLM" in aliases
    stock_forward = transformers.LlamaForCausalLM.forward
    stock, ours = _models("llama")
    fg_hf.apply(fused_linear=True)
    assert all(loss_utils.LOSS_MAPPING[k] is fg_hf.causal_lm_loss for k in aliases)
    assert transformers.LlamaForCausalLM.forward is not stock_forward
    ids, labels = _batch()
    a = _loss_and_grads(ours, input_ids=ids, labels=labels)  # the class-level wrapper
    assert a[0].logits is None
    fg_hf.apply(fused_linear=True)  # twice: wrapped once, reverted fully
    fg_hf.revert()
    assert all(loss_utils.LOSS_MAPPING[k] is stock_fn for k in aliases)
    assert transformers.LlamaForCausalLM.forward is stock_forward
    b = _loss_and_grads(ours, input_ids=ids, labels=labels)
    assert b[0].logits is not None
    _compare(a, b, "global fused vs stock")


def test_fused_linear_rejects_unsupported_model():
    from fusedgrad.integrations import transformers as fg_hf

    require("transformers")
    with pytest.raises(ValueError, match="fused_linear"):
        fg_hf.apply(torch.nn.Linear(2, 2), fused_linear=True)


# The other families fused_linear supports: loss and lm_head gradient vs stock (Gemma3 with
# soft-capping). Tiny configs; one layer.
OTHER_FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, final_logit_softcapping=4.0, query_pre_attn_scalar=16,
                    sliding_window=8)),
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_fused_linear_other_families(family):
    transformers = require("transformers")
    from fusedgrad.integrations import transformers as fg_hf

    cfg_name, cls_name, extra = OTHER_FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        attn_implementation="eager", **extra)
    torch.manual_seed(5)
    stock = getattr(transformers, cls_name)(cfg).to(DEVICE).float().train()
    ours = copy.deepcopy(stock)
    fg_hf.apply(ours, fused_linear=True)
    ids, labels = _batch()
    a = _loss_and_grads(ours, input_ids=ids, labels=labels)
    b = _loss_and_grads(stock, input_ids=ids, labels=labels)
    assert a[0].logits is None
    _compare(a, b, family)


def test_fused_linear_bf16_model_loss_is_fp32():
    # As transformers' own causal-LM loss (it upcasts the logits), the fused path returns an
    # fp32 loss for a bf16 model; the value agrees within bf16 tolerance.
    from fusedgrad.integrations import transformers as fg_hf

    stock, ours = _models("llama")
    stock, ours = stock.to(torch.bfloat16), ours.to(torch.bfloat16)
    fg_hf.apply(ours, fused_linear=True)
    ids, labels = _batch()
    a = _loss_and_grads(ours, input_ids=ids, labels=labels)
    b = _loss_and_grads(stock, input_ids=ids, labels=labels)
    assert a[0].loss.dtype == b[0].loss.dtype == torch.float32
    assert_close(a[0].loss, b[0].loss, torch.bfloat16, "bf16 loss")
    assert_close(a[1]["lm_head.weight"], b[1]["lm_head.weight"], torch.bfloat16, "lm_head")
