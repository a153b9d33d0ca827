"""Optional integrations with other libraries (each imports its library lazily).

``fusedgrad.integrations.transformers``: Hugging Face transformers (causal-LM loss and
fused lm_head + loss); needs the ``transformers`` extra.
"""
