"""Command-line and YAML configuration, named as transformers.TrainingArguments names things, checked before any load.

Every problem found here is a `ConfigError` whose message says what is wrong and what to do; `parse_config` runs
before any model or data set is touched, so a bad flag costs a second and leaves nothing in output_dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import yaml
from optimizer_recipes.core.run.launch_setup import LaunchSetup
from transformers import HfArgumentParser
from transformers.trainer_utils import SchedulerType

if TYPE_CHECKING:
    from optimizer_recipes.core.optimizers.protocol import OptimizerRecipe

# local data files load with the `datasets` builder of this name
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TRACKERS = ("none", "all", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "auto")
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
DATA_FORMATS = ("auto", "text", "prompt_completion", "messages", "alpaca")  # recipes/core/data/formats.py
BAD_ROW_ACTIONS = ("error", "skip")
MEMORY_CHECKS = ("error", "warn", "off")  # recipes/core/memory/check.py
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


class ConfigError(ValueError):
    """Bad input: the message is one line naming the problem and the fix."""


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Hub id or local folder; default: the embedded tiny Llama (no download)."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Default: the model's own tokenizer."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with the checkpoint."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype for from_pretrained: float32 (default, "
                                                           "fp32 master weights), bfloat16, float16 or auto."})
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "The model's attention: sdpa, eager, flex_attention, flash_attention_2/3/4 "
                                         "(a CUDA GPU and the flash-attn package or kernels), or a kernel repository "
                                         "on the Hub (the kernels package); default: what transformers picks (sdpa "
                                         "where the model supports it)."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub id, local data folder, or a .json/.jsonl/.csv/.parquet/.txt file; "
                                         "default: the embedded generated corpus."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub data set configuration."})
    dataset_train_split: str = field(default="train", metadata={"help": "The split to train on."})
    dataset_test_split: Optional[str] = field(
        default=None, metadata={"help": "The split to evaluate on; default 'validation' if there is one, else "
                                         "--validation_split_percentage of train held out."})
    dataset_format: str = field(
        default="auto", metadata={"help": "text (a --text_column), prompt_completion (prompt + completion: strings, "
                                           "or message lists), messages ({role, content} lists; ShareGPT "
                                           "'conversations' too), alpaca (instruction, input, output); auto: "
                                           "from the columns."})
    text_column: str = field(default="text", metadata={"help": "Column holding the raw text (text format)."})
    completion_only_loss: bool = field(
        default=True, metadata={"help": "prompt_completion and alpaca data: loss on the completion only."})
    assistant_only_loss: bool = field(
        default=True, metadata={"help": "messages data: loss on the assistant turns only (each with its "
                                         "end-of-turn token)."})
    chat_template: Optional[str] = field(
        default=None, metadata={"help": "A Jinja chat template file that replaces the tokenizer's (saved with the "
                                         "model)."})
    packing: bool = field(
        default=True, metadata={"help": "Pack whole examples into --block_size rows (position_ids restart per "
                                         "example, no attention across them); false: one example per row, padded "
                                         "per batch. Text is cut into blocks of the token stream."})
    block_size: Optional[int] = field(
        default=None, metadata={"help": "Tokens per training row; longer examples are truncated (their start kept); "
                                         "default min(1024, model context)."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of train held out for evaluation when there is no validation split."})
    on_bad_rows: str = field(
        default="error", metadata={"help": "A row the data format cannot use (null content, messages that are not "
                                            "a list, a non-text content part, a tool call): error (stop, naming "
                                            "the split and row) or skip (leave it out; counted in the data line "
                                            "and run_config.yaml)."})


@dataclass
class TrainArguments:
    output_dir: Optional[str] = field(default=None, metadata={"help": "Default: runs/<recipe>."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow replacing a model in output_dir."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1: run num_train_epochs."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training data, when --max_steps "
                                                                     "is -1."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Rows per process per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Rows per process per evaluation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "Default: the recipe's (one for a "
                                                                           "pretrained model, one for the embedded)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay, on matrices only."})
    warmup_steps: int = field(default=0, metadata={"help": "Steps of linear warmup."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of the run's steps to warm up over, when "
                                                                "--warmup_steps is 0 (TrainingArguments)."})
    lr_scheduler_type: Optional[str] = field(
        default=None, metadata={"help": "One of transformers' SchedulerType but reduce_lr_on_plateau and greedy "
                                         "(they step on a metric): linear, cosine, constant, constant_with_warmup, "
                                         "cosine_with_min_lr, ...; default: the recipe's."})
    lr_scheduler_kwargs: Optional[str] = field(
        default=None, metadata={"help": "JSON of the schedule's own arguments (TrainingArguments), e.g. "
                                         "'{\"min_lr_rate\": 0.1}' for cosine_with_min_lr."})
    max_grad_norm: Optional[float] = field(
        default=None, metadata={"help": "Global gradient-norm clipping, 0 disables; default: the recipe's."})
    max_grad_norm_per_tensor: float = field(
        default=0.0, metadata={"help": "With --optimizer_in_backward: clip each parameter's gradient alone to this "
                                        "L2 norm just before its update (no global norm exists in backward); 0: "
                                        "off."})
    logging_steps: int = field(default=10, metadata={"help": "Steps per log line (the Trainer's default: 500)."})
    logging_dir: Optional[str] = field(default=None, metadata={"help": "Where trackers write; default: output_dir."})
    save_steps: int = field(
        default=500, metadata={"help": "Write a resumable checkpoint every N steps and at the last step; 0: never."})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "A checkpoint-<step> folder, 'latest' (the newest in output_dir), or 'auto' "
                                "(the newest if there is one, else start fresh: for jobs that get requeued)."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every N steps; always at the end."})
    eval_strategy: Optional[str] = field(
        default=None, metadata={"help": "no (never evaluate: --validation_split_percentage 0 may then train on all "
                                         "the data), steps (every --eval_steps, default --logging_steps) or epoch, "
                                         "as in TrainingArguments; default: every --eval_steps if given, and at "
                                         "the end."})
    save_strategy: Optional[str] = field(
        default=None, metadata={"help": "no (no checkpoints), steps (every --save_steps) or epoch (at each epoch's "
                                         "end); default: steps. A checkpoint is also written at the last step "
                                         "unless no."})
    seed: int = field(default=42, metadata={"help": "Seeds the model's initialisation, the data order and the "
                                                    "rounding noise."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Processes loading batches (0: in the "
                                                                      "training process)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward: less "
                                                                          "memory, about a third more compute."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast with fp32 weights (mixed precision)."})
    fp16: bool = field(default=False, metadata={"help": "fp16 autocast with a loss scaler (a CUDA GPU only)."})
    stochastic_rounding: bool = field(
        default=True, metadata={"help": "With bf16 weights (--dtype bfloat16): write each update into the weights "
                                         "rounded stochastically, so that updates smaller than bf16's spacing are kept "
                                         "in expectation; false: rounded to nearest (they are lost). No effect on "
                                         "fp32 or fp16 weights."})
    optimizer_in_backward: bool = field(
        default=False, metadata={"help": "Step each parameter inside backward as soon as its gradient is complete, "
                                          "and free the gradient: one gradient alive at a time instead of all "
                                          "(torchtune's optimizer_in_bwd). No gradient accumulation, no clipping by "
                                          "global norm; one process, DDP or FSDP2. LOMO and AdaLomo always do."})
    torch_compile: bool = field(
        default=False, metadata={"help": "Compile the model's decoder blocks with torch.compile (inductor), in place: "
                                          "the first steps pay the compile time, the later ones run faster."})
    torch_compile_mode: Optional[str] = field(
        default=None, metadata={"help": f"torch.compile's mode: {', '.join(COMPILE_MODES)}; setting it turns "
                                         "--torch_compile on (as in TrainingArguments)."})
    chunked_loss: bool = field(
        default=True, metadata={"help": "Compute the output layer and the loss on the trained positions only, a "
                                         "chunk of logits at a time (recomputed in backward), in training and "
                                         "evaluation; false: the whole logits at once."})
    profile_memory: bool = field(
        default=False, metadata={"help": "Break one training step's peak memory down by category (output_dir/"
                                         "memory_profile.md)."})
    memory_snapshot_steps: Optional[str] = field(
        default=None, metadata={"help": "CUDA only: record allocations over steps A-B into output_dir/"
                                         "memory_snapshot.pickle (open at pytorch.org/memory_viz)."})
    memory_check: str = field(
        default="error", metadata={"help": "Before any weight loads, the estimated peak per device against what the "
                                          "device has: error (refuse a run that cannot fit, naming what would), warn "
                                          "(say so and start), off."})
    memory_budget_gib: Optional[float] = field(
        default=None, metadata={"help": "GiB per device the run may use, for --memory_check; default: the GPU's free "
                                         "memory, or the machine's available RAM shared by the run's processes."})
    disable_tqdm: Optional[bool] = field(
        default=None, metadata={"help": "No progress bars (TrainingArguments' name). Default: bars only when the "
                                         "output is a terminal and TQDM_DISABLE is unset, so that a log piped to a "
                                         "file has one line per log point (grep '^step=')."})
    report_to: str = field(default="none", metadata={"help": f"Tracker: one of {', '.join(TRACKERS)}."})
    run_name: Optional[str] = None


SHARED_ARGUMENTS = (ModelArguments, DataArguments, TrainArguments)


def argument_classes(recipe) -> tuple[type, ...]:
    """What a recipe's command line is parsed into: the shared arguments, then the optimizer knobs (the recipe's own,
    with its defaults, and every other recipe's, refused: `recipe.arguments_class()`)."""
    return SHARED_ARGUMENTS + (recipe.arguments_class(),)


@dataclass
class Config:
    model: ModelArguments
    data: DataArguments
    train: TrainArguments
    optim: Any  # the recipe's knobs dataclass, with every other recipe's (optimizer_arguments)
    recipe: str = ""
    launch: LaunchSetup = field(default_factory=LaunchSetup.from_environment)
    defaults_used: dict = field(default_factory=dict)  # flag -> which default filled it in, and why

    def to_dict(self) -> dict:
        out = {"recipe": self.recipe, "launch": self.launch.describe(), "defaults_used": self.defaults_used}
        for part in (self.model, self.data, self.train, self.optim):
            out.update(dataclasses.asdict(part))
        return out


def all_flag_names(recipe) -> list[str]:
    return [f.name for cls in argument_classes(recipe) for f in dataclasses.fields(cls)]


# Other names of the same flags: TRL's for --block_size, transformers' older one for --dtype
ALIASES = {"max_seq_length": "block_size", "max_length": "block_size", "torch_dtype": "dtype"}
# Flags users bring from the Trainer and elsewhere that mean something else here: the sentence they need
NOT_FLAGS_HERE = {
    "optim": "the script is the optimizer here: run recipes/<name>.py, one per optimizer (the README's table lists "
             "them)",
    "lr": "the learning rate is --learning_rate",
    "deepspeed": "DeepSpeed comes from the launch here: accelerate launch --config_file accelerate_configs/zero3.yaml "
                 "(or zero2.yaml, zero3_offload.yaml), or your JSON named in an accelerate config as deepspeed_config: "
                 "{deepspeed_config_file: ds.json} (docs/distributed.md)",
    "fsdp": "FSDP comes from the launch here: accelerate launch --config_file accelerate_configs/fsdp2.yaml",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The recipe's docstring as written, and each flag's default after its text."""


def parse_config(recipe: OptimizerRecipe, argv: list[str] | None = None) -> Config:
    """Parse `argv` (and the YAML file given with --config), fill in the recipe's defaults, and validate."""
    argv = _with_aliases_resolved(list(sys.argv[1:] if argv is None else argv))
    classes = argument_classes(recipe)
    knobs = {f.name for f in dataclasses.fields(classes[-1])}
    parser = HfArgumentParser(classes, description=recipe.description, formatter_class=_HelpFormatter,
                              allow_abbrev=False)
    parser.error = _refuse  # a bad value is one line, not the usage first
    parser.add_argument("--config", default=None, help="YAML file of flag: value pairs; the command line overrides it.")
    for action in parser._actions:  # --help lists the knobs this optimizer reads; the others stay refused if set
        if action.dest in knobs and action.dest not in recipe.reads_flags:
            action.help = argparse.SUPPRESS
        elif action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn --{action.dest} off."  # not the positive flag's text again
        elif action.help is None:
            action.help = " "  # listed with its default
    known, _ = parser.parse_known_args(argv)
    from_file = _read_yaml_flags(known.config, recipe) if known.config else {}
    parser.set_defaults(**from_file)
    *parts, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    model, data, train, optim = parts[:4]  # parts[4]: the namespace holding --config
    if remaining:
        raise ConfigError(_unknown_flag_message(remaining, recipe))
    explicitly_set = _flags_given(argv, from_file) & knobs
    config = Config(model, data, train, optim, recipe=recipe.name)
    if train.torch_compile_mode is not None:  # TrainingArguments: a compile mode implies compiling
        train.torch_compile = True
    if str(train.resume_from_checkpoint).lower() in ("true", "false"):  # TrainingArguments' boolean: the newest
        train.resume_from_checkpoint = "latest" if str(train.resume_from_checkpoint).lower() == "true" else None
    recipe = recipe.for_run(config)  # e.g. its updates in backward
    recipe.fill_defaults(config)
    validate(config, recipe, explicitly_set)
    return config


def _refuse(message: str):
    """argparse's error as one line: "--num_train_epochs: invalid float value: 'five'" (its dashed alias left out)."""
    raise ConfigError(re.sub(r"^argument (--[\w]+)/--[\w-]+:", r"\1:", message))


def _with_aliases_resolved(argv: list[str]) -> list[str]:
    """--max_seq_length 512 -> --block_size 512 (and --name=value forms)."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name.startswith("--") and name[2:].replace("-", "_") in ALIASES:
            arg = f"--{ALIASES[name[2:].replace('-', '_')]}{eq}{value}"
        out.append(arg)
    return out


def _read_yaml_flags(path: str, recipe) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file; give the path of a YAML file of flag: value pairs")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag: value pairs at the top level")
    values = {ALIASES.get(key, key): value for key, value in values.items()}
    if isinstance(values.get("report_to"), list):  # TrainingArguments takes a list of trackers
        values["report_to"] = ",".join(values["report_to"]) or "none"
    unknown = sorted(set(values) - set(all_flag_names(recipe)))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)}; the keys are the flag names "
                          "without dashes (see --help)")
    return values


def _unknown_flag_message(remaining: list[str], recipe) -> str:
    flag = next((r for r in remaining if r.startswith("-")), remaining[0])
    name = flag.lstrip("-").split("=")[0].replace("-", "_")
    if name in NOT_FLAGS_HERE:
        return f"--{name} is not a flag of the recipes: {NOT_FLAGS_HERE[name]}"
    close = difflib.get_close_matches(name, all_flag_names(recipe), n=1)
    hint = f"did you mean --{close[0]}? " if close else ""
    return f"unknown flag or value {flag!r}; {hint}run with --help to list the flags"


def _flags_given(argv: list[str], from_file: dict) -> set[str]:
    """The flags named on the command line (--name, --name=value, --name-with-dashes) or in the --config file."""
    named = {arg[2:].partition("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    return named | set(from_file)


def data_file_builder(dataset_name: str | None) -> str | None:
    """The `datasets` builder for a local data file, or None for a hub id, a local folder or the embedded corpus."""
    if dataset_name is None:
        return None
    return DATA_FILE_BUILDERS.get(Path(dataset_name).suffix.lower())


def validate(config: Config, recipe: OptimizerRecipe, optimizer_flags_set: set[str]) -> None:
    missing = recipe.missing_package()
    if missing:
        raise ConfigError(missing)
    t, d = config.train, config.data
    positive = {"learning_rate": t.learning_rate, "per_device_train_batch_size": t.per_device_train_batch_size,
                "per_device_eval_batch_size": t.per_device_eval_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps, "logging_steps": t.logging_steps}
    if d.block_size is not None:
        positive["block_size"] = d.block_size
    if t.eval_steps is not None:
        positive["eval_steps"] = t.eval_steps
    if t.save_total_limit is not None:
        positive["save_total_limit"] = t.save_total_limit
    if t.max_steps == -1:
        positive["num_train_epochs"] = t.num_train_epochs
    else:
        positive["max_steps"] = t.max_steps
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"--{name} must be positive, got {value}; pass a value > 0")
    for name in ("weight_decay", "warmup_steps", "max_grad_norm", "max_grad_norm_per_tensor", "save_steps"):
        if getattr(t, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(t, name)}")
    if config.model.dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--dtype {config.model.dtype!r} is not a weights dtype; use one of "
                          f"{', '.join(WEIGHT_DTYPES)}")
    _validate_strategies(config)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"--warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.dataloader_num_workers < 0:
        raise ConfigError(f"--dataloader_num_workers must be >= 0, got {t.dataloader_num_workers}")
    if t.max_grad_norm_per_tensor > 0 and not t.optimizer_in_backward:
        raise ConfigError(f"--max_grad_norm_per_tensor {t.max_grad_norm_per_tensor} clips each gradient inside "
                          "backward, before its update: add --optimizer_in_backward true, or clip by global norm with "
                          "--max_grad_norm (LOMO and AdaLomo: --clip_grad_value or --max_grad_norm)")
    if t.fp16 and t.bf16:
        raise ConfigError("--fp16 and --bf16 both set: choose one mixed precision (bf16 needs no loss scaler)")
    if t.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 true is fp16 autocast with a loss scaler, for CUDA GPUs; on a CPU use --bf16 true")
    _validate_schedule(t)
    _validate_trackers(t)
    if t.memory_snapshot_steps:
        try:
            parse_step_window(t.memory_snapshot_steps)
        except ValueError:
            raise ConfigError(f"--memory_snapshot_steps {t.memory_snapshot_steps!r}: give a step window A-B with "
                              "1 <= A <= B, e.g. 3-5") from None
        if not torch.cuda.is_available():
            raise ConfigError("--memory_snapshot_steps records CUDA allocations, and there is no CUDA device here; "
                              "use --profile_memory for a per-category breakdown on any device")
    if t.memory_check not in MEMORY_CHECKS:
        raise ConfigError(f"--memory_check {t.memory_check!r}: use one of {', '.join(MEMORY_CHECKS)}")
    if t.memory_budget_gib is not None and not t.memory_budget_gib > 0:
        raise ConfigError(f"--memory_budget_gib must be positive, got {t.memory_budget_gib}")
    _validate_dataset_path(d.dataset_name)
    if d.on_bad_rows not in BAD_ROW_ACTIONS:
        raise ConfigError(f"--on_bad_rows {d.on_bad_rows!r}: use one of {', '.join(BAD_ROW_ACTIONS)}")
    if d.dataset_format not in DATA_FORMATS:
        raise ConfigError(f"--dataset_format {d.dataset_format!r} is not a format; use one of "
                          f"{', '.join(DATA_FORMATS)}")
    if d.chat_template and not os.path.isfile(d.chat_template):
        raise ConfigError(f"--chat_template {d.chat_template}: no such file; give the path of a Jinja chat template "
                          "(e.g. an instruct model's chat_template.jinja)")
    if t.torch_compile_mode is not None and t.torch_compile_mode not in COMPILE_MODES:
        raise ConfigError(f"--torch_compile_mode {t.torch_compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
    unread = recipe.flags_it_does_not_read(optimizer_flags_set)
    if unread:
        raise ConfigError(unread)
    problem = recipe.refuse(config)
    if problem:
        raise ConfigError(problem)


STRATEGIES = ("no", "steps", "epoch")
# schedules that need an argument of their own, and one that needs a metric this loop does not feed it
SCHEDULE_NEEDS = {"cosine_with_min_lr": ("min_lr", "min_lr_rate"), "cosine_warmup_with_min_lr": ("min_lr", "min_lr_rate"),
                  "warmup_stable_decay": ("num_decay_steps",)}
SCHEDULES_NOT_OFFERED = {"reduce_lr_on_plateau": "it steps on an evaluation metric, and the loop steps the schedule "
                                                 "every optimizer step; use cosine or linear",
                         "greedy": "GreedyLR steps on a metric (step(metrics)), and the loop steps the schedule every "
                                   "optimizer step without one; use cosine or linear"}


def _validate_strategies(config: Config) -> None:
    """eval_strategy / save_strategy as TrainingArguments means them, folded into --eval_steps / --save_steps."""
    t, d = config.train, config.data
    for name in ("eval_strategy", "save_strategy"):
        value = getattr(t, name)
        if value is not None and value not in STRATEGIES:
            raise ConfigError(f"--{name} {value!r}: use one of {', '.join(STRATEGIES)}")
    if t.eval_strategy == "no":
        t.eval_steps = None
    elif t.eval_strategy == "steps" and t.eval_steps is None:
        t.eval_steps = t.logging_steps  # TrainingArguments' default
    if t.save_strategy == "no":
        t.save_steps = 0
    lowest = 0 if t.eval_strategy == "no" else 1
    if not lowest <= d.validation_split_percentage < 100:
        raise ConfigError(f"--validation_split_percentage must be between {lowest} and 99"
                          + ("" if lowest == 0 else " (0, no held-out data, with --eval_strategy no)"))


def offered_schedules() -> list[str]:
    """The --lr_scheduler_type values a recipe takes: transformers' SchedulerType, less those not offered."""
    return [s.value for s in SchedulerType if s.value not in SCHEDULES_NOT_OFFERED]


def _validate_schedule(t) -> None:
    schedulers = offered_schedules()
    if t.lr_scheduler_type in SCHEDULES_NOT_OFFERED:
        raise ConfigError(f"--lr_scheduler_type {t.lr_scheduler_type} is not offered: "
                          f"{SCHEDULES_NOT_OFFERED[t.lr_scheduler_type]}")
    if t.lr_scheduler_type not in schedulers:
        raise ConfigError(f"--lr_scheduler_type {t.lr_scheduler_type!r} is not a schedule; use one of "
                          f"{', '.join(schedulers)}")
    kwargs = schedule_kwargs(t)
    needs = SCHEDULE_NEEDS.get(t.lr_scheduler_type)
    if needs and not any(k in kwargs for k in needs):
        example = {"min_lr": '{"min_lr_rate": 0.1}', "num_decay_steps": '{"num_decay_steps": 100}'}[needs[0]]
        raise ConfigError(f"--lr_scheduler_type {t.lr_scheduler_type} needs {' or '.join(needs)}: pass "
                          f"--lr_scheduler_kwargs '{example}'")


def schedule_kwargs(t) -> dict:
    """--lr_scheduler_kwargs as a dict (get_scheduler's scheduler_specific_kwargs)."""
    if not t.lr_scheduler_kwargs:
        return {}
    import json

    try:
        kwargs = json.loads(t.lr_scheduler_kwargs) if isinstance(t.lr_scheduler_kwargs, str) else t.lr_scheduler_kwargs
    except ValueError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--lr_scheduler_kwargs {t.lr_scheduler_kwargs!r}: give a JSON object, e.g. "
                          "'{\"min_lr_rate\": 0.1}'")
    return kwargs


def trackers(t) -> list[str]:
    """--report_to as a list (comma-separated, or a YAML list); [] for none."""
    names = [n.strip() for n in str(t.report_to).split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


def _validate_trackers(t) -> None:
    from accelerate.utils import imports

    for name in trackers(t):
        if name not in TRACKERS or name == "none":
            raise ConfigError(f"--report_to {name!r} is not a tracker; use one of {', '.join(TRACKERS)}")
        available = getattr(imports, f"is_{name}_available", None)
        if name != "all" and available is not None and not available():
            raise ConfigError(f"--report_to {name}: the {name} package is not installed; pip install {name} "
                              "(or --report_to none)")


def default_block_size(model_config) -> int:
    """--block_size when it is not given: the model's context, at most 1024."""
    return min(1024, getattr(model_config, "max_position_embeddings", 1024))


def parse_step_window(text: str | None) -> tuple[int, int] | None:
    """'A-B' -> (A, B) with 1 <= A <= B."""
    if not text:
        return None
    first, _, last = text.partition("-")
    window = (int(first), int(last or first))
    if not 1 <= window[0] <= window[1]:
        raise ValueError(text)
    return window


def _validate_dataset_path(dataset_name: str | None) -> None:
    if dataset_name is None:
        return
    path = Path(dataset_name)
    builder = data_file_builder(dataset_name)
    if builder is not None and not path.is_file():
        raise ConfigError(f"--dataset_name {dataset_name}: no such file; check the path, or give a hub id")
    if builder is None and path.is_file():
        raise ConfigError(f"--dataset_name {dataset_name}: unsupported file type {path.suffix!r}; use one of "
                          f"{', '.join(DATA_FILE_BUILDERS)}")
