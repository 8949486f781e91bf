"""Training checkpoints: atomic, resumable exactly, and checked against the run that wants to resume from them.

A checkpoint is `output_dir/checkpoint-<step>/`: accelerate's `save_state` (model as safetensors, optimizer,
scheduler, every process's RNG state) plus `trainer_state.json` (step, data position, token count and the settings
a resume must share). It is written under a temporary name and renamed when complete, so a folder named
`checkpoint-<step>` is always whole and `latest` never resolves to a partial one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator
from optimizer_recipes.core.run.accelerate_fixes import checkpoint_weights_loaded_in_place
from optimizer_recipes.core.run.config import MODEL_FILES, Config, ConfigError

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings that fix the data order, the batch and the optimizer: a resume must match them to be exact.
MUST_MATCH = ("recipe", "dataset_name", "dataset_config_name", "dataset_train_split", "dataset_format", "text_column",
              "completion_only_loss", "assistant_only_loss", "chat_template", "packing", "block_size", "on_bad_rows",
              "seed",
              "per_device_train_batch_size", "gradient_accumulation_steps", "num_processes")


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    tokens_seen: int = 0  # non-padding input tokens, all processes
    trained_tokens_seen: int = 0  # tokens the loss was on, all processes
    loss_since_evaluation: list = field(default_factory=lambda: [0.0, 0])  # (step losses summed, steps)


def checkpoints_in(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def check_run_folder(config: Config) -> Path | None:
    """Refuse a --output_dir whose trained model or checkpoints this run would replace (unless told to), and return
    the checkpoint to resume from, if any (checked against this run's settings)."""
    t = config.train
    output_dir = Path(t.output_dir)
    continuing = t.resume_from_checkpoint and final_model_is_checkpointed(output_dir)  # nothing trained is lost
    if not (t.overwrite_output_dir or continuing) and any((output_dir / f).exists() for f in MODEL_FILES):
        more = (", continue its training to a larger --max_steps with --resume_from_checkpoint latest"
                if final_model_is_checkpointed(output_dir) else "")
        raise ConfigError(f"--output_dir {output_dir} already holds a trained model; choose another --output_dir{more} "
                          "or pass --overwrite_output_dir to replace it")
    if not (t.resume_from_checkpoint or t.overwrite_output_dir) and checkpoints_in(output_dir):
        raise ConfigError(f"--output_dir {output_dir} holds checkpoints of an earlier run; resume it with "
                          "--resume_from_checkpoint latest, or pass --overwrite_output_dir to start over")
    return resolve_checkpoint(config)


def resolve_checkpoint(config: Config) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names (`latest`: the newest in output_dir), checked for a match."""
    spec = config.train.resume_from_checkpoint
    if not spec:
        return None
    if spec in ("latest", "auto"):
        found = checkpoints_in(Path(config.train.output_dir))
        if not found and spec == "auto":  # a job's first run, or a requeued one that never reached a checkpoint
            return None
        if not found:
            raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint in {config.train.output_dir}; "
                              "give a checkpoint folder, or drop the flag to start fresh")
        path = found[-1]
    else:
        path = Path(spec)
    if not path.exists():
        found = checkpoints_in(path.parent) or checkpoints_in(Path(config.train.output_dir))
        listed = f"the checkpoints there: {', '.join(p.name for p in found)}" if found else "there is no checkpoint there"
        raise ConfigError(f"--resume_from_checkpoint {spec}: no such folder ({listed}); give one of them or 'latest'")
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume_from_checkpoint {spec}: {path} is not a complete checkpoint (no {STATE_FILE}); "
                          "give a checkpoint-<step> folder or 'latest'")
    saved = json.loads((path / STATE_FILE).read_text())["settings"]
    current = resume_settings(config)
    for key in MUST_MATCH:
        if key in current and key in saved and saved[key] != current[key]:  # older checkpoints lack newer keys
            raise ConfigError(f"--resume_from_checkpoint {path}: it was written with {key}={saved.get(key)!r}, "
                              f"this run has {key}={current[key]!r}; resume with the same {key} or start a fresh run")
    return path


def resume_settings(config: Config, **resolved) -> dict:
    """What a checkpoint records of its run; `resolved` adds what is known only once the run is set up."""
    t, d = config.train, config.data
    settings = {"recipe": config.recipe, "dataset_name": d.dataset_name, "dataset_config_name": d.dataset_config_name,
                "dataset_train_split": d.dataset_train_split, "dataset_format": d.dataset_format,
                "text_column": d.text_column, "completion_only_loss": d.completion_only_loss,
                "assistant_only_loss": d.assistant_only_loss, "chat_template": d.chat_template,
                "packing": d.packing, "seed": t.seed,
                "per_device_train_batch_size": t.per_device_train_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps,
                "num_processes": int(os.environ.get("WORLD_SIZE", "1"))}
    if d.block_size is not None:
        settings["block_size"] = d.block_size
    settings.update(resolved)
    return settings


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainerState, settings: dict,
                    save_total_limit: int | None, model=None, tokenizer=None) -> Path:
    """Write checkpoint-<step> atomically (every rank takes part), then drop the oldest beyond the limit.

    Where accelerate wrote the weights as `model.safetensors` (one process, DDP), the model's config, generation
    config and `tokenizer` go beside them, so that `from_pretrained(checkpoint-<step>)` loads it as the Trainer's
    checkpoints load (no second copy of the weights). Under DeepSpeed and FSDP the checkpoint holds sharded states
    for resuming; the run's final save is the loadable model."""
    final = output_dir / f"checkpoint-{state.step}"
    partial = output_dir / f".checkpoint-{state.step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({**asdict(state), "settings": settings}, indent=2) + "\n")
        if model is not None and (partial / "model.safetensors").is_file():
            model.config.save_pretrained(partial)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(partial)
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
        if final.exists():  # the same step saved again (after a resume): swap it out whole
            stale = output_dir / f".checkpoint-{state.step}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale)
        else:
            os.replace(partial, final)
        if save_total_limit:
            for old in checkpoints_in(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG states (accelerate loads them with weights_only=True); the model's
    weights are read into it in place (no second copy of them)."""
    with checkpoint_weights_loaded_in_place():
        accelerator.load_state(str(path))
    saved = json.loads((path / STATE_FILE).read_text())
    return TrainerState(**{k: saved[k] for k in TrainerState.__dataclass_fields__ if k in saved})


def continue_schedule(path: Path, scheduler, total_steps: int, schedule_type: str) -> str:
    """Continuing a run to another total (e.g. a finished run to a larger --max_steps): the LR schedule is a function
    of (step, total), so it is recomputed for the new total, the current step's lr included; what changed is said.

    Returns the note for the start-up line ("" when the total is the one the checkpoint's run planned)."""
    planned = json.loads((path / STATE_FILE).read_text())["settings"].get("total_steps")
    if planned in (None, total_steps):
        return ""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper steps this one
    before = inner.get_last_lr()[0]
    inner.last_epoch -= 1
    inner.step()  # the lr of the current step, from the new total
    return (f"; the checkpoint's run planned {planned} steps, this one {total_steps}: the {schedule_type} LR "
            f"schedule is recomputed for {total_steps} steps (the lr at step {inner.last_epoch + 1} is "
            f"{inner.get_last_lr()[0]:.4g}, was {before:.4g})")


def final_model_is_checkpointed(output_dir: Path) -> bool:
    """Whether the trained model in output_dir is also in one of its checkpoints (written at the run's last step), so a
    run continued from a checkpoint there may replace it."""
    try:
        step = json.loads((output_dir / "results.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return False
    return (output_dir / f"checkpoint-{step}" / STATE_FILE).is_file()
