"""What a run is made of, set up before its first step: `set_up` returns a `Run`.

Data is loaded and checked before any model is loaded, so bad data fails in seconds; the model's output layer gets
the run's loss before any wrapper (DDP, DeepSpeed, FSDP) goes around it; the recipe builds its optimizer and hands
everything to accelerate; a resumed run gets its checkpoint's state. The start-up lines say what was resolved.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from optimizer_recipes.core.data.loading import build_datasets, load_raw_datasets
from optimizer_recipes.core.data.packing import PaddingCollator
from optimizer_recipes.core.memory.profile import CudaMemoryHistory, MemoryProfile, PeakMemoryMeter
from optimizer_recipes.core.models import attention
from optimizer_recipes.core.models.sources import load_model, load_model_config, load_tokenizer
from optimizer_recipes.core.models.zero3_parameters import full_numel
from optimizer_recipes.core.optimizers.protocol import OptimizerRecipe
from optimizer_recipes.core.per_tensor.stochastic_rounding import rounding_note
from optimizer_recipes.core.run.accelerate_fixes import (
    keep_fsdp_on_cpu,
    look_up_lomo_once,
    refuse_unconnected_processes,
)
from optimizer_recipes.core.run.checkpoint import (
    TrainerState,
    checkpoints_in,
    continue_schedule,
    load_checkpoint,
    resume_settings,
)
from optimizer_recipes.core.run.config import (
    Config,
    ConfigError,
    default_block_size,
    parse_step_window,
    schedule_kwargs,
    trackers,
)
from optimizer_recipes.core.run.metrics import TrainingMetrics, progress_bars_wanted
from optimizer_recipes.core.run.preemption import PreemptionRequest
from optimizer_recipes.core.run.throughput import (
    compute_dtype,
    flops_per_token,
    mfu_note,
    peak_flops,
    peak_flops_source,
    peak_remeasurer,
)
from optimizer_recipes.core.run.token_loss import ChunkedLoss, FullLogitsLoss, build_token_loss
from optimizer_recipes.core.run.torch_compile import compile_decoder_blocks
from torch.utils.data import DataLoader
from transformers import get_scheduler


@dataclass
class Run:
    """Everything one training job holds while it runs."""

    recipe: OptimizerRecipe
    config: Config
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    eval_loader: DataLoader
    shuffle: torch.Generator
    tokenizer: object
    token_loss: ChunkedLoss | FullLogitsLoss
    state: TrainerState
    resume_fingerprint: dict  # what a resume must share with this run (trainer_state.json)
    total_steps: int
    metrics: TrainingMetrics
    memory_meter: PeakMemoryMeter
    memory_history: CudaMemoryHistory
    memory_profile: MemoryProfile
    preemption: PreemptionRequest
    first_bad_step: torch.Tensor  # 0 while every loss is finite, else the first step whose loss was not

    @property
    def output_dir(self) -> Path:
        return Path(self.config.train.output_dir)


def set_up(recipe: OptimizerRecipe, config: Config, resume_from: Path | None, preemption: PreemptionRequest,
           memory_note: str = "") -> Run:
    t = config.train
    output_dir = Path(t.output_dir)
    accelerator = build_accelerator(config, recipe)
    memory_meter = PeakMemoryMeter(accelerator.device)  # from here on: the run's peak memory, by phase
    progress_bar = progress_bars_wanted(t.disable_tqdm)
    set_seed(t.seed)
    raw = load_raw_datasets(config)
    tokenizer = load_tokenizer(config)
    model_config = load_model_config(config)
    block_size = config.data.block_size or default_block_size(model_config)
    train_loader, eval_loader, shuffle, data_summary = build_dataloaders(config, raw, tokenizer, block_size,
                                                                         accelerator)
    total_steps = total_optimizer_steps(config, len(train_loader) // accelerator.num_processes)
    resolve_step_counts(config, len(train_loader) // accelerator.num_processes, total_steps)
    if t.lr_scheduler_type == "constant" and recipe.scheduler_warmup_steps(config) > 0:
        raise ConfigError(f"--lr_scheduler_type constant has no warmup (transformers'), so the {t.warmup_steps} warmup "
                          "step(s) asked for would not happen; use --lr_scheduler_type constant_with_warmup")
    model = load_model(config, model_config)
    attention.set_attention(model, config)
    attention_used = attention.attention_of(model)
    check_packed_examples_stay_apart(model, train_loader.dataset)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    token_loss, loss_note = build_token_loss(model, t.chunked_loss)  # before any wrapper: it is the output layer's
    if t.torch_compile:  # in place, before any wrapper: their hooks then run around the compiled blocks
        loss_note += "\n" + compile_decoder_blocks(model, t.torch_compile_mode)
    optimizer = recipe.build_for_run(model, config)
    for note in (recipe.update_note, rounding_note(config, model)):  # when and how updates reach the weights
        loss_note += f"\n{note}" if note else ""
    embedding = model.get_input_embeddings().weight
    training_flops_per_token = flops_per_token(model.config, parameter_count(model),
                                               full_numel(embedding), block_size)
    matmul_dtype = compute_dtype(accelerator.mixed_precision, model)  # what the CPU's MFU is measured against
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=recipe.scheduler_warmup_steps(config),
                              num_training_steps=total_steps, scheduler_specific_kwargs=schedule_kwargs(t))
    model, optimizer, train_loader, eval_loader, scheduler = recipe.prepare(
        accelerator, model, optimizer, train_loader, eval_loader, scheduler)
    state = load_checkpoint(accelerator, resume_from) if resume_from else TrainerState()
    settings = resume_settings(config, block_size=block_size, num_processes=accelerator.num_processes,
                               total_steps=total_steps)
    schedule_note = continue_schedule(resume_from, scheduler, total_steps, t.lr_scheduler_type) if resume_from else ""

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if t.overwrite_output_dir and not resume_from:
            for old in checkpoints_in(output_dir):
                shutil.rmtree(old)
        resolved = config.to_dict() | {"block_size": block_size, "total_steps": total_steps,
                                       "attention": attention_used,
                                       "num_processes": accelerator.num_processes,
                                       "distributed_type": accelerator.distributed_type.value,
                                       "data_summary": data_summary.to_dict()}
        (output_dir / "run_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    if trackers(t):
        flat = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in config.to_dict().items()}  # trackers
        accelerator.init_trackers(t.run_name or recipe.name, config=flat)
    distributed = "" if accelerator.distributed_type == "NO" else f" ({accelerator.distributed_type.value})"
    accelerator.print(f"{recipe.name}: {total_steps} steps on {accelerator.num_processes} process(es){distributed}, "
                      f"{parameter_count(model):,} parameters"
                      + (f", resuming at step {state.step} from {resume_from}" if resume_from else "")
                      + schedule_note
                      + f"; {mfu_note(accelerator.device, matmul_dtype)}"
                      + "".join(f"\n--{flag} {why}" for flag, why in config.defaults_used.items())
                      + f"\n{data_summary.describe()}\nattention: {attention_used}\n{loss_note}"
                      + (f"\n{memory_note}" if memory_note else ""))

    metrics = TrainingMetrics(accelerator, output_dir, total_steps, first_step=state.step,
                              tokens_seen=(state.tokens_seen, state.trained_tokens_seen),
                              loss_since_evaluation=state.loss_since_evaluation,
                              flops_per_token=training_flops_per_token,
                              peak_flops=peak_flops(accelerator.device, matmul_dtype),
                              peak_flops_source=peak_flops_source(accelerator.device, matmul_dtype),
                              memory=memory_meter, progress_bar=progress_bar,
                              remeasure_peak=peak_remeasurer(accelerator.device, matmul_dtype))
    return Run(recipe=recipe, config=config, accelerator=accelerator, model=model, optimizer=optimizer,
               scheduler=scheduler, train_loader=train_loader, eval_loader=eval_loader, shuffle=shuffle,
               tokenizer=tokenizer, token_loss=token_loss, state=state, resume_fingerprint=settings,
               total_steps=total_steps,
               metrics=metrics, memory_meter=memory_meter,
               memory_history=CudaMemoryHistory(output_dir, parse_step_window(t.memory_snapshot_steps),
                                                 accelerator.device),
               memory_profile=MemoryProfile(output_dir, model, optimizer, write=accelerator.is_main_process,
                                            step=min(state.step + 2, total_steps) if t.profile_memory else None),
               preemption=preemption,
               first_bad_step=torch.zeros((), dtype=torch.long, device=accelerator.device))


def build_accelerator(config: Config, recipe: OptimizerRecipe) -> Accelerator:
    t = config.train
    # A multi-process launch without CUDA (DeepSpeed on CPU) needs gloo named, or accelerate sees one process.
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not torch.cuda.is_available():  # DeepSpeed would find out itself and warn, mid-run, into the log
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    handlers = [InitProcessGroupKwargs(backend="gloo")] if multi_process_cpu else []
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision="bf16" if t.bf16 else "fp16" if t.fp16 else None,
        log_with=trackers(t) or None,
        project_config=ProjectConfiguration(project_dir=t.output_dir, logging_dir=t.logging_dir or t.output_dir),
        step_scheduler_with_optimizer=False,  # the loop steps the scheduler once per optimizer step, on every rank
        kwargs_handlers=handlers,
    )
    keep_fsdp_on_cpu(accelerator)
    look_up_lomo_once()
    refuse_unconnected_processes(accelerator)
    if accelerator.state.deepspeed_plugin is not None:
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["gradient_clipping"] = t.max_grad_norm  # DeepSpeed clips inside its step
        # With optimizer offload, accelerate swaps any optimizer for DeepSpeed's CPU Adam unless this is False: the
        # recipe's own optimizer steps (for AdamW too: CPU Adam's offload checkpoints do not resume exactly,
        # docs/distributed.md)
        deepspeed_config["zero_force_ds_cpu_optimizer"] = False
    return accelerator


def parameter_count(model) -> int:
    return sum(full_numel(p) for p in model.parameters())  # ZeRO-3 partitions: whole sizes


def check_packed_examples_stay_apart(model, rows) -> None:
    """Packed rows rely on position_ids to keep examples apart; refuse an attention that ignores them."""
    implementation = attention.attention_of(model)
    if "position_ids" in rows.column_names and implementation not in attention.SEPARATES_PACKED_EXAMPLES:
        raise ConfigError(attention.packing_problem(implementation))


def build_dataloaders(config: Config, raw, tokenizer, block_size: int, accelerator: Accelerator):
    t = config.train
    with accelerator.main_process_first():
        rows, summary = build_datasets(raw, tokenizer, config, block_size)
    step_rows = t.per_device_train_batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    if len(rows["train"]) < step_rows:  # else every epoch would end before its first step, and the run never would
        raise ConfigError(f"the training data makes {len(rows['train']):,} rows, fewer than one optimizer step takes "
                          f"({t.per_device_train_batch_size} per process x {accelerator.num_processes} process(es) x "
                          f"{t.gradient_accumulation_steps} accumulated = {step_rows:,}); lower "
                          "--per_device_train_batch_size or add data")
    pad_token_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    collate = PaddingCollator(pad_token_id)
    shuffle = torch.Generator().manual_seed(t.seed)
    workers = {"num_workers": t.dataloader_num_workers}
    train_loader = DataLoader(rows["train"], batch_size=t.per_device_train_batch_size, shuffle=True,
                              generator=shuffle, collate_fn=collate, drop_last=True, **workers)
    eval_loader = DataLoader(rows["validation"], batch_size=t.per_device_eval_batch_size, collate_fn=collate,
                             **workers)
    return train_loader, eval_loader, shuffle, summary


def total_optimizer_steps(config: Config, batches_per_epoch: int) -> int:
    t = config.train
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(math.ceil(batches_per_epoch / t.gradient_accumulation_steps) * t.num_train_epochs))


def resolve_step_counts(config: Config, batches_per_epoch: int, total_steps: int) -> None:
    """TrainingArguments' run-relative settings as step counts: --warmup_ratio as --warmup_steps, and the "epoch"
    strategies as every epoch's number of optimizer steps (each epoch has the same)."""
    t = config.train
    if t.warmup_steps == 0 and t.warmup_ratio > 0:
        t.warmup_steps = math.ceil(t.warmup_ratio * total_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
    if t.eval_strategy == "epoch":
        t.eval_steps = steps_per_epoch
    if t.save_strategy == "epoch":
        t.save_steps = steps_per_epoch


def enable_gradient_checkpointing(model) -> None:
    # transformers 5.x renamed gradient_checkpointing_enable (deprecated there, to be removed in v6)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
