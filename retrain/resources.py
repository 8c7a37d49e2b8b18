"""Training precision and the memory check made before a CUDA run starts."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from monitor.errors import ConfigError, TrainingError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# Share of the free device memory a run may plan to use; the rest absorbs fragmentation.
MEMORY_HEADROOM = 0.9
# Activation bytes kept per token, per layer and per hidden unit in a BERT-style encoder:
# about 18 tensors of the hidden size survive to the backward pass in 2-byte precision,
# and 36 in fp32. Checkpointing keeps only the layer inputs.
ACTIVATION_TENSORS = {"bf16": 18, "fp16": 18, "fp32": 36}
CHECKPOINTED_TENSORS = 2


def resolve_precision(device: torch.device, preference: str) -> str:
    """Return the precision a run uses: bf16 where the GPU supports it, else fp16 on CUDA, fp32 on the CPU.

    Raises ConfigError for bf16 or fp16 on the CPU and for bf16 on a GPU without it.
    """
    if preference not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {preference!r}")
    if device.type != "cuda":
        if preference in ("bf16", "fp16"):
            raise ConfigError(f"precision {preference!r} needs a CUDA device; the CPU trains in fp32 (use 'auto' or 'fp32')")
        return "fp32"
    bf16 = torch.cuda.is_bf16_supported()
    if preference == "bf16" and not bf16:
        raise ConfigError(f"precision 'bf16' is not supported by {torch.cuda.get_device_name(device)}; use 'fp16' or 'auto'")
    if preference == "auto":
        return "bf16" if bf16 else "fp16"
    return preference


def autocast(device: torch.device, precision: str):
    """Return the autocast context of ``precision``; fp32 needs none."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def estimate_training_bytes(model: torch.nn.Module, *, batch_size: int, max_length: int, precision: str,
                            gradient_checkpointing: bool) -> int:
    """Estimate the peak device memory of training ``model``: weights, optimiser state, activations.

    Weights stay in fp32 under autocast. Each trainable parameter adds a gradient and two
    AdamW moments. Activations follow ``ACTIVATION_TENSORS`` per layer; the attention
    scores add heads × length² per layer.
    """
    parameters = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 768
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 12
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 12
    element = 4 if precision == "fp32" else 2
    tokens = batch_size * max_length
    if gradient_checkpointing:
        activations = CHECKPOINTED_TENSORS * tokens * hidden * layers * element
        # One layer at a time is recomputed in full during the backward pass.
        activations += ACTIVATION_TENSORS[precision] * tokens * hidden * element
    else:
        activations = ACTIVATION_TENSORS[precision] * tokens * hidden * layers * element
        activations += heads * batch_size * max_length * max_length * layers * element
    return 4 * parameters + 12 * trainable + activations


def check_cuda_memory(estimate: int, free: int, device: torch.device) -> None:
    """Raise TrainingError before training starts when ``estimate`` bytes do not fit in ``free``."""
    budget = int(free * MEMORY_HEADROOM)
    if estimate > budget:
        gib = 1024**3
        raise TrainingError(
            f"training needs about {estimate / gib:.2f} GiB on {device} but {free / gib:.2f} GiB are free "
            f"({MEMORY_HEADROOM:.0%} usable); lower batch_size or max_length, or enable gradient_checkpointing"
        )


def free_cuda_memory(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
