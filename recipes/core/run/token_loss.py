"""The loss, per row of a batch: summed next-token cross-entropy over the trained tokens, and how many were right.

The loop turns these sums into one mean over all the trained tokens of an optimizer step (every micro-batch, every
process), as the Transformers Trainer does since 4.46 (`num_items_in_batch`): a one-word answer then weighs one
token, not as much as a forty-word one, and the result does not depend on how the step's batch is split.

Two ways to get the sums, both returning `RowLosses`:
- `ChunkedLoss` (the default, `--chunked_loss true`): the model's output layer runs on the final hidden states of
  the trained positions only (labels other than -100: answer-only chat data trains about a quarter of the tokens),
  a chunk of `CHUNK_LOGITS` logits at a time; each chunk's logits are recomputed in backward instead of kept, and
  the chunks' output-layer gradients are added into one buffer in place (`_ChunkedCrossEntropy`). The
  full-vocabulary logits (tokens x vocabulary, fp32: 384 MiB for 2048 tokens of a 49k vocabulary) never exist at
  once, in training or evaluation. The model's forward runs as usual, through every
  wrapper (DDP, DeepSpeed ZeRO-3, FSDP2 gather the output layer's weight as for any forward); only the output
  layer's forward is replaced, on this model instance, while targets are set. Tied embeddings keep working: the
  layer's weight is used, whatever else shares it.
- `FullLogitsLoss` (`--chunked_loss false`, or a model whose logits are not a plain linear map of the hidden
  states, e.g. Gemma 2's soft-capping): the model's logits, whole.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from optimizer_recipes.core.data.chat_masks import IGNORE_INDEX

CHUNK_LOGITS = 1 << 22  # logits per chunk (positions x vocabulary): 16 MiB in fp32
MIN_POSITIONS = 64  # fewer positions per matrix product round differently (one position: a matrix-vector product)
# config attributes of models whose forward changes the output layer's result before returning it as logits
LOGIT_POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                         "lm_head_multiplier", "logits_scale")
NOT_MODEL_INPUTS = ("labels", "token_counts")


@dataclass
class RowLosses:
    loss_sums: torch.Tensor  # (rows,) fp32: summed cross-entropy of each row's trained tokens
    correct: torch.Tensor  # (rows,) long: trained tokens whose argmax prediction was right
    trained: torch.Tensor  # (rows,) long: trained tokens (labels[:, 1:] other than -100)

    def predictions(self) -> torch.Tensor:
        """(correct, trained) over the batch, for the token accuracy."""
        return torch.stack([self.correct.sum(), self.trained.sum()])


def trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Trained tokens per row: the positions a causal LM predicts (labels shifted by one) that are not -100."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, a chunk of positions at a time.

    Forward keeps nothing of a chunk's logits; backward recomputes them chunk by chunk and adds each chunk's weight
    gradient into one buffer in place (autograd would hold a whole weight-sized gradient per chunk and add them out
    of place: 3 x vocabulary x hidden at once). The same arithmetic as the whole-logits loss: fp32 logits, the
    gradient cast to the dtype the forward's product ran in (the weight's, or autocast's under mixed precision)
    before the matrix products, as autograd casts it back through `.float()`; the chunks' weight gradients are
    summed in fp32 and cast to the weight's dtype once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, num_rows, positions_per_chunk):
        loss_sums = torch.zeros(num_rows, dtype=_at_least_fp32(hidden[:0]).dtype, device=hidden.device)
        correct = torch.zeros(num_rows, dtype=torch.long, device=hidden.device)
        for part in _chunks(len(targets), positions_per_chunk):
            logits = _at_least_fp32(F.linear(hidden[part], weight, bias))
            loss_sums.index_add_(0, rows[part], F.cross_entropy(logits, targets[part], reduction="none"))
            correct.index_add_(0, rows[part], (logits.argmax(dim=-1) == targets[part]).long())
        ctx.save_for_backward(hidden, targets, rows)
        ctx.weight, ctx.bias, ctx.positions_per_chunk = weight, bias, positions_per_chunk  # read when backward runs
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.mark_non_differentiable(correct)
        return loss_sums, correct

    @staticmethod
    def backward(ctx, grad_loss_sums, grad_correct):
        hidden, targets, rows = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias  # (under ZeRO-3: gathered again for this backward, as for any layer's)
        device_type, autocast, autocast_dtype = ctx.autocast
        # the dtype the forward's matrix product ran in: autocast's (bf16 mixed precision), else the weight's
        dtype = autocast_dtype if autocast else weight.dtype
        matrix = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        # the chunks' gradients are summed in fp32 at least (16-bit weights: rounded once, at the end, as one product's)
        total = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_weight = torch.zeros_like(weight, dtype=total) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=total) if bias is not None and bias.requires_grad else None
        for part in _chunks(len(targets), ctx.positions_per_chunk):
            with torch.autocast(device_type, dtype=autocast_dtype) if autocast else contextlib.nullcontext():
                logits = _at_least_fp32(F.linear(hidden[part], weight, bias))  # the forward's logits again
            grad_logits = torch.softmax(logits, dim=-1)  # d(cross-entropy)/d(logits) = softmax - one-hot
            del logits
            grad_logits[torch.arange(len(grad_logits), device=grad_logits.device), targets[part]] -= 1
            grad_logits = (grad_logits * grad_loss_sums[rows[part]].unsqueeze(1)).to(dtype)
            grad_hidden[part] = grad_logits @ matrix
            if grad_weight is not None and dtype == grad_weight.dtype:
                grad_weight.addmm_(grad_logits.T, hidden[part])
            elif grad_weight is not None:  # 16-bit weights or autocast: the product in 16 bits, summed in fp32
                grad_weight += grad_logits.T @ hidden[part].to(dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype | None]:
    """(device type, autocast on, its dtype) where the forward runs; off for devices autocast has no notion of (the
    memory estimator's meta tensors)."""
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except RuntimeError:
        return device_type, False, None


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _chunks(length: int, size: int):
    return (slice(start, start + size) for start in range(0, length, size))


def row_losses_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> RowLosses:
    """RowLosses from whole logits (rows x positions x vocabulary)."""
    logits, targets = _at_least_fp32(logits[:, :-1]), labels[:, 1:]
    trained = targets != IGNORE_INDEX
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view(targets.shape)
    with torch.no_grad():
        correct = ((logits.argmax(dim=-1) == targets) & trained).sum(dim=1)
    return RowLosses(losses.sum(dim=1), correct, trained.sum(dim=1))


class FullLogitsLoss:
    """The model's own logits, whole."""

    description = "the whole logits at once"

    def __call__(self, model, batch: dict) -> RowLosses:
        logits = model(**model_inputs(batch), use_cache=False).logits  # no cache: packed examples stay apart
        return row_losses_from_logits(logits, batch["labels"])


class ChunkedLoss:
    """Installed on a model's output layer: while targets are set, that layer returns per-row loss sums."""

    def __init__(self, model: torch.nn.Module, chunk_logits: int = CHUNK_LOGITS):
        self.head = model.get_output_embeddings()
        self.positions_per_chunk = max(MIN_POSITIONS, chunk_logits // self.head.out_features)
        self.description = (f"logits of the trained positions only, {self.positions_per_chunk:,} positions at a "
                            "time (--chunked_loss false: all at once)")
        self._plain_forward = self.head.forward
        self._targets: torch.Tensor | None = None
        self._correct: torch.Tensor | None = None
        self.head.forward = self._forward  # on this instance only; the module and its weights are unchanged
        self.head.chunked_loss = self

    @staticmethod
    def unsupported_because(model: torch.nn.Module) -> str | None:
        """Why this model's logits cannot be computed in chunks here, or None."""
        head = model.get_output_embeddings()
        if type(head) is not torch.nn.Linear:
            return f"its output layer is a {type(head).__name__}, not a plain torch.nn.Linear"
        scaled = [name for name in LOGIT_POST_PROCESSING if getattr(model.config, name, None) not in (None, 1, 1.0)]
        if scaled:
            return f"its forward changes the logits after the output layer ({scaled[0]} in its config)"
        return None

    def __call__(self, model, batch: dict) -> RowLosses:
        return self._with_targets(batch["labels"], lambda: model(**model_inputs(batch), use_cache=False).logits)

    def of_hidden_states(self, hidden: torch.Tensor, labels: torch.Tensor) -> RowLosses:
        """The same loss from the final hidden states the output layer receives (to time the loss on its own)."""
        return self._with_targets(labels, lambda: self.head(hidden))

    def _with_targets(self, labels: torch.Tensor, forward) -> RowLosses:
        self._targets = labels[:, 1:]
        try:
            loss_sums = forward()  # what _forward returned
        finally:
            self._targets = None
        correct, self._correct = self._correct, None
        return RowLosses(loss_sums, correct, trained_tokens(labels))

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        targets = self._targets
        if targets is None:  # generation, or any other use of the model: the plain layer
            return self._plain_forward(hidden)
        keep = targets != IGNORE_INDEX  # position t predicts token t + 1: hidden[:, :-1] against labels[:, 1:]
        hidden = hidden[:, :-1]
        if keep.is_meta:  # the memory estimator's meta-device forward: every position counted as trained
            rows = torch.arange(keep.shape[0], device=keep.device).repeat_interleave(keep.shape[1])
            hidden, targets = hidden.flatten(0, 1), targets.flatten()
        else:  # only the trained positions reach the output layer
            rows = keep.nonzero()[:, 0]
            hidden, targets = hidden[keep], targets[keep]
        loss_sums, self._correct = _ChunkedCrossEntropy.apply(hidden, self.head.weight, self.head.bias, targets, rows,
                                                              keep.shape[0], self.positions_per_chunk)
        return loss_sums


def build_token_loss(model: torch.nn.Module, chunked: bool) -> tuple[ChunkedLoss | FullLogitsLoss, str]:
    """The loss for this model, and the line that says how it is computed (and why not in chunks, if asked)."""
    reason = ChunkedLoss.unsupported_because(model) if chunked else None
    if chunked and reason is None:
        loss = getattr(model.get_output_embeddings(), "chunked_loss", None) or ChunkedLoss(model)
    else:
        loss = FullLogitsLoss()
    why = f" (the model's logits cannot be computed in chunks: {reason})" if reason else ""
    return loss, f"loss: the mean over each step's trained tokens; {loss.description}{why}"

