"""Bytes per device for parameters, gradients, optimizer state and activations, without loading a weight.

The model is built on the meta device from its config. Parameters, gradients and optimizer state follow from the
parameter shapes and each recipe's own accounting (`OptimizerRecipe.optimizer_state_bytes`, `gradient_bytes`).
Activations are counted, not guessed: one forward runs on the meta device and every distinct tensor autograd saves
for backward is summed, plus the logits (alive until the loss is reduced), so any architecture, sequence length and
gradient checkpointing setting is covered. Attention is counted as a flash/memory-efficient kernel saves it (no
T x T matrix), as real SDPA runs on CPU and GPU.

Precision: "fp32"; "bf16-mixed" / "fp16-mixed" as DeepSpeed keeps them (16-bit parameters and gradients, an fp32
master copy counted with the optimizer state, fp32 optimizer state; LOMO/AdaLomo update the 16-bit weights in
place, no master); "bf16" (everything 16-bit). ZeRO stage s over N processes divides optimizer state (s >= 1),
gradients (s >= 2; not a fused update's, which all-reduces one parameter's whole gradient) and parameters (s = 3)
by N. A fused update's fp32 temporaries (`update_temporaries`, for the largest parameter) are counted as measured.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, masking_utils

from recipes.core import embedded

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")


@dataclass
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    update_temporaries: int  # fp32 copies a fused (LOMO-family) update holds for the largest parameter

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations + self.update_temporaries

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def meta_model(model_name_or_path: str | None, trust_remote_code: bool = False, dtype=torch.float32):
    config = AutoConfig.from_pretrained(model_name_or_path or str(embedded.EMBEDDED_DIR),
                                        trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    return model.train()


def activation_bytes(model, micro_batch: int, seq_len: int, gradient_checkpointing: bool) -> int:
    """Distinct tensors saved for backward by one meta-device forward with labels, plus the logits."""
    toggle = "enable" if gradient_checkpointing else "disable"
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; accept both
    (getattr(model, f"activation_checkpointing_{toggle}", None) or getattr(model, f"gradient_checkpointing_{toggle}"))()
    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}
    gqa_excess = [0]

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in params and id(base) not in params:
            saved[id(base)] = base.numel() * base.element_size()
        return tensor

    def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # Meta SDPA would take the math path and save the T x T weights; real runs save q, k, v, out, logsumexp.
        if k.shape[1] != q.shape[1]:  # grouped-query: real SDPA keeps k and v un-repeated
            repeat = q.shape[1] // k.shape[1]
            gqa_excess[0] += 2 * (repeat - 1) * k.numel() * k.element_size()
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        causal = is_causal or attn_mask is not None
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, causal, scale=scale)[0]

    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    with ExitStack() as stack:
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", flash_attention))
        # packed-sequence detection reads position values, which meta tensors do not have; a plain batch has none
        stack.enter_context(mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda *a, **k: None))
        out = model(input_ids=ids, labels=ids)
    logits = out.logits.numel() * out.logits.element_size()
    return sum(saved.values()) - gqa_excess[0] + logits


def estimate(recipe, model, precision: str = "fp32", micro_batch: int = 8, seq_len: int = 1024,
             gradient_checkpointing: bool = False, world_size: int = 1, zero_stage: int = 0) -> MemoryEstimate:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = model.to(torch.float32 if precision == "fp32" else torch.bfloat16)
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    numel = sum(torch.Size(s).numel() for s in shapes)
    weight_bytes = 4 if precision == "fp32" else 2
    state_bytes = 2 if precision == "bf16" else 4
    params = numel * weight_bytes + sum(b.numel() * b.element_size() for b in model.buffers())
    grads = recipe.gradient_bytes(shapes, weight_bytes)
    update = recipe.update_bytes(shapes, weight_bytes)
    state = recipe.optimizer_state_bytes(shapes, state_bytes)
    if precision.endswith("-mixed") and recipe.keeps_master_weights:
        state += numel * 4
    activations = activation_bytes(model, micro_batch, seq_len, gradient_checkpointing)
    n = max(world_size, 1)
    return MemoryEstimate(parameters=params // n if zero_stage >= 3 else params,
                          gradients=grads // n if zero_stage >= 2 and recipe.gradients_partitioned_by_zero else grads,
                          optimizer_state=state // n if zero_stage >= 1 else state,
                          activations=activations, update_temporaries=update)
