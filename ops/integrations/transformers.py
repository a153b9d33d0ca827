"""fusedgrad in Hugging Face transformers: the causal-LM loss, and optionally the fused
lm_head + loss.

    from fusedgrad.integrations import transformers as fg_hf

    fg_hf.apply()                       # every model: causal-LM loss on fusedgrad
    fg_hf.apply(model)                  # this model only
    fg_hf.apply(model, fused_linear=True)  # training with labels never builds logits
    fg_hf.revert()                      # undo everything apply() changed

``apply()`` replaces ``LOSS_MAPPING["ForCausalLM"]`` and every entry that aliases the same
function (``ForConditionalGeneration``, ...) with :func:`causal_lm_loss`:
``fusedgrad.cross_entropy`` on the logits as the model produced them (no fp32 copy: the
kernel computes in fp32 and writes the gradient in the logits' dtype), with transformers'
label shift, ``shift_labels``, ``ignore_index`` and ``num_items_in_batch`` (a "sum"
divided on the device through ``divisor=``). The loss comes back in the logits' dtype,
as ``F.cross_entropy`` returns it (transformers' own loss is fp32 because it upcasts);
the fused path returns it in fp32.

``fused_linear=True`` also wraps the forward of Llama, Mistral, Qwen2, Qwen3, Gemma2 and
Gemma3 causal LMs (``*ForCausalLM``). In training mode with ``labels``, the model runs as
usual up to the final hidden states (``logits_to_keep`` slices them as usual); the
lm_head then passes its input through unchanged and the loss is
:func:`fusedgrad.linear_cross_entropy` of those hidden states with the lm_head's weight,
with Gemma's ``final_logit_softcapping`` as ``softcap``. The (tokens x vocabulary) logits
never exist: the output has ``logits=None`` (as Liger-Kernel and Cut Cross-Entropy do).
Evaluation (``model.eval()``), calls without labels and generation run the stock forward.
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch
import torch.nn.functional as F

from ..cross_entropy import cross_entropy
from ..linear_cross_entropy import _linear_cross_entropy

# (module path, class name) of the causal LMs whose forward fused_linear wraps.
FUSED_LINEAR_MODELS = (
    ("transformers.models.llama.modeling_llama", "LlamaForCausalLM"),
    ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM"),
    ("transformers.models.gemma2.modeling_gemma2", "Gemma2ForCausalLM"),
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3ForCausalLM"),
)

_UNDO: list = []  # callables restoring what apply() changed, most recent last
_LOCK = threading.Lock()


# ---------------------------------------------------------------- the losses

def _shifted_labels(labels, shift_labels, ignore_index):
    if shift_labels is None:
        # tokens < n predict n: the last position has no next token
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels


def _divisor(num_items_in_batch, device):
    if num_items_in_batch is None:
        return "mean", None
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(device)
    return "sum", num_items_in_batch


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels=None, **kwargs):
    """transformers' ``ForCausalLMLoss`` on :func:`fusedgrad.cross_entropy`."""
    shift_labels = _shifted_labels(labels, shift_labels, ignore_index)
    logits2 = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(logits2.device)
    reduction, divisor = _divisor(num_items_in_batch, logits2.device)
    return cross_entropy(logits2, target, ignore_index=ignore_index, reduction=reduction,
                         divisor=divisor)


def fused_causal_lm_loss(hidden_states, lm_head_weight, labels, *, lm_head_bias=None,
                         num_items_in_batch=None, ignore_index: int = -100, shift_labels=None,
                         softcap: float | None = None):
    """The causal-LM loss of ``lm_head(hidden_states)`` by
    :func:`fusedgrad.linear_cross_entropy` (no logits)."""
    shift_labels = _shifted_labels(labels, shift_labels, ignore_index)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    target = shift_labels.reshape(-1).to(hidden.device)
    reduction, divisor = _divisor(num_items_in_batch, hidden.device)
    # The loss in fp32, as transformers' own (it is computed in fp32 either way).
    return _linear_cross_entropy(hidden, lm_head_weight, target, linear_bias=lm_head_bias,
                                 weight=None, reduction=reduction, ignore_index=ignore_index,
                                 label_smoothing=0.0, z_loss=0.0, softcap=softcap,
                                 divisor=divisor, process_group=None, chunk_size=None,
                                 fp32_loss=True)


# ---------------------------------------------------------------- the fused forward

def _without_logits(out):
    """The model output with the placeholder logits dropped (logits=None)."""
    if isinstance(out, tuple):
        # return_dict=False: (loss, logits, ...) when a loss was computed
        return out[:1] + out[2:]
    fields = {k: v for k, v in out.items() if k != "logits"}
    return type(out)(**fields)


def _fused_forward(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        if not (self.training and labels is not None):
            return original(self, *args, **kwargs)
        lm_head = self.get_output_embeddings()
        softcap = getattr(self.config, "final_logit_softcapping", None)

        def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None,
                          ignore_index=-100, shift_labels=None, **_):
            # `logits` is the lm_head's input here (the hidden states, sliced by
            # logits_to_keep): the pass-through below.
            return fused_causal_lm_loss(
                logits, lm_head.weight, labels, lm_head_bias=lm_head.bias,
                num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                shift_labels=shift_labels, softcap=softcap)

        saved_forward = lm_head.__dict__.get("forward")
        saved_loss = self.__dict__.get("_loss_function")
        lm_head.forward = lambda hidden: hidden
        self._loss_function = loss_function
        if softcap is not None:
            self.config.final_logit_softcapping = None  # applied inside the fused loss
        try:
            out = original(self, *args, **kwargs)
        finally:
            if softcap is not None:
                self.config.final_logit_softcapping = softcap
            if saved_forward is None:
                del lm_head.forward
            else:
                lm_head.forward = saved_forward
            if saved_loss is None:
                del self._loss_function
            else:
                self._loss_function = saved_loss
        return _without_logits(out)

    forward.__fusedgrad_original__ = original
    return forward


def _supported_classes():
    import importlib

    classes = []
    for module_name, cls_name in FUSED_LINEAR_MODELS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a transformers without this model family
            continue
        cls = getattr(module, cls_name, None)
        if cls is not None:
            classes.append(cls)
    return classes


# ---------------------------------------------------------------- apply / revert

def apply(model=None, *, fused_linear: bool = False) -> None:
    """Route the causal-LM loss through fusedgrad: for every model (``model=None``) or
    for ``model`` only; ``fused_linear=True`` also fuses lm_head + loss (see the module
    docstring). Undo with :func:`revert`."""
    from transformers.loss import loss_utils

    with _LOCK:
        if model is None:
            _apply_global(loss_utils, fused_linear)
        else:
            _apply_model(model, fused_linear)


def _apply_global(loss_utils, fused_linear):
    stock = loss_utils.ForCausalLMLoss
    mapping = loss_utils.LOSS_MAPPING
    for key, fn in list(mapping.items()):
        if fn is stock:
            mapping[key] = causal_lm_loss
            _UNDO.append(functools.partial(mapping.__setitem__, key, fn))
    if fused_linear:
        for cls in _supported_classes():
            if "__fusedgrad_original__" in getattr(cls.forward, "__dict__", {}):
                continue  # already wrapped by an earlier apply()
            original = cls.forward
            cls.forward = _fused_forward(original)
            _UNDO.append(functools.partial(setattr, cls, "forward", original))


def _apply_model(model, fused_linear):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fusedgrad.integrations.transformers.apply: `model` must be a "
                        f"transformers model, got {type(model).__name__}")
    if fused_linear:
        supported = _supported_classes()
        if not isinstance(model, tuple(supported)):
            names = ", ".join(name for _, name in FUSED_LINEAR_MODELS)
            raise ValueError(f"fusedgrad.integrations.transformers.apply: fused_linear=True "
                             f"supports {names}; got {type(model).__name__}")
    had_loss = "_loss_function" in model.__dict__
    old_loss = model.__dict__.get("_loss_function")
    model._loss_function = causal_lm_loss

    def undo_loss():
        if had_loss:
            model._loss_function = old_loss
        else:
            model.__dict__.pop("_loss_function", None)

    _UNDO.append(undo_loss)
    if fused_linear and "forward" not in model.__dict__:
        original = type(model).forward
        original = getattr(original, "__fusedgrad_original__", original)
        model.forward = _fused_forward(original).__get__(model)
        _UNDO.append(lambda: model.__dict__.pop("forward", None))


def revert() -> None:
    """Undo every :func:`apply` (most recent first)."""
    with _LOCK:
        while _UNDO:
            _UNDO.pop()()


def is_applied() -> bool:
    return bool(_UNDO)
