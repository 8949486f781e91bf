"""The one training loop every recipe shares: setup, train, evaluate, save. Read it top to bottom.

The loop never asks which optimizer it drives; it asks the recipe (`recipes/core/optimizer_recipe.py`) how to run
backward and step, and when to switch modes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from recipes.core.accelerate_fixes import keep_fsdp_on_cpu, look_up_lomo_once, refuse_unconnected_processes
from recipes.core.checkpoint import (TrainerState, checkpoints_in, continue_schedule, load_checkpoint,
                                     resolve_checkpoint, resume_settings, save_checkpoint)
from recipes.core.config import Config, ConfigError, parse_config
from recipes.core.data import build_datasets, load_raw_datasets
from recipes.core.memory import CudaMemoryHistory, MemoryProfile, PeakMemoryMeter, parse_step_window
from recipes.core.metrics import TrainingMetrics
from recipes.core.optimizer_recipe import OptimizerRecipe
from recipes.core.packing import PaddingCollator
from recipes.core.preemption import PreemptionRequest
from recipes.core.replicas import replicas_identical
from recipes.core.sources import check_sources, load_model, load_model_config, load_tokenizer
from recipes.core.throughput import flops_per_token, mfu_note, peak_flops
from recipes.core.token_loss import FullLogitsLoss, build_token_loss

ATTENTION_THAT_SEPARATES_PACKED_EXAMPLES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def main(recipe: OptimizerRecipe, argv: list[str] | None = None) -> None:
    """Entry point of every `recipes/<name>.py`: bad input ends in one line on stderr and exit status 2."""
    try:
        config = parse_config(recipe, argv)
        train(recipe, config)
    except ConfigError as error:
        print(f"{recipe.name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as error:
        print(f"{recipe.name}: stopped: {error}", file=sys.stderr)
        sys.exit(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_before_interpreter_teardown()


def exit_before_interpreter_teardown() -> None:
    """End a finished multi-process run with status 0 without the interpreter's teardown.

    Measured on CPU (deepspeed 0.19.8, torch 2.13 gloo): now and then (3 of ~185 finished 2-process DeepSpeed
    runs) a process aborts while the interpreter tears down, after every output was written and the process group
    destroyed ("terminate called without an active exception", SIGABRT), and the launcher then reports the whole
    finished run as failed. Everything the run writes is closed by now; stdio is flushed, then the process exits.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def build_accelerator(config: Config, recipe: OptimizerRecipe) -> Accelerator:
    t = config.train
    # A multi-process launch without CUDA (DeepSpeed on CPU) needs gloo named, or accelerate sees one process.
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if multi_process_cpu else []
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision="bf16" if t.bf16 else None,
        log_with=None if t.report_to == "none" else t.report_to,
        project_dir=t.output_dir,
        step_scheduler_with_optimizer=False,  # the loop steps the scheduler once per optimizer step, on every rank
        kwargs_handlers=handlers,
    )
    keep_fsdp_on_cpu(accelerator)
    look_up_lomo_once()
    refuse_unconnected_processes(accelerator)
    if accelerator.state.deepspeed_plugin is not None:
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["gradient_clipping"] = t.max_grad_norm  # DeepSpeed clips inside its step
        # With optimizer offload, accelerate swaps any optimizer for DeepSpeed's CPU Adam unless this is False
        deepspeed_config["zero_force_ds_cpu_optimizer"] = recipe.same_update_as_deepspeed_cpu_adam
    return accelerator


def parameter_count(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions: whole sizes


def default_block_size(model_config) -> int:
    return min(1024, getattr(model_config, "max_position_embeddings", 1024))


def check_packed_examples_stay_apart(model, rows) -> None:
    """Packed rows rely on position_ids to keep examples apart; refuse an attention that ignores them."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if "position_ids" in rows.column_names and implementation not in ATTENTION_THAT_SEPARATES_PACKED_EXAMPLES:
        raise ConfigError(f"--packing true puts several examples in one row, and the model's attention "
                          f"({implementation}) would let them attend to each other; use --packing false, or load the "
                          f"model with one of {', '.join(ATTENTION_THAT_SEPARATES_PACKED_EXAMPLES)}")


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
    train_loader = DataLoader(rows["train"], batch_size=t.per_device_train_batch_size, shuffle=True,
                              generator=shuffle, collate_fn=collate, drop_last=True)
    eval_loader = DataLoader(rows["validation"], batch_size=t.per_device_eval_batch_size, collate_fn=collate)
    return train_loader, eval_loader, shuffle, summary


def total_optimizer_steps(config: Config, batches_per_epoch: int) -> int:
    t = config.train
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(math.ceil(batches_per_epoch / t.gradient_accumulation_steps) * t.num_train_epochs))


@torch.no_grad()
def evaluate(model, eval_loader, accelerator: Accelerator, token_loss=FullLogitsLoss()) -> dict:
    """Mean next-token loss and next-token accuracy over every trained validation token (the tokens training puts
    the loss on, each row counted once across processes)."""
    model.eval()
    loss_sums, correct_counts, token_counts = [], [], []
    for batch in eval_loader:
        rows = token_loss(model, batch)
        loss_sums.append(accelerator.gather_for_metrics(rows.loss_sums.double()))
        correct_counts.append(accelerator.gather_for_metrics(rows.correct))
        token_counts.append(accelerator.gather_for_metrics(rows.trained))
    model.train()
    tokens = torch.cat(token_counts).sum()
    return {"eval_loss": (torch.cat(loss_sums).sum() / tokens).item(),
            "eval_token_accuracy": (torch.cat(correct_counts).sum() / tokens).item()}


def steps_of(batches, micro_batches_per_step: int):
    """The micro-batches of each optimizer step, together (the last step of an epoch may have fewer): the step's
    trained tokens are counted before its first forward."""
    step = []
    for batch in batches:
        step.append(batch)
        if len(step) == micro_batches_per_step:
            yield step
            step = []
    if step:
        yield step


def save_model(accelerator: Accelerator, model, state_dict: dict, tokenizer, output_dir: Path) -> None:
    """save_pretrained (safetensors) + tokenizer, written beside output_dir and moved in only when complete.

    state_dict holds the whole weights (`recipe.full_state_dict`, which every rank calls: it gathers shards)."""
    if accelerator.is_main_process:
        staging = output_dir / ".saving-model"
        shutil.rmtree(staging, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            os.replace(item, output_dir / item.name)
        staging.rmdir()
    accelerator.wait_for_everyone()


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")


class TrainingStopped(RuntimeError):
    """The run stopped itself for a reason the user must act on (e.g. a non-finite loss); one line says which."""


def train(recipe: OptimizerRecipe, config: Config) -> dict:
    """Run one training job; whatever it installs process-wide (signal handlers) is undone when it returns or
    raises."""
    with contextlib.ExitStack() as undo_on_exit:
        return run_training(recipe, config, undo_on_exit)


def run_training(recipe: OptimizerRecipe, config: Config, undo_on_exit: contextlib.ExitStack) -> dict:
    t = config.train
    output_dir = Path(t.output_dir)
    check_sources(config)  # model, tokenizer and data resolve (configs and metadata only), or one line says why
    resume_from = resolve_checkpoint(config)

    # --- setup: data is checked before any model is loaded, so bad data fails in seconds
    accelerator = build_accelerator(config, recipe)
    memory_meter = PeakMemoryMeter(accelerator.device)  # from here on: the run's peak memory, by phase
    set_seed(t.seed)
    raw = load_raw_datasets(config)
    tokenizer = load_tokenizer(config)
    model_config = load_model_config(config)
    block_size = config.data.block_size or default_block_size(model_config)
    train_loader, eval_loader, shuffle, data_summary = build_dataloaders(config, raw, tokenizer, block_size,
                                                                         accelerator)
    model = load_model(config, model_config)
    check_packed_examples_stay_apart(model, train_loader.dataset)
    if t.gradient_checkpointing:
        # transformers 5.x renamed gradient_checkpointing_enable (deprecated there, to be removed in v6)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    token_loss, loss_note = build_token_loss(model, t.chunked_loss)  # before any wrapper: it is the output layer's
    optimizer = recipe.build(model, config)
    embedding = model.get_input_embeddings().weight
    training_flops_per_token = flops_per_token(model.config, parameter_count(model),
                                               getattr(embedding, "ds_numel", embedding.numel()), block_size)
    total_steps = total_optimizer_steps(config, len(train_loader) // accelerator.num_processes)
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=recipe.scheduler_warmup_steps(config),
                              num_training_steps=total_steps)
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
                                       "num_processes": accelerator.num_processes,
                                       "distributed_type": str(accelerator.distributed_type),
                                       "data_summary": data_summary.to_dict()}
        (output_dir / "run_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    if t.report_to != "none":
        flat = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in config.to_dict().items()}  # trackers
        accelerator.init_trackers(t.run_name or recipe.name, config=flat)
    accelerator.print(f"{recipe.name}: {total_steps} steps on {accelerator.num_processes} process(es) "
                      f"({accelerator.distributed_type}), {parameter_count(model):,} parameters"
                      + (f", resuming at step {state.step} from {resume_from}" if resume_from else "")
                      + schedule_note
                      + f"; {mfu_note(accelerator.device)}"
                      + "".join(f"\n--{flag} {why}" for flag, why in config.defaults_used.items())
                      + f"\n{data_summary.describe()}\n{loss_note}")

    def checkpoint() -> Path:
        """Save at x for schedule-free (eval mode), refuse to save non-finite weights, then carry on training."""
        stop_if_nonfinite(accelerator, model, first_bad_step, output_dir)
        state.tokens_seen, state.trained_tokens_seen = metrics.sync_tokens()
        state.loss_since_evaluation = metrics.loss_since_evaluation()  # a resumed run's next evaluation needs it
        recipe.eval_mode(optimizer)
        with memory_meter.phase("saving"), metrics.paused():
            path = save_checkpoint(accelerator, output_dir, state, settings, t.save_total_limit)
        recipe.train_mode(optimizer)
        return path

    # --- train
    metrics = TrainingMetrics(accelerator, output_dir, total_steps, first_step=state.step,
                              tokens_seen=(state.tokens_seen, state.trained_tokens_seen),
                              loss_since_evaluation=state.loss_since_evaluation,
                              flops_per_token=training_flops_per_token, peak_flops=peak_flops(accelerator.device),
                              memory=memory_meter)
    memory_history = CudaMemoryHistory(output_dir, parse_step_window(t.memory_snapshot_steps), accelerator.device)
    memory_profile = MemoryProfile(output_dir, model, optimizer, write=accelerator.is_main_process,
                                   step=min(state.step + 2, total_steps) if t.profile_memory else None)
    preemption = undo_on_exit.enter_context(PreemptionRequest(accelerator))
    recipe.train_mode(optimizer)
    model.train()
    memory_meter.end_phase("training")
    started = time.perf_counter()
    first_bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)  # 0: every loss finite so far
    with memory_history.dump_on_out_of_memory():  # a CUDA OOM leaves a snapshot behind
        while state.step < total_steps:
            shuffle.manual_seed(t.seed + state.epoch)  # each epoch's order depends only on (seed, epoch): resumable
            batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            for micro_batches in steps_of(batches, t.gradient_accumulation_steps):
                memory_history.before_step(state.step + 1)
                lr = scheduler.get_last_lr()[0]
                step_tokens = sum(batch.pop("token_counts") for batch in micro_batches)  # (input, trained) here
                # Each micro-batch's loss is its share of the step's mean over ALL its trained tokens (every
                # micro-batch, every process), times the process count: DDP, ZeRO and FSDP average gradients over
                # processes. A short answer then weighs what its tokens weigh, however the step's batch is split.
                step_trained = accelerator.reduce(step_tokens[1].clone(), reduction="sum")
                share = accelerator.num_processes / step_trained.clamp(min=1)
                step_loss = torch.zeros((), device=accelerator.device)
                step_predictions = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # (correct, trained)
                for index, batch in enumerate(micro_batches):
                    completes_step = index == len(micro_batches) - 1
                    # the loop groups a step's micro-batches itself; accelerate's accumulate() would count them
                    accelerator.gradient_state._set_sync_gradients(completes_step)
                    with (recipe.micro_step_context(accelerator, model),  # no gradient sync before the last
                          memory_profile.measure(state.step + 1, completes_step)):
                        rows = token_loss(model, batch)
                        loss = rows.loss_sums.sum() * share
                        step_predictions += rows.predictions()
                        del rows
                        recipe.backward(accelerator, model, optimizer, loss, lr)
                        grad_norm = recipe.step(accelerator, model, optimizer, t.max_grad_norm)  # None: not measured
                    step_loss += loss.detach()
                state.batches_in_epoch += len(micro_batches)
                scheduler.step()
                state.step += 1
                memory_history.after_step(state.step)
                first_bad_step = torch.where((first_bad_step == 0) & ~step_loss.isfinite(), state.step, first_bad_step)
                metrics.add_step(step_loss, step_tokens, step_predictions)
                if state.step % t.logging_steps == 0 or state.step == total_steps:
                    stop_if_nonfinite(accelerator, None, first_bad_step, output_dir)
                    metrics.flush(state.step, lr=lr, grad_norm=grad_norm, epoch=state.epoch)
                if t.eval_steps and state.step % t.eval_steps == 0 and state.step < total_steps:
                    recipe.eval_mode(optimizer)
                    with memory_meter.phase("evaluation"), metrics.paused():
                        record = {"step": state.step, **evaluate(model, eval_loader, accelerator, token_loss)}
                    recipe.train_mode(optimizer)
                    record.update(recipe.after_evaluation(optimizer, config, metrics.train_loss_since_evaluation(),
                                                          record["eval_loss"]))
                    metrics.write(record)
                if t.save_steps and (state.step % t.save_steps == 0 or state.step == total_steps):
                    checkpoint()  # the last step too: a finished run can be continued to a larger --max_steps
                if preemption.requested():
                    path = checkpoint()
                    accelerator.print(f"{recipe.name}: {preemption.signal_name or 'a signal'} received: saved {path} "
                                      f"at step {state.step}; rerun the same command with "
                                      "--resume_from_checkpoint latest (or auto)")
                    metrics.close()
                    accelerator.end_training()
                    return {"step": state.step, "preempted": True, "checkpoint": str(path)}
                if state.step >= total_steps:
                    break
            else:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    # --- evaluate and save the weights to keep (for schedule-free: x, in eval mode)
    stop_if_nonfinite(accelerator, model, first_bad_step, output_dir)
    recipe.eval_mode(optimizer)
    with memory_meter.phase("evaluation"):
        evaluation = evaluate(model, eval_loader, accelerator, memory_profile.measure_evaluation(token_loss))
    eval_loss = evaluation["eval_loss"]
    identical = replicas_identical(accelerator, model)
    if not identical:
        accelerator.print(f"{recipe.name}: WARNING: the processes hold different weights at the end of training")
    with memory_meter.phase("saving"):
        save_model(accelerator, model, recipe.full_state_dict(accelerator, model), tokenizer, output_dir)
    recipe.train_mode(optimizer)
    state.tokens_seen, state.trained_tokens_seen = metrics.sync_tokens()
    results = {"step": state.step, **evaluation, "perplexity": math.exp(min(eval_loss, 700)),
               "train_runtime_s": time.perf_counter() - started, "tokens_seen": state.tokens_seen,
               "trained_tokens_seen": state.trained_tokens_seen, "mfu": metrics.median_mfu(),
               "num_processes": accelerator.num_processes, "replicas_identical": identical,
               **memory_meter.run_peak()}  # this process's peak over the whole run, and the phase that set it
    metrics.write(results)
    metrics.close()
    if accelerator.is_main_process:
        write_json(output_dir / "results.json", results)
    accelerator.end_training()
    return results


def stop_if_nonfinite(accelerator: Accelerator, model, first_bad_step: torch.Tensor, output_dir: Path) -> None:
    """Raise TrainingStopped if a loss (or, with a model given, a weight on any rank) is not finite."""
    bad_step = int(accelerator.reduce(first_bad_step.clone(), reduction="max").item())
    weights_bad = 0.0
    if model is not None:
        local = any(not torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in model.parameters())
        weights_bad = accelerator.reduce(torch.tensor(float(local), device=accelerator.device), "sum").item()
    if bad_step or weights_bad:
        found = checkpoints_in(output_dir)
        last_good = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written before it"
        where = f"the loss became non-finite at step {bad_step}" if bad_step else "the weights became non-finite"
        raise TrainingStopped(f"{where}; stopped without saving. {last_good}: resume from it with "
                              "--resume_from_checkpoint and a lower --learning_rate")
