"""Bytes per device for parameters, gradients, optimizer state, activations and the loss, without loading a weight;
for a training step and for evaluation, whose larger is the run's peak.

The model is built on the meta device from its config. Parameters, gradients and optimizer state follow from the
parameter shapes and each recipe's own accounting (`OptimizerRecipe.optimizer_state_bytes`, `gradient_bytes`).
Activations are counted, not guessed: one forward runs on the meta device, with the loss the recipes use
(`recipes/core/run/token_loss.py`, every position counted as trained), and the most bytes its tensors hold at once
(those saved for backward and the transients beside them) is taken, so any architecture, sequence length and
gradient checkpointing setting is covered. Attention is
counted as a flash/memory-efficient kernel saves it (no T x T matrix), as real SDPA runs on CPU and GPU. The loss's
backward holds, at its peak, the output layer's weight gradient and two fp32 chunks of logits (`loss_temporaries`;
whole logits with `chunked_loss=False`). Evaluation (`evaluation`: no gradients, --per_device_eval_batch_size
rows) is the peak of live tensors in a meta-device forward without autograd, on top of parameters and optimizer
state.

Precision: "fp32"; "bf16-mixed" / "fp16-mixed" as DeepSpeed keeps them (16-bit parameters and gradients, an fp32
master copy counted with the optimizer state, fp32 optimizer state; LOMO/AdaLomo update the 16-bit weights in
place, no master); "bf16" (16-bit weights and gradients, each update rounded stochastically: an ordinary
recipe's optimizer state is fp32 and one tensor's fp32 copy, fp32 gradient and rounding noise are held at once,
recipes/core/per_tensor/stochastic_rounding.py; the LOMO family adds the noise to its fused update); "bf16-nearest"
(everything 16-bit, rounded to nearest: --stochastic_rounding false, or fp16 weights). ZeRO stage s over N
processes divides optimizer state (s >= 1),
gradients (s >= 2; not a fused update's, which all-reduces one parameter's whole gradient) and parameters (s = 3)
by N. A fused update's fp32 temporaries (`update_temporaries`, for the largest parameter) are counted as measured.
"""

from __future__ import annotations

import contextlib
import weakref
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from optimizer_recipes.core.data import embedded
from optimizer_recipes.core.models import gguf_source
from optimizer_recipes.core.optimizers.protocol import ParameterShapes, parameter_roles
from optimizer_recipes.core.run.token_loss import CHUNK_LOGITS, MIN_POSITIONS, build_token_loss
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, masking_utils

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16", "bf16-nearest")


@dataclass
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int  # the most the forward's tensors hold at once (at its end: saved ones + the loss's transients)
    update_temporaries: int  # fp32 copies a fused (LOMO-family) update holds for the largest parameter
    loss_temporaries: int  # the loss's backward at its peak: output-layer weight gradient + two fp32 logit chunks
    training: int  # a training step's peak (see `training_peak`)
    evaluation: int  # the evaluation's peak: parameters + optimizer state + a no-grad forward's live tensors

    @property
    def total(self) -> int:
        """The run's peak: a training step's or the evaluation's, whichever is larger."""
        return max(self.training, self.evaluation)

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def training_peak(parameters: int, gradients: int, optimizer_state: int, activations: int, saved_activations: int,
                  loss_temporaries: int, update_temporaries: int, tied_weight: int) -> int:
    """Parameters and optimizer state are there throughout; on top, the largest of three moments: the end of the
    forward (every activation), the start of backward (the saved activations and the loss's backward), and the end
    of backward (the gradients, and a tied output/input weight's two partial gradients being added)."""
    return parameters + optimizer_state + update_temporaries + max(
        activations, saved_activations + loss_temporaries, gradients + 2 * tied_weight)


def meta_model(model_name_or_path: str | None, trust_remote_code: bool = False, dtype=torch.float32, config=None):
    """The model built on the meta device (no weights) from its config: `config` if given, else read from
    `model_name_or_path` (a hub id, a folder, a config.json file or a GGUF file; None: the embedded model)."""
    if config is None and gguf_source.is_gguf(model_name_or_path):
        config = gguf_source.load_config(model_name_or_path)
    elif config is None:
        config = AutoConfig.from_pretrained(model_name_or_path or str(embedded.EMBEDDED_DIR),
                                            trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    return model.train()


class _LiveTensorBytes(TorchDispatchMode):
    """The largest total size of the tensors alive at once, among those the operations inside create."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = [r.alias_info is not None for r in func._schema.returns]  # views and in-place results: no new memory
        results = out if isinstance(out, (tuple, list)) else [out]
        for result, alias in zip(results, aliases + [True] * len(results)):
            if isinstance(result, torch.Tensor) and not alias:
                size = result.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(result, self._freed, size)
        return out

    def _freed(self, size: int) -> None:
        self.live -= size


@contextlib.contextmanager
def _meta_forward_patches(gqa_excess: list | None = None):
    """A meta-device forward that runs like a real one: attention as flash/memory-efficient SDPA saves it.
    `gqa_excess` collects the bytes of k and v repeated here for grouped-query attention, which real SDPA does
    not keep."""
    def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # Meta SDPA would take the math path and keep the T x T weights; real runs keep q, k, v, out, logsumexp.
        if k.shape[1] != q.shape[1]:  # grouped-query: real SDPA keeps k and v un-repeated
            repeat = q.shape[1] // k.shape[1]
            if gqa_excess is not None:
                gqa_excess.append(2 * (repeat - 1) * k.numel() * k.element_size())
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        causal = is_causal or attn_mask is not None
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, causal, scale=scale)[0]

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", flash_attention))
        # packed-sequence detection reads position values, which meta tensors do not have; a plain batch has none
        stack.enter_context(mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda *a, **k: None))
        yield


def _token_loss(model, chunked_loss: bool):
    return build_token_loss(model, chunked_loss)[0]  # installed once per model


def activation_bytes(model, micro_batch: int, seq_len: int, gradient_checkpointing: bool,
                     chunked_loss: bool = True) -> tuple[int, int]:
    """(largest, saved): of the tensors one meta-device forward and loss create (every position trained), the most
    bytes alive at once (the saved ones plus the transients of that moment: a loss chunk's logits at the end of
    the forward; with checkpointing, one layer's working tensors), and what autograd saves for backward."""
    toggle = "enable" if gradient_checkpointing else "disable"
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; accept both
    (getattr(model, f"activation_checkpointing_{toggle}", None) or getattr(model, f"gradient_checkpointing_{toggle}"))()
    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in params and id(base) not in params:
            saved[id(base)] = base.untyped_storage().nbytes()
        return tensor

    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    loss, gqa_excess, live = _token_loss(model, chunked_loss), [], _LiveTensorBytes()
    with _meta_forward_patches(gqa_excess), live, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rows = loss(model, {"input_ids": ids, "labels": ids})
    del rows
    # checkpointed layers save their inputs only: the repeated k and v never reach backward
    excess = 0 if gradient_checkpointing else sum(gqa_excess)
    return live.peak - excess, sum(saved.values()) - excess


def loss_temporary_bytes(model, micro_batch: int, seq_len: int, chunked_loss: bool = True) -> int:
    """What the loss's backward holds at its peak beyond the saved activations: the output layer's weight gradient
    (one buffer, as the chunked backward keeps it: fp32, and for a 16-bit weight its 16-bit copy at the end), two
    fp32 chunks of logits (softmax and its scaled copy) and the hidden-state gradient of the trained positions; with
    whole logits, two fp32 copies of them."""
    head = model.get_output_embeddings()
    positions = micro_batch * (seq_len - 1)
    chunk = min(positions, max(MIN_POSITIONS, CHUNK_LOGITS // head.out_features)) if chunked_loss else positions
    size = head.weight.element_size()
    gradient = head.weight.numel() * (4 + size if chunked_loss and size < 4 else size)
    return gradient + 2 * chunk * head.out_features * 4 + positions * head.in_features * size


@torch.no_grad()
def evaluation_activation_bytes(model, eval_batch: int, seq_len: int, chunked_loss: bool = True) -> int:
    """The most tensor bytes alive at once in a no-grad meta-device forward and loss of one evaluation batch."""
    model.eval()
    ids = torch.zeros(eval_batch, seq_len, dtype=torch.long, device="meta")
    loss = _token_loss(model, chunked_loss)
    live = _LiveTensorBytes()
    with _meta_forward_patches(), live:
        rows = loss(model, {"input_ids": ids, "labels": ids})
    del rows
    model.train()
    return live.peak


@dataclass
class _Footprint:
    """What a run holds whatever its optimizer: the model's bytes and its forward's, at one precision and batch."""
    shapes: list
    numel: int
    weight_bytes: int
    state_bytes: int
    parameters: int
    activations: int
    saved_activations: int
    loss_temporaries: int
    evaluation_activations: int
    tied: int


def _footprint(model, precision: str, micro_batch: int, seq_len: int, gradient_checkpointing: bool,
               eval_batch: int | None, chunked_loss: bool) -> _Footprint:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = model.to(torch.float32 if precision == "fp32" else torch.bfloat16)
    shapes = ParameterShapes([tuple(p.shape) for p in model.parameters() if p.requires_grad], parameter_roles(model))
    numel = sum(torch.Size(s).numel() for s in shapes)
    weight_bytes = 4 if precision == "fp32" else 2
    activations, saved = activation_bytes(model, micro_batch, seq_len, gradient_checkpointing, chunked_loss)
    head = model.get_output_embeddings().weight
    return _Footprint(
        shapes=shapes, numel=numel, weight_bytes=weight_bytes, state_bytes=2 if precision == "bf16-nearest" else 4,
        parameters=numel * weight_bytes + sum(b.numel() * b.element_size() for b in model.buffers()),
        activations=activations, saved_activations=saved,
        loss_temporaries=loss_temporary_bytes(model, micro_batch, seq_len, chunked_loss),
        evaluation_activations=evaluation_activation_bytes(model, eval_batch or micro_batch, seq_len, chunked_loss),
        tied=head.numel() * weight_bytes if head is model.get_input_embeddings().weight else 0)


def _recipe_estimate(recipe, f: _Footprint, precision: str, world_size: int, zero_stage: int) -> MemoryEstimate:
    grads = recipe.gradient_bytes(f.shapes, f.weight_bytes)
    update = recipe.update_bytes(f.shapes, f.weight_bytes)
    if precision == "bf16":  # rounded stochastically into the 16-bit weights
        update += recipe.rounding_bytes(f.shapes)
    state = recipe.optimizer_state_bytes(f.shapes, f.state_bytes)
    if precision.endswith("-mixed") and recipe.keeps_master_weights:
        state += f.numel * 4
    n = max(world_size, 1)
    params = f.parameters // n if zero_stage >= 3 else f.parameters
    state = state // n if zero_stage >= 1 else state
    grads = grads // n if zero_stage >= 2 and recipe.gradients_partitioned_by_zero else grads
    return MemoryEstimate(parameters=params, gradients=grads, optimizer_state=state, activations=f.activations,
                          update_temporaries=update, loss_temporaries=f.loss_temporaries,
                          training=training_peak(params, grads, state, f.activations, f.saved_activations,
                                                 f.loss_temporaries, update, f.tied),
                          evaluation=params + state + f.evaluation_activations)


def estimate(recipe, model, precision: str = "fp32", micro_batch: int = 8, seq_len: int = 1024,
             gradient_checkpointing: bool = False, world_size: int = 1, zero_stage: int = 0,
             eval_batch: int | None = None, chunked_loss: bool = True) -> MemoryEstimate:
    return estimate_each([recipe], model, precision, micro_batch, seq_len, gradient_checkpointing, world_size,
                         zero_stage, eval_batch, chunked_loss)[recipe.name]


def estimate_each(recipes, model, precision: str = "fp32", micro_batch: int = 8, seq_len: int = 1024,
                  gradient_checkpointing: bool = False, world_size: int = 1, zero_stage: int = 0,
                  eval_batch: int | None = None, chunked_loss: bool = True) -> dict[str, MemoryEstimate]:
    """`estimate` for several recipes at once: the forwards on the meta device (what takes time) run once."""
    f = _footprint(model, precision, micro_batch, seq_len, gradient_checkpointing, eval_batch, chunked_loss)
    return {r.name: _recipe_estimate(r, f, precision, world_size, zero_stage) for r in recipes}
