"""The one training loop every recipe shares: setup, train, evaluate, save. Read it top to bottom.

The loop never asks which optimizer it drives; it asks the recipe (`recipes/core/optimizer_recipe.py`) how to run
backward and step, and when to switch modes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler

from recipes.core import embedded
from recipes.core.config import Config, ConfigError, parse_config
from recipes.core.data import collate_causal_lm, load_raw_datasets, tokenize_and_pack
from recipes.core.metrics import TrainingMetrics
from recipes.core.optimizer_recipe import OptimizerRecipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def main(recipe: OptimizerRecipe, argv: list[str] | None = None) -> None:
    """Entry point of every `recipes/<name>.py`: bad input ends in one line on stderr and exit status 2."""
    try:
        config = parse_config(recipe, argv)
        train(recipe, config)
    except ConfigError as error:
        print(f"{recipe.name}: error: {error}", file=sys.stderr)
        sys.exit(2)


def build_accelerator(config: Config) -> Accelerator:
    t = config.train
    # A multi-process launch without CUDA (DeepSpeed on CPU) needs gloo named, or accelerate sees one process.
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if multi_process_cpu else []
    return Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision="bf16" if t.bf16 else None,
        log_with=None if t.report_to == "none" else t.report_to,
        project_dir=t.output_dir,
        step_scheduler_with_optimizer=False,  # the loop steps the scheduler once per optimizer step, on every rank
        kwargs_handlers=handlers,
    )


def load_tokenizer_and_model(config: Config):
    m = config.model
    source = m.model_name_or_path or str(embedded.EMBEDDED_DIR)
    tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name or source, trust_remote_code=m.trust_remote_code)
    if m.model_name_or_path is None:  # the embedded default: a fresh tiny Llama, seeded
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[m.dtype],
                                                     trust_remote_code=m.trust_remote_code)
    return tokenizer, model


def default_block_size(model) -> int:
    return min(1024, getattr(model.config, "max_position_embeddings", 1024))


def build_dataloaders(config: Config, raw, tokenizer, block_size: int, accelerator: Accelerator):
    t = config.train
    with accelerator.main_process_first():
        packed = tokenize_and_pack(raw, tokenizer, config.data.text_column, block_size)
    shuffle = torch.Generator().manual_seed(t.seed)
    train_loader = DataLoader(packed["train"], batch_size=t.per_device_train_batch_size, shuffle=True,
                              generator=shuffle, collate_fn=collate_causal_lm, drop_last=True)
    eval_loader = DataLoader(packed["validation"], batch_size=t.per_device_eval_batch_size,
                             collate_fn=collate_causal_lm)
    return train_loader, eval_loader


def total_optimizer_steps(config: Config, batches_per_epoch: int) -> int:
    t = config.train
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(math.ceil(batches_per_epoch / t.gradient_accumulation_steps) * t.num_train_epochs))


@torch.no_grad()
def evaluate(model, eval_loader, accelerator: Accelerator) -> float:
    """Mean next-token loss over every validation token (each block counted once across processes)."""
    model.eval()
    per_block = []
    for batch in eval_loader:
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        per_block.append(accelerator.gather_for_metrics(loss.mean(dim=1)))
    model.train()
    return torch.cat(per_block).mean().item()


def save_model(accelerator: Accelerator, model, tokenizer, output_dir: Path) -> None:
    """save_pretrained (safetensors) + tokenizer, written beside output_dir and moved in only when complete."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; every rank must call it
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


def train(recipe: OptimizerRecipe, config: Config) -> dict:
    t = config.train
    output_dir = Path(t.output_dir)

    # --- setup: data is checked before any model is loaded, so bad data fails in seconds
    accelerator = build_accelerator(config)
    set_seed(t.seed)
    raw = load_raw_datasets(config)
    tokenizer, model = load_tokenizer_and_model(config)
    block_size = config.data.block_size or default_block_size(model)
    train_loader, eval_loader = build_dataloaders(config, raw, tokenizer, block_size, accelerator)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = recipe.build(model, config)
    total_steps = total_optimizer_steps(config, len(train_loader) // accelerator.num_processes)
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=recipe.scheduler_warmup_steps(config),
                              num_training_steps=total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved = config.to_dict() | {"block_size": block_size, "total_steps": total_steps,
                                       "num_processes": accelerator.num_processes,
                                       "distributed_type": str(accelerator.distributed_type)}
        (output_dir / "run_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    if t.report_to != "none":
        accelerator.init_trackers(t.run_name or recipe.name, config=config.to_dict())
    accelerator.print(f"{recipe.name}: {total_steps} steps on {accelerator.num_processes} process(es) "
                      f"({accelerator.distributed_type}), {sum(p.numel() for p in model.parameters()):,} parameters")

    # --- train
    metrics = TrainingMetrics(accelerator, output_dir, total_steps)
    recipe.train_mode(optimizer)
    model.train()
    step, epoch, started = 0, 0, time.perf_counter()
    step_loss = torch.zeros((), device=accelerator.device)
    grad_norm = None
    while step < total_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                recipe.backward(accelerator, optimizer, loss, scheduler.get_last_lr()[0])
                grad_norm = recipe.step(accelerator, model, optimizer, t.max_grad_norm) or grad_norm
            step_loss += loss.detach() / t.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            metrics.add_step(step_loss, tokens=batch["input_ids"].numel() * accelerator.num_processes
                             * t.gradient_accumulation_steps)
            step_loss = torch.zeros_like(step_loss)
            if step % t.logging_steps == 0 or step == total_steps:
                metrics.flush(step, lr=lr, grad_norm=grad_norm, epoch=epoch)
            if t.eval_steps and step % t.eval_steps == 0 and step < total_steps:
                recipe.eval_mode(optimizer)
                metrics.write({"step": step, "eval_loss": evaluate(model, eval_loader, accelerator)})
                recipe.train_mode(optimizer)
            if step >= total_steps:
                break
        epoch += 1

    # --- evaluate and save the weights to keep (for schedule-free: x, in eval mode)
    recipe.eval_mode(optimizer)
    eval_loss = evaluate(model, eval_loader, accelerator)
    save_model(accelerator, model, tokenizer, output_dir)
    recipe.train_mode(optimizer)
    results = {"step": step, "eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 700)),
               "train_runtime_s": time.perf_counter() - started, "num_processes": accelerator.num_processes}
    metrics.write(results)
    metrics.close()
    if accelerator.is_main_process:
        write_json(output_dir / "results.json", results)
    accelerator.end_training()
    return results
