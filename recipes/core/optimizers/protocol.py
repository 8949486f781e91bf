"""What the shared loop needs to know about an optimizer, asked through methods, never by testing its name.

`OptimizerRecipe` describes an ordinary optimizer (backward, clip, step). Two families change the protocol:
- `FusedBackwardRecipe` (LOMO, AdaLomo): the update runs inside backward, at the scheduled lr; there is no step and
  no gradient accumulation.
- `ScheduleFreeRecipe` (schedule-free AdamW/SGD): weights are y while training and x (the average) when evaluated or
  saved, so the loop switches modes; the optimizer keeps its own warmup and needs no LR schedule.
Each `recipes/<name>.py` subclasses one of these and adds how its optimizer is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import pkgutil
import sys
import typing
from typing import TYPE_CHECKING, Optional

import torch
from optimizer_recipes.core.models.zero3_parameters import full_shape
from optimizer_recipes.core.per_tensor.steps import StepsEachTensor
from optimizer_recipes.core.per_tensor.stochastic_rounding import CHUNK as ROUNDING_CHUNK
from optimizer_recipes.core.per_tensor.stochastic_rounding import rounding_noise

if TYPE_CHECKING:
    from accelerate import Accelerator
    from optimizer_recipes.core.run.config import Config


def all_recipes() -> list[OptimizerRecipe]:
    """Every recipe: each module of the optimizer_recipes package (recipes/<name>.py) that defines `RECIPE`, by its
    `order`, then its name. Adding recipes/<name>.py adds a recipe; nothing lists them."""
    import optimizer_recipes

    found = {}
    for module in pkgutil.iter_modules(optimizer_recipes.__path__):
        if module.ispkg or module.name.startswith("_"):
            continue
        recipe = getattr(importlib.import_module(f"optimizer_recipes.{module.name}"), "RECIPE", None)
        if isinstance(recipe, OptimizerRecipe):
            found[recipe.name] = recipe
    return sorted(found.values(), key=lambda r: (r.order, r.name))


def recipe_names() -> list[str]:
    return [r.name for r in all_recipes()]


def recipe_named(name: str) -> OptimizerRecipe:
    return next(r for r in all_recipes() if r.name == name)


def reference_recipe() -> str:
    """The name of the recipe the others are compared with (AdamW's)."""
    return next(r.name for r in all_recipes() if r.is_reference)


def optimizer_arguments(recipe: OptimizerRecipe) -> type:
    """The dataclass a recipe's command line is parsed into beside the shared arguments: its own knobs, with its
    defaults, then every other recipe's (each once), so that a knob of another optimizer is recognised and refused
    with the one line naming the recipes that read it, and `config.optim.<knob>` reads any of them."""
    others = tuple(r.knobs for r in all_recipes() if r.knobs is not None and r.name != recipe.name)
    return _merged(recipe.knobs, others)


@functools.cache
def _merged(own: type | None, others: tuple[type, ...]) -> type:
    fields: dict[str, tuple] = {}
    for knobs in ((own,) if own else ()) + others:
        hints = typing.get_type_hints(knobs)
        for f in dataclasses.fields(knobs):
            if f.name not in fields:
                default = {"default": f.default} if f.default is not dataclasses.MISSING else {
                    "default_factory": f.default_factory}
                fields[f.name] = (f.name, hints[f.name], dataclasses.field(metadata=f.metadata, **default))
    return dataclasses.make_dataclass("OptimizerArguments", list(fields.values()))


def numel(shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel()


def largest_numel(shapes: list[tuple[int, ...]]) -> int:
    return max(numel(s) for s in shapes)


def factored_numel(shape: tuple[int, ...]) -> int:
    """Elements of an Adafactor-style second moment: a row and a column for a matrix, the whole of a vector."""
    if len(shape) < 2:
        return numel(shape)
    return numel(shape[:-1]) + numel(shape[:-2] + shape[-1:])


class ParameterShapes(list):
    """The trainable parameters' shapes, in model order, with each one's role (`parameter_roles`): what the memory
    estimator hands `optimizer_state_bytes`; a recipe that treats roles alike reads it as a plain list."""

    def __init__(self, shapes, roles):
        super().__init__(shapes)
        self.roles = list(roles)


def parameter_roles(model: torch.nn.Module) -> list[str]:
    """For each trainable parameter, in model order: "embedding" (the input embedding, also when the output layer is
    tied to it), "output" (an untied output layer), "linear" (the weight of any other nn.Linear: the decoder
    blocks' projections) or "other" (biases, norms)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output}
    roles = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p is embedding:
            roles.append("embedding")
        elif output is not None and p is output.weight:
            roles.append("output")
        else:
            roles.append("linear" if id(p) in linear else "other")
    return roles


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on biases and norm weights (the Transformers Trainer's convention)."""
    params = [p for p in model.parameters() if p.requires_grad]
    is_matrix = [len(full_shape(p)) >= 2 for p in params]  # ZeRO-3 partitions at construction
    groups = [{"params": [p for p, m in zip(params, is_matrix) if m], "weight_decay": weight_decay},
              {"params": [p for p, m in zip(params, is_matrix) if not m], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class OptimizerRecipe:
    """An optimizer with an ordinary step: backward, optional global-norm clipping, step, zero_grad."""

    name: str = ""
    order: int = 100  # its place in tables and lists (the Trainer page's seven first); then by name
    default_learning_rate: float = 1e-3  # for the embedded tiny model, trained from scratch
    fine_tuning_learning_rate: float = 2e-5  # with --model_name_or_path: a pretrained model
    default_lr_scheduler_type: str = "linear"
    default_max_grad_norm: float = 1.0
    trainer_optim: Optional[str] = None  # the Transformers Trainer's optim= name for this optimizer, if it has one
    compared_with: Optional[str] = None  # a recipe whose step time this one's is set against (launch/benchmark.py)
    is_reference: bool = False  # the recipe the others' memory and step time are compared with (AdamW)
    knobs: Optional[type] = None  # the dataclass of the flags this optimizer reads, with their defaults (knobs.py)
    keeps_master_weights: bool = True  # under 16-bit mixed precision, steps an fp32 copy of the weights
    updates_in_backward: bool = False  # the update runs inside backward (the LOMO family), not in a step after it
    update_note: str = ""  # said on the start-up line where the update is not an ordinary step
    family_notes: str = ""  # what every recipe of a family supports and refuses, said by --help after the docstring
    gradients_partitioned_by_zero: bool = True  # ZeRO-2/3 keep 1/N of the gradients per process
    # Settings from the optimizer's source that launch/finetune_comparison.py runs beside the sweep:
    # (what they are, learning rate, extra flags)
    source_settings: tuple[tuple[str, float, tuple[str, ...]], ...] = ()
    # An optional package the optimizer comes from: (module to import, what to pip install), or None
    requires: Optional[tuple[str, str]] = None

    def arguments_class(self) -> type:
        """The dataclass of every optimizer knob, with this recipe's defaults (`optimizer_arguments`)."""
        return optimizer_arguments(self)

    @property
    def reads_flags(self) -> tuple[str, ...]:
        """The optimizer knobs this recipe reads: its `knobs` dataclass's fields."""
        return tuple(f.name for f in dataclasses.fields(self.knobs)) if self.knobs else ()

    def optimizer_state_bytes(self, shapes: list[tuple[int, ...]], element_bytes: int) -> int:
        """Bytes of optimizer state for parameters of these shapes (for the memory estimator)."""
        raise NotImplementedError

    def gradient_bytes(self, shapes: list[tuple[int, ...]], element_bytes: int) -> int:
        """Bytes of gradients alive at once: all of them, for an optimizer that steps after backward."""
        return sum(numel(s) for s in shapes) * element_bytes

    def update_bytes(self, shapes: list[tuple[int, ...]], element_bytes: int) -> int:
        """Bytes an update holds at once beyond the gradients and the state, for the memory estimator: the fp32
        copies of a fused (LOMO-family) update. 0 here: a torch optimizer's step temporaries are not counted."""
        return 0

    def rounding_bytes(self, shapes: list[tuple[int, ...]]) -> int:
        """Bytes held at once to round updates stochastically into bf16 weights: the largest tensor's fp32
        stand-in and fp32 gradient (StepsEachTensor), and the noise of one chunk."""
        largest = largest_numel(shapes)
        return largest * 8 + min(largest, ROUNDING_CHUNK) * 4

    def build(self, model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
        raise NotImplementedError

    def build_for_run(self, model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
        """`build`, and how its updates reach the weights: with bf16 weights and --stochastic_rounding, each tensor
        stepped in fp32 and rounded stochastically (recipes/core/per_tensor/stochastic_rounding.py); else as `build` made it."""
        optimizer = self.build(model, config)
        noise = rounding_noise(config, model)
        return StepsEachTensor(optimizer, noise) if noise else optimizer

    @property
    def description(self) -> str:
        """What --help says: the recipe file's docstring (what it supports and what it refuses), then what its family
        shares (`family_notes`)."""
        doc = sys.modules[type(self).__module__].__doc__ or self.name
        return doc.rstrip("\n") + "\n" + self.family_notes if self.family_notes else doc

    def for_run(self, config: Config) -> OptimizerRecipe:
        """The recipe as a run with this configuration uses it: with --optimizer_in_backward, its optimizer stepped per
        parameter inside backward (recipes/core/per_tensor/in_backward.py)."""
        from optimizer_recipes.core.per_tensor.in_backward import UpdatesInBackward

        return UpdatesInBackward(self) if config.train.optimizer_in_backward else self

    def fill_defaults(self, config: Config) -> None:
        t = config.train
        if t.learning_rate is None:
            pretrained = config.model.model_name_or_path is not None
            t.learning_rate = self.fine_tuning_learning_rate if pretrained else self.default_learning_rate
            config.defaults_used["learning_rate"] = (
                f"{t.learning_rate:g}, the {self.name} recipe's default for "
                + ("fine-tuning a pretrained model" if pretrained else "the embedded model trained from scratch"))
        t.lr_scheduler_type = t.lr_scheduler_type or self.default_lr_scheduler_type
        t.max_grad_norm = self.default_max_grad_norm if t.max_grad_norm is None else t.max_grad_norm
        t.output_dir = t.output_dir or f"runs/{self.name}"

    def refuse(self, config: Config) -> Optional[str]:
        """A one-line reason this optimizer cannot run the configuration, or None."""
        return None

    def refuse_model(self, config: Config, model_config) -> Optional[str]:
        """A one-line reason this optimizer cannot train this model (read from its config: no weights loaded)."""
        return None

    def missing_package(self) -> Optional[str]:
        """One line saying how to install the optional package this optimizer comes from, if it is not installed."""
        if self.requires is None or importlib.util.find_spec(self.requires[0]) is not None:
            return None
        module, pip = self.requires
        return f"the {self.name} recipe needs the {module} package, which is not installed: pip install {pip}"

    def flags_it_does_not_read(self, flags_set: set[str]) -> Optional[str]:
        """A one-line error for an optimizer knob set on the command line that this optimizer does not read."""
        unread = sorted(flags_set - set(self.reads_flags))
        if not unread:
            return None
        readers = ", ".join(r.name for r in all_recipes() if unread[0] in r.reads_flags) or "no recipe"
        return f"--{unread[0]} has no effect on {self.name}; it is read by {readers}. Drop the flag or pick that recipe"

    def trainer_arguments(self) -> dict:
        """TrainingArguments beyond optim= with which the Trainer builds this recipe's optimizer at its defaults
        (launch/benchmark.py's Trainer harness)."""
        return {}

    def scheduler_warmup_steps(self, config: Config) -> int:
        return config.train.warmup_steps

    def prepare(self, accelerator: Accelerator, model, optimizer, train_loader, eval_loader, scheduler) -> tuple:
        """Hand the model, optimizer, loaders and scheduler to accelerate (DDP/FSDP wrappers, DeepSpeed's engine)."""
        return accelerator.prepare(model, optimizer, train_loader, eval_loader, scheduler)

    def full_state_dict(self, accelerator: Accelerator, model) -> dict:
        """The whole model's weights for save_pretrained (ZeRO-3 / FSDP shards gathered); every rank calls it."""
        return accelerator.get_state_dict(model)

    def micro_step_context(self, accelerator: Accelerator, model):
        """Wraps forward + backward (+ step) of one micro-batch. `accelerator.sync_gradients` says whether it is the
        step's last: gradients are synchronised across processes only then."""
        return contextlib.nullcontext() if accelerator.sync_gradients else accelerator.no_sync(model)

    def backward(self, accelerator: Accelerator, model, optimizer, loss: torch.Tensor, lr: float) -> None:
        """`loss`: this micro-batch's share of the step's loss (the shares of a step add up to it)."""
        accelerator.backward(loss * accelerator.gradient_accumulation_steps)  # accelerate (and DeepSpeed) divide it

    def step(self, accelerator: Accelerator, model, optimizer, max_grad_norm: float) -> Optional[float]:
        """Clip (at accumulation boundaries), step and zero the gradients; return the pre-clip norm if measured."""
        grad_norm = None
        if max_grad_norm > 0 and accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)  # DeepSpeed: last step's
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None if grad_norm is None else float(grad_norm)

    def after_evaluation(self, optimizer, config: Config, train_loss: float, eval_loss: float) -> dict:
        """Called on every rank after each evaluation during training, with the mean training loss since the previous
        one (both alike on every rank); returns numbers to log beside eval_loss."""
        return {}

    def train_mode(self, optimizer) -> None:
        """Called before training steps."""

    def eval_mode(self, optimizer) -> None:
        """Called before evaluating or saving: the weights must be the ones to evaluate and keep."""


def refuse_sharded_tensors(recipe: OptimizerRecipe, config: Config, why: str,
                           instead: str = "multi_gpu.yaml") -> Optional[str]:
    """For optimizers that cannot step a shard: FSDP2 hands them each parameter as this process's DTensor shard."""
    if config.launch.kind == "fsdp":
        return f"{recipe.name} under FSDP is not supported: {why}; use accelerate_configs/{instead}"
    return None


def refuse_flattened_partitions(recipe: OptimizerRecipe, config: Config, per_tensor_math: str,
                                instead: str = "multi_gpu.yaml or fsdp2.yaml") -> Optional[str]:
    """For optimizers whose math is per tensor: DeepSpeed hands them one flat partition per parameter group."""
    if config.launch.kind == "deepspeed":
        return (f"{recipe.name} under {config.launch.describe()} would silently change its math: DeepSpeed hands "
                f"the optimizer one flat 1-D partition per parameter group, and {per_tensor_math}; use "
                f"accelerate_configs/{instead}")
    return None
