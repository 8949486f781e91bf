"""Every recipe trains on the embedded default and saves a model that loads back; the default run and the plain
`python recipes/<name>.py` are launched as users launch them (every recipe is launched with cpu.yaml and every
distributed config in test_distributed.py); the rest run the recipe's main in-process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from accelerate import Accelerator
from optimizer_recipes.core.data.loading import load_raw_datasets
from optimizer_recipes.core.optimizers.protocol import all_recipes, recipe_names
from optimizer_recipes.core.run.config import parse_config
from optimizer_recipes.core.run.loop import evaluate
from optimizer_recipes.core.run.run_setup import build_dataloaders
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import (
    REPO,
    offline_env,
    read_metrics,
    reset_accelerate_state,
    results,
    run_here,
    smoke,
    train_losses,
)

STEPS = 40


@pytest.mark.parametrize("recipe", smoke(recipe_names(), "adamw", "lomo", "schedule_free_adamw"))  # one per family
def test_recipe_trains_and_saved_model_reproduces_eval_loss(recipe, tmp_path, fresh_accelerate_state):
    out = tmp_path / recipe
    run_here(recipe, "--max_steps", str(STEPS), "--logging_steps", "1", "--output_dir", str(out))

    losses = train_losses(out)
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.9 * first, f"{recipe}: loss did not fall enough: first 5 {first:.3f}, last 5 {last:.3f}"
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["num_processes"] == 1 and run_config["recipe"] == recipe

    # The saved folder is a normal Hugging Face checkpoint: reload it and re-evaluate on the same validation blocks.
    reported = results(out)["eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    recipe_obj = {r.name: r for r in all_recipes()}[recipe]
    config = parse_config(recipe_obj, ["--output_dir", str(tmp_path / "reeval")])
    accelerator = Accelerator(cpu=True)
    _, eval_loader, _, _ = build_dataloaders(config, load_raw_datasets(config), tokenizer, 64, accelerator)
    assert evaluate(model, eval_loader, accelerator)["eval_loss"] == pytest.approx(reported, rel=1e-5)


@pytest.mark.smoke
def test_default_run_needs_no_flags(tmp_path):
    """The README's first command, `python recipes/adalomo.py` with nothing else, its output piped as to a log file
    (the progress bar left at its default): trains on the embedded default into runs/adalomo on every core, with a
    log that grep can read."""
    env = {k: v for k, v in offline_env().items() if k not in ("OMP_NUM_THREADS", "TQDM_DISABLE")}
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "adalomo.py")], cwd=tmp_path,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    log = proc.stdout
    assert "\r" not in log and "thread(s) x" not in log and "not passed" not in log, log[:3000]  # no bar, every core
    total_steps = int(log.split(" steps on ")[0].split()[-1])
    step_lines = [line for line in log.splitlines() if line.startswith("step=")]
    logged = [int(line.split()[0].split("=")[1]) for line in step_lines]
    assert logged[:-1] == sorted({*range(10, total_steps + 1, 10), total_steps})  # one line per logging step
    assert f"{total_steps} steps on 1 process(es), " in log and " eval_loss=" in step_lines[-1]
    assert log.splitlines()[-1].startswith("adalomo: saved the model to runs/adalomo (")  # the last line says where
    out = tmp_path / "runs" / "adalomo"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["learning_rate"] == 0.1 and resolved["lr_scheduler_type"] == "linear"


def test_trains_from_local_jsonl_with_text_field(tmp_path):
    data = tmp_path / "train.jsonl"
    from optimizer_recipes.core.data.embedded import generate_corpus

    with data.open("w") as f:
        for doc in generate_corpus(300, seed=7):
            f.write(json.dumps({"id": len(doc), "text": doc}) + "\n")
    out = tmp_path / "out"
    run_here("adamw", "--dataset_name", str(data), "--max_steps", "30", "--logging_steps", "1",
           "--output_dir", str(out), "--validation_split_percentage", "10")
    losses = train_losses(out)
    assert sum(losses[-5:]) <= 0.9 * sum(losses[:5])
    assert results(out)["eval_loss"] < losses[0]


def test_yaml_config_with_command_line_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 7\nlearning_rate: 0.002\nlogging_steps: 1\nlr_scheduler_type: constant\n")
    out = tmp_path / "out"
    run_here("adamw", "--config", str(cfg), "--learning_rate", "0.003", "--output_dir", str(out))
    metrics = [r for r in read_metrics(out) if "loss" in r]
    assert len(metrics) == 7  # from the file
    assert all(r["lr"] == pytest.approx(0.003) for r in metrics)  # the command line wins


@pytest.mark.parametrize("recipe", ["adamw", "schedule_free_adamw"])
def test_gradient_accumulation_trains_like_the_larger_batch(recipe, tmp_path):
    """3 micro-batches of 8 per step must give the losses of one batch of 24 (the same 24 sequences)."""
    accumulated, large = tmp_path / "accumulated", tmp_path / "large"
    args = ["--max_steps", "6", "--logging_steps", "1"]
    run_here(recipe, *args, "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "3",
           "--output_dir", str(accumulated))
    run_here(recipe, *args, "--per_device_train_batch_size", "24", "--output_dir", str(large))
    assert len(train_losses(accumulated)) == 6
    assert train_losses(accumulated) == pytest.approx(train_losses(large), rel=1e-5)
    assert results(accumulated)["tokens_seen"] == 6 * 24 * 64


def test_recipe_docstrings_say_what_they_support_and_refuse():
    for recipe in all_recipes():
        text = recipe.description
        assert "Supports:" in text and "Refuses:" in text, recipe.name


def test_gradient_checkpointing_gives_the_same_losses_with_fewer_activations(tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    args = ["--max_steps", "5", "--logging_steps", "1", "--profile_memory", "true"]
    run_here("lomo", *args, "--output_dir", str(plain))
    run_here("lomo", *args, "--output_dir", str(ckpt), "--gradient_checkpointing", "true")
    assert train_losses(ckpt) == pytest.approx(train_losses(plain), rel=1e-5)
    assert torch.tensor(train_losses(plain)).isfinite().all()
    # the measured step keeps only each layer's input for backward (a third or less of the activations here)
    kept = [json.loads((run / "memory_profile.json").read_text())["activations_after_forward"] for run in (plain, ckpt)]
    assert kept[1] < 0.5 * kept[0]


def test_recipe_runs_as_a_plain_python_script_and_documents_itself(tmp_path):
    """`python recipes/grokadamw.py`: the script's own folder must not shadow the grokadamw package."""
    script = str(REPO / "recipes" / "grokadamw.py")
    help_text = subprocess.run([sys.executable, script, "--help"], env=offline_env(), capture_output=True,
                               text=True, timeout=120)
    assert help_text.returncode == 0 and "Refuses: DeepSpeed ZeRO" in help_text.stdout
    assert "--grokadamw_lamb" in help_text.stdout and "--learning_rate" in help_text.stdout
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, script, "--max_steps", "3", "--output_dir", str(out)], env=offline_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results(out)["step"] == 3


def test_train_in_process_puts_back_the_signal_handlers_it_replaced(tmp_path, fresh_accelerate_state, monkeypatch):
    """A notebook or sweep driver that calls train() keeps its own SIGTERM/SIGUSR1 handling after the run, whether
    the run returns or raises."""
    import signal

    from optimizer_recipes.core.run import loop

    recipe = {r.name: r for r in all_recipes()}["adamw"]

    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        loop.train(recipe, parse_config(recipe, ["--max_steps", "2", "--output_dir", str(tmp_path / "returns")]))
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) is mine
        reset_accelerate_state()

        def fails(*args, **kwargs):
            raise RuntimeError("evaluation failed")

        monkeypatch.setattr(loop, "evaluate", fails)
        with pytest.raises(RuntimeError, match="evaluation failed"):
            loop.train(recipe, parse_config(recipe, ["--max_steps", "2", "--output_dir", str(tmp_path / "raises")]))
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) is mine
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_help_lists_the_knobs_this_recipe_reads_and_not_the_others():
    lomo_help = subprocess.run([sys.executable, str(REPO / "recipes" / "lomo.py"), "--help"], env=offline_env(),
                               capture_output=True, text=True, timeout=120).stdout
    assert "--clip_grad_value" in lomo_help and "--learning_rate" in lomo_help and "--dataset_format" in lomo_help
    for other in ("--adam_beta1", "--grokadamw_lamb", "--loss_scale", "--sgd_momentum"):
        assert other not in lomo_help
    # every flag has its text and its default, read from the dataclasses; a --no_ flag says what it turns off
    flags = " ".join(lomo_help.split("options:")[1].split())
    for flag, text in (("--num_train_epochs", "Passes over the training data, when --max_steps is -1. (default: 3.0)"),
                       ("--logging_steps", "Steps per log line (the Trainer's default: 500). (default: 10)"),
                       ("--seed", "the data order and the rounding noise. (default: 42)"),
                       ("--no_stochastic_rounding", "Turn --stochastic_rounding off.")):
        assert text in flags.split(flag, 1)[1][:400], flag


def test_trainer_and_trl_names_read_as_the_flags_they_mean(tmp_path):
    """TRL's --max_seq_length / --max_length are --block_size, the old --torch_dtype is --dtype, Trainer's
    --resume_from_checkpoint true is 'latest', and a YAML config takes report_to as a list, as TrainingArguments do."""
    recipe = {r.name: r for r in all_recipes()}["adamw"]
    config = parse_config(recipe, ["--max_seq_length", "32", "--torch_dtype", "bfloat16", "--resume_from_checkpoint",
                                   "true", "--output_dir", str(tmp_path / "a")])
    assert (config.data.block_size, config.model.dtype, config.train.resume_from_checkpoint) == (32, "bfloat16",
                                                                                                "latest")
    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text("max_length: 48\nreport_to: [none]\neval_strategy: 'no'\nvalidation_split_percentage: 0\n"
                         "save_strategy: 'no'\nwarmup_ratio: 0.1\n")
    config = parse_config(recipe, ["--config", str(yaml_file), "--output_dir", str(tmp_path / "b")])
    t = config.train
    assert (config.data.block_size, t.report_to, t.eval_steps, t.save_steps) == (48, "none", None, 0)


def test_every_offered_schedule_trains_three_steps(tmp_path):
    """Each --lr_scheduler_type that --help offers (with the arguments it needs, as Trainer takes them through
    --lr_scheduler_kwargs) trains: the lr of each step is transformers' schedule for those arguments (warmup and
    kwargs included), and the run ends with a model."""
    import torch
    from optimizer_recipes.core.run.config import SCHEDULE_NEEDS, offered_schedules
    from transformers import get_scheduler

    def expected_lrs(schedule: str, warmup: int, kwargs: dict) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
        scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=3,
                                  scheduler_specific_kwargs=kwargs)
        lrs = []
        for _ in range(3):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return lrs

    example_kwargs = {"min_lr": '{"min_lr_rate": 0.1}', "num_decay_steps": '{"num_decay_steps": 1}'}
    for schedule in offered_schedules():
        out = tmp_path / schedule
        needs = SCHEDULE_NEEDS.get(schedule)
        kwargs = ["--lr_scheduler_kwargs", example_kwargs[needs[0]]] if needs else []
        warmup = ["--warmup_steps", "1"] if schedule != "constant" else []  # constant has none: refused with it
        proc = run_here("adamw", "--max_steps", "3", *warmup, "--logging_steps", "1", "--lr_scheduler_type", schedule,
                        *kwargs, "--output_dir", str(out), check=False)
        assert proc.returncode == 0, f"{schedule}: {proc.stderr[-2000:]}"
        lrs = [r["lr"] for r in read_metrics(out) if "lr" in r]
        reference = expected_lrs(schedule, len(warmup) // 2, json.loads(kwargs[1]) if kwargs else {})
        assert lrs == pytest.approx(reference, rel=1e-6), schedule
        assert (out / "model.safetensors").is_file()


def test_trainer_strategies_warmup_ratio_and_no_evaluation_train_as_the_trainer_does(tmp_path):
    """--eval_strategy no with --validation_split_percentage 0 (every row trains, nothing evaluated, results without
    an eval loss), --save_strategy epoch (a checkpoint at each epoch's end), --warmup_ratio (ceil(ratio x steps)
    warmup steps), a worker process loading the batches."""
    out = tmp_path / "out"
    data = tmp_path / "train.jsonl"
    from optimizer_recipes.core.data.embedded import generate_corpus

    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in generate_corpus(200, seed=3)))
    run_here("adamw", "--dataset_name", str(data), "--eval_strategy", "no", "--validation_split_percentage", "0",
             "--save_strategy", "epoch", "--num_train_epochs", "2", "--per_device_train_batch_size", "32",
             "--warmup_ratio", "0.5", "--logging_steps", "1", "--dataloader_num_workers", "1",
             "--output_dir", str(out))
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    total, per_epoch = resolved["total_steps"], resolved["save_steps"]
    assert total == 2 * per_epoch and resolved["data_summary"]["splits"]["validation"]["rows"] == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted([f"checkpoint-{per_epoch}", f"checkpoint-{total}"])
    assert resolved["warmup_steps"] == -(-total // 2)
    lrs = [r["lr"] for r in read_metrics(out) if "lr" in r]
    assert lrs[0] == 0 and max(lrs) == lrs[resolved["warmup_steps"]]  # warms up, then decays
    assert not any("eval_loss" in r for r in read_metrics(out)) and "eval_loss" not in results(out)
