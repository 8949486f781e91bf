"""The one training loop every recipe shares: set up, train, evaluate, save. Read it top to bottom.

The loop never asks which optimizer it drives; it asks the recipe (`recipes/core/optimizers/protocol.py`) how to run
backward and step, and when to switch modes. What a run is made of is set up in `recipes/core/run/run_setup.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from optimizer_recipes.core.memory.check import check_memory
from optimizer_recipes.core.models import attention
from optimizer_recipes.core.models.sources import check_sources, load_model_config, model_class
from optimizer_recipes.core.models.zero3_parameters import local_tensor
from optimizer_recipes.core.optimizers.protocol import OptimizerRecipe
from optimizer_recipes.core.run import torch_compile
from optimizer_recipes.core.run.checkpoint import check_run_folder, checkpoints_in, save_checkpoint
from optimizer_recipes.core.run.config import Config, ConfigError, parse_config
from optimizer_recipes.core.run.metrics import RESULTS_FILE
from optimizer_recipes.core.run.preemption import INTERRUPTED, PreemptedBeforeTraining, PreemptionRequest
from optimizer_recipes.core.run.replicas import replicas_identical
from optimizer_recipes.core.run.run_setup import Run, set_up
from optimizer_recipes.core.run.token_loss import FullLogitsLoss
from optimizer_recipes.core.run.torch_compile import compile_summary


def main(recipe: OptimizerRecipe, argv: list[str] | None = None) -> None:
    """Entry point of every `recipes/<name>.py`: bad input ends in one line on stderr and exit status 2."""
    try:
        config = parse_config(recipe, argv)
        done = train(recipe, config)
    except ConfigError as error:
        say_once_across_processes(f"{recipe.name}: error: {error}")
        sys.exit(2)
    except TrainingStopped as error:
        print(f"{recipe.name}: stopped: {error}", file=sys.stderr)
        sys.exit(1)
    except PreemptedBeforeTraining as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{recipe.name}: {stopped.signal_name} received before the first step: nothing to save, stopped "
                  "(nothing written to --output_dir); rerun the same command to start", file=sys.stderr)
        sys.exit(128 + getattr(signal, stopped.signal_name))  # as if the signal had ended the process
    status = 128 + signal.SIGINT if done.get("signal") == INTERRUPTED else 0  # Ctrl-C, saved: as interrupted
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_before_interpreter_teardown(status)
    if status:
        sys.exit(status)


def say_once_across_processes(line: str) -> None:
    """Print a refusal on rank 0. Every rank reads the same flags and files, so the others refuse alike and are ended
    by the launcher once rank 0 exits; a rank that refuses alone (a file missing on its node) still says why after
    a moment."""
    if int(os.environ.get("RANK", "0")) != 0:
        time.sleep(3)
    print(line, file=sys.stderr)


def exit_before_interpreter_teardown(status: int = 0) -> None:
    """End a finished multi-process run with status 0 without the interpreter's teardown.

    Measured on CPU (deepspeed 0.19.8, torch 2.13 gloo): now and then (3 of ~185 finished 2-process DeepSpeed
    runs) a process aborts while the interpreter tears down, after every output was written and the process group
    destroyed ("terminate called without an active exception", SIGABRT), and the launcher then reports the whole
    finished run as failed. Everything the run writes is closed by now; stdio is flushed, then the process exits.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class TrainingStopped(RuntimeError):
    """The run stopped itself for a reason the user must act on (e.g. a non-finite loss); one line says which."""


def train(recipe: OptimizerRecipe, config: Config) -> dict:
    """Run one training job; whatever it installs process-wide (signal handlers) is undone when it returns or
    raises. A run that stops before its first step (a signal, an error) leaves nothing of its own in output_dir."""
    recipe = recipe.for_run(config)  # e.g. its updates in backward
    with PreemptionRequest() as preemption:  # until set-up ends, a signal stops the run at once
        output_dir = Path(config.train.output_dir)
        there_before = set(output_dir.iterdir()) if output_dir.is_dir() else None
        try:
            resume_from, memory_note = pre_flight(recipe, config)
            run = set_up(recipe, config, resume_from, preemption, memory_note)
        except BaseException:
            remove_what_this_run_wrote(output_dir, there_before)
            raise
        preemption.checkpoint_on_signal(run.accelerator)  # from the first step on, a signal saves a checkpoint
        preempted = train_steps(run)
        return preempted or finish(run)


def pre_flight(recipe: OptimizerRecipe, config: Config) -> tuple[Path | None, str]:
    """Every check that can refuse the run before a weight loads, each ending in one line (ConfigError): this machine
    can run the attention and compile asked for; nothing trained is overwritten (and which checkpoint to resume);
    the model, tokenizer and data resolve (configs and metadata only); the optimizer and the attention can train
    this model; the run fits the device's memory. Returns the checkpoint to resume from and the memory check's note."""
    problem = attention.machine_problem(config) or torch_compile.problem(config)
    if problem:
        raise ConfigError(problem)
    resume_from = check_run_folder(config)
    check_sources(config)
    model_config = load_model_config(config)
    problem = (recipe.refuse_model(config, model_config)  # e.g. no module matches the flags' names
               or attention.model_problem(config, model_class(model_config)))
    if problem:
        raise ConfigError(problem)
    return resume_from, check_memory(recipe, config, model_config)


def remove_what_this_run_wrote(output_dir: Path, there_before: set | None) -> None:
    """Before its first step a run has written only its start-up files (run_config.yaml, an empty metrics.jsonl,
    tracker folders): removed, so that nothing in output_dir looks like a run; what was there before stays."""
    if int(os.environ.get("RANK", "0")) != 0 or not output_dir.is_dir():
        return
    for item in set(output_dir.iterdir()) - (there_before or set()):
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    if there_before is None and not any(output_dir.iterdir()):
        output_dir.rmdir()


# --- train ---------------------------------------------------------------------------------------------------------

def train_steps(run: Run) -> dict | None:
    """Optimizer steps until the last; returns what a preempted run reports, or None when every step ran."""
    t, state = run.config.train, run.state
    run.recipe.train_mode(run.optimizer)
    run.model.train()
    run.memory_meter.end_phase("training")
    run.metrics.started_training()
    with run.memory_history.dump_on_out_of_memory():  # a CUDA OOM leaves a snapshot behind
        while state.step < run.total_steps:
            run.shuffle.manual_seed(t.seed + state.epoch)  # each epoch's order depends only on (seed, epoch)
            batches = run.accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
            for micro_batches in steps_of(batches, t.gradient_accumulation_steps):
                lr, grad_norm = run.scheduler.get_last_lr()[0], train_step(run, micro_batches)
                state.batches_in_epoch += len(micro_batches)
                run.scheduler.step()
                state.step += 1
                run.memory_history.after_step(state.step)
                if state.step % t.logging_steps == 0 or state.step == run.total_steps:
                    stop_if_nonfinite(run, check_weights=False)
                    run.metrics.flush(state.step, lr=lr, grad_norm=grad_norm, epoch=state.epoch)
                if t.eval_steps and state.step % t.eval_steps == 0 and state.step < run.total_steps:
                    evaluate_during_training(run)
                if t.save_steps and (state.step % t.save_steps == 0 or state.step == run.total_steps):
                    checkpoint(run)  # the last step too: a finished run can be continued to a larger --max_steps
                if run.preemption.requested():
                    return stop_for_preemption(run)
                if state.step >= run.total_steps:
                    break
            else:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    return None


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


def train_step(run: Run, micro_batches: list[dict]) -> float | None:
    """Forward and backward every micro-batch of one optimizer step, and the update; returns the gradient norm
    where the recipe measures it."""
    accelerator, recipe, model, optimizer = run.accelerator, run.recipe, run.model, run.optimizer
    step = run.state.step + 1
    run.memory_history.before_step(step)
    lr = run.scheduler.get_last_lr()[0]
    step_tokens = sum(batch.pop("token_counts") for batch in micro_batches)  # (input, trained) of this process
    # Each micro-batch's loss is its share of the step's mean over ALL its trained tokens (every micro-batch, every
    # process), times the process count: DDP, ZeRO and FSDP average gradients over processes. A short answer then
    # weighs what its tokens weigh, however the step's batch is split.
    token_weight = accelerator.num_processes / accelerator.reduce(step_tokens[1].clone(), reduction="sum").clamp(min=1)
    step_loss = torch.zeros((), device=accelerator.device)
    step_predictions = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # (correct, trained)
    grad_norm = None
    for index, batch in enumerate(micro_batches):
        completes_step = index == len(micro_batches) - 1
        # the loop groups a step's micro-batches itself; accelerate's accumulate() would count them
        accelerator.gradient_state._set_sync_gradients(completes_step)
        with (recipe.micro_step_context(accelerator, model),  # no gradient sync before the last
              run.memory_profile.measure(step, completes_step)):
            rows = run.token_loss(model, batch)
            loss = rows.loss_sums.sum() * token_weight
            step_predictions += rows.predictions()
            del rows
            recipe.backward(accelerator, model, optimizer, loss, lr)
            grad_norm = recipe.step(accelerator, model, optimizer, run.config.train.max_grad_norm)  # None: unmeasured
        step_loss += loss.detach()
    run.first_bad_step = torch.where((run.first_bad_step == 0) & ~step_loss.isfinite(), step, run.first_bad_step)
    run.metrics.add_step(step_loss, step_tokens, step_predictions)
    return grad_norm


def evaluate_during_training(run: Run) -> None:
    """At x for schedule-free (eval mode); the recipe may react to the result (GrokAdamW's grokking signal)."""
    run.recipe.eval_mode(run.optimizer)
    with run.memory_meter.phase("evaluation"), run.metrics.paused():
        record = {"step": run.state.step, **evaluate(run.model, run.eval_loader, run.accelerator, run.token_loss)}
    run.recipe.train_mode(run.optimizer)
    record.update(run.recipe.after_evaluation(run.optimizer, run.config, run.metrics.train_loss_since_evaluation(),
                                              record["eval_loss"]))
    run.metrics.write(record)


def checkpoint(run: Run) -> Path:
    """Save at x for schedule-free (eval mode), refuse to save non-finite weights, then carry on training."""
    stop_if_nonfinite(run, check_weights=True)
    state, metrics = run.state, run.metrics
    state.tokens_seen, state.trained_tokens_seen = metrics.sync_tokens()
    state.loss_since_evaluation = metrics.loss_since_evaluation()  # a resumed run's next evaluation needs it
    run.recipe.eval_mode(run.optimizer)
    with run.memory_meter.phase("saving"), metrics.paused():
        path = save_checkpoint(run.accelerator, run.output_dir, state, run.resume_fingerprint,
                               run.config.train.save_total_limit, run.accelerator.unwrap_model(run.model),
                               run.tokenizer)
    run.recipe.train_mode(run.optimizer)
    return path


def stop_for_preemption(run: Run) -> dict:
    path = checkpoint(run)
    run.accelerator.print(f"{run.recipe.name}: {run.preemption.signal_name or 'a signal'} received: saved {path} at "
                          f"step {run.state.step}; rerun the same command with --resume_from_checkpoint latest (or "
                          "auto)")
    run.metrics.close()
    run.accelerator.end_training()
    return {"step": run.state.step, "preempted": True, "checkpoint": str(path), "signal": run.preemption.signal_name}


def stop_if_nonfinite(run: Run, check_weights: bool) -> None:
    """Raise TrainingStopped if a loss (or, with check_weights, a weight on any rank) is not finite."""
    accelerator = run.accelerator
    bad_step = int(accelerator.reduce(run.first_bad_step.clone(), reduction="max").item())
    weights_bad = 0.0
    if check_weights:
        local = any(not torch.isfinite(local_tensor(p)).all() for p in run.model.parameters())
        weights_bad = accelerator.reduce(torch.tensor(float(local), device=accelerator.device), "sum").item()
    if bad_step or weights_bad:
        found = checkpoints_in(run.output_dir)
        last_good = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written before it"
        where = f"the loss became non-finite at step {bad_step}" if bad_step else "the weights became non-finite"
        raise TrainingStopped(f"{where}; stopped without saving. {last_good}: resume from it with "
                              "--resume_from_checkpoint and a lower --learning_rate")


# --- evaluate and save the weights to keep -------------------------------------------------------------------------

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


def finish(run: Run) -> dict:
    """Evaluate and save the weights to keep (for schedule-free: x, in eval mode); results.json says how it went."""
    accelerator, recipe, state, metrics = run.accelerator, run.recipe, run.state, run.metrics
    stop_if_nonfinite(run, check_weights=True)
    recipe.eval_mode(run.optimizer)
    evaluation = {}
    if run.config.train.eval_strategy != "no":
        with run.memory_meter.phase("evaluation"):
            evaluation = evaluate(run.model, run.eval_loader, accelerator,
                                  run.memory_profile.measure_evaluation(run.token_loss))
        evaluation["perplexity"] = math.exp(min(evaluation["eval_loss"], 700))
    identical = replicas_identical(accelerator, run.model)
    if not identical:
        accelerator.print(f"{recipe.name}: WARNING: the processes hold different weights at the end of training")
    with run.memory_meter.phase("saving"):
        save_model(accelerator, run.model, recipe.full_state_dict(accelerator, run.model), run.tokenizer,
                   run.output_dir)
    recipe.train_mode(run.optimizer)
    state.tokens_seen, state.trained_tokens_seen = metrics.sync_tokens()
    results = {"step": state.step, **evaluation,
               "train_runtime_s": time.perf_counter() - metrics.training_started, "tokens_seen": state.tokens_seen,
               "trained_tokens_seen": state.trained_tokens_seen, **metrics.throughput_summary(),
               "num_processes": accelerator.num_processes, "replicas_identical": identical,
               **compile_summary(run.config),
               **run.memory_meter.run_peak()}  # this process's peak over the whole run, and the phase that set it
    metrics.write(results)
    metrics.close()
    if accelerator.is_main_process:
        write_json(run.output_dir / RESULTS_FILE, results)
    accelerator.print(f"{recipe.name}: saved the model to {run.output_dir} (AutoModelForCausalLM.from_pretrained "
                      f"loads it; results.json, metrics.jsonl and run_config.yaml beside it)")
    accelerator.end_training()
    return results


MAX_SHARD_SIZE = "5GB"  # the Hub's convention; transformers 5 would write a 7B model as one 13 GB file


def save_model(accelerator: Accelerator, model, state_dict: dict, tokenizer, output_dir: Path) -> None:
    """save_pretrained (safetensors) + tokenizer, written beside output_dir and moved in only when complete.

    state_dict holds the whole weights (`recipe.full_state_dict`, which every rank calls: it gathers shards)."""
    if accelerator.is_main_process:
        staging = output_dir / ".saving-model"
        shutil.rmtree(staging, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict, max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(staging)
        for old in output_dir.glob("model*.safetensors*"):  # an earlier save's shards (another layout) go too
            if not (staging / old.name).exists():
                old.unlink()
        for item in staging.iterdir():
            os.replace(item, output_dir / item.name)
        staging.rmdir()
    accelerator.wait_for_everyone()


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")
