"""What the fused path supports, and where the LoRA weights of a peft layer are."""

from __future__ import annotations

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)


def inner_model(model):
    """The ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "model") and hasattr(base.model, "lm_head"):
        return base.model
    return model


def lora_parts(module):
    """(base layer, lora_A, lora_B, scaling, dropout p) of a peft LoRA layer, or (module, None...)."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None:
        return module, None, None, None, 0.0
    adapters = list(lora_a.keys())
    if len(adapters) != 1:
        raise ValueError(f"expected one LoRA adapter, found {adapters}")
    name = adapters[0]
    dropout = module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
    return module.base_layer, lora_a[name].weight, module.lora_B[name].weight, float(module.scaling[name]), p


def config_unsupported_reason(config) -> str | None:
    """Why the fused path cannot train a model of this ``config`` (None: it can)."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    return None


def unsupported_reason(model) -> str | None:
    """Why the fused path cannot train ``model`` (None: it can)."""
    inner = inner_model(model)
    reason = config_unsupported_reason(inner.config)
    if reason:
        return reason
    for layer in inner.model.layers:
        for parent, names in GROUPS:
            for name in names:
                module = getattr(getattr(layer, parent), name)
                if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
                    return "DoRA adapters"
                base = lora_parts(module)[0]
                if not isinstance(base, torch.nn.Linear):
                    return f"{name} is a {type(base).__name__}, not a linear layer"
    if any(p.requires_grad for n, p in inner.named_parameters() if "lora_" not in n):
        return "trainable parameters besides the LoRA weights"
    return None
