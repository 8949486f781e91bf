"""Bad input fails fast: one line on stderr naming the problem and the fix, exit status 2, no model written."""

from __future__ import annotations

import json

import pytest
from optimizer_recipes.core.optimizers.protocol import all_recipes
from optimizer_recipes.core.run.config import MODEL_FILES
from optimizer_recipes.core.run.loop import main

from tests.conftest import launch, run_here, smoke

CASES = {
    "unknown flag": ("adamw", ["--learnig_rate", "1e-3"], "unknown flag or value '--learnig_rate'; did you mean --learning_rate?"),
    "zero learning rate": ("adamw", ["--learning_rate", "0"], "--learning_rate must be positive, got 0.0"),
    "negative learning rate": ("lomo", ["--learning_rate", "-1"], "--learning_rate must be positive"),
    "zero batch size": ("adamw", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be positive"),
    "zero steps": ("adafactor", ["--max_steps", "0"], "--max_steps must be positive, got 0"),
    "missing dataset file": ("adamw", ["--dataset_name", "no/such/file.jsonl"], "--dataset_name no/such/file.jsonl: no such file"),
    "accumulation with lomo": ("lomo", ["--gradient_accumulation_steps", "4"], "lomo updates the weights inside backward, so gradients cannot be accumulated"),
    "accumulation with adalomo": ("adalomo", ["--gradient_accumulation_steps", "2"], "use --gradient_accumulation_steps 1 with a larger --per_device_train_batch_size"),
    "schedule with schedule-free adamw": ("schedule_free_adamw", ["--lr_scheduler_type", "cosine"], "use --lr_scheduler_type constant"),
    "schedule with schedule-free sgd": ("schedule_free_sgd", ["--lr_scheduler_type", "linear"], "--lr_scheduler_type linear would stack a second schedule"),
    "knob of another optimizer": ("adamw", ["--loss_scale", "64"], "--loss_scale has no effect on adamw; it is read by adalomo"),
    "missing model folder": ("adamw", ["--model_name_or_path", "./no-such-model"],
                             "--model_name_or_path ./no-such-model: no such folder"),
    "hub model not in the offline cache": ("lomo", ["--model_name_or_path", "no-org/no-such-model"],
                                           "--model_name_or_path no-org/no-such-model: not in the local Hugging Face "
                                           "cache, and HF_HUB_OFFLINE is set"),
    "hub tokenizer not in the offline cache": ("adamw", ["--tokenizer_name", "no-org/no-such-tokenizer"],
                                               "--tokenizer_name no-org/no-such-tokenizer: not in the local Hugging "
                                               "Face cache"),
    "hub data set not in the offline cache": ("adalomo", ["--dataset_name", "no-org/no-such-data"],
                                              "--dataset_name no-org/no-such-data: not in the local Hugging Face "
                                              "cache"),
    "missing data folder": ("adamw", ["--dataset_name", "./no/such/folder"], "--dataset_name ./no/such/folder: no such "
                            "file or folder"),
    "batch larger than the data": ("adamw", ["--per_device_train_batch_size", "4096"],
                                   "the training data makes 292 rows, fewer than one optimizer step takes (4096 per "
                                   "process x 1 process(es) x 1 accumulated = 4,096)"),
    "grokking signal without evaluations": ("grokadamw", ["--grokadamw_signal", "eval_train_gap"],
                                            "--grokadamw_signal eval_train_gap is refreshed at each evaluation during "
                                            "training: set --eval_steps"),
    "unknown scheduler": ("adamw", ["--lr_scheduler_type", "sometimes"], "--lr_scheduler_type 'sometimes' is not a schedule"),
    "unknown compile mode": ("lomo", ["--torch_compile_mode", "fastest"],
                             "--torch_compile_mode 'fastest': use one of default, reduce-overhead, max-autotune"),
    "unknown attention": ("adamw", ["--attn_implementation", "flash"],
                          "--attn_implementation flash is not an attention implementation; use one of sdpa, eager"),
    "flash attention without a GPU": ("adalomo", ["--attn_implementation", "flash_attention_2"],
                                      "--attn_implementation flash_attention_2 runs on a CUDA GPU, and this machine "
                                      "has none; use sdpa (the default) or eager"),
    "hub attention kernel without a GPU": ("adamw", ["--attn_implementation", "kernels-community/flash-attn2"],
                                           "runs on a CUDA GPU, and this machine has none"),
    "packing with an attention that mixes examples": ("adamw", ["--attn_implementation", "flex_attention"],
                                                      "the model's attention (flex_attention) would let them attend "
                                                      "to each other; use --packing false"),
    # what a Trainer or TRL user types
    "schedule that steps on a metric": ("adamw", ["--lr_scheduler_type", "reduce_lr_on_plateau"],
                                        "--lr_scheduler_type reduce_lr_on_plateau is not offered: it steps on an "
                                        "evaluation metric"),
    "schedule without its argument": ("adamw", ["--lr_scheduler_type", "cosine_with_min_lr"],
                                      "--lr_scheduler_type cosine_with_min_lr needs min_lr or min_lr_rate: pass "
                                      "--lr_scheduler_kwargs '{\"min_lr_rate\": 0.1}'"),
    "schedule arguments that are not JSON": ("adamw", ["--lr_scheduler_kwargs", "min_lr_rate=0.1"],
                                             "--lr_scheduler_kwargs 'min_lr_rate=0.1': give a JSON object"),
    "warmup with the constant schedule": ("adamw", ["--lr_scheduler_type", "constant", "--warmup_steps", "5"],
                                          "so the 5 warmup step(s) asked for would not happen; use "
                                          "--lr_scheduler_type constant_with_warmup"),
    "tracker not installed": ("adamw", ["--report_to", "tensorboard,wandb"],
                              "--report_to wandb: the wandb package is not installed; pip install wandb"),
    "not a tracker": ("adamw", ["--report_to", "tensorbord"], "--report_to 'tensorbord' is not a tracker"),
    "fp16 on a CPU": ("adamw", ["--fp16", "true"], "--fp16 true is fp16 autocast with a loss scaler, for CUDA GPUs; "
                                                   "on a CPU use --bf16 true"),
    "the Trainer's optim": ("adamw", ["--optim", "adamw_torch"], "--optim is not a flag of the recipes: the script is "
                                                                 "the optimizer here: run recipes/<name>.py"),
    "lr for learning_rate": ("lomo", ["--lr", "1e-3"], "--lr is not a flag of the recipes: the learning rate is "
                                                       "--learning_rate"),
    "the Trainer's deepspeed file": ("adamw", ["--deepspeed", "ds_config.json"],
                                     "--deepspeed is not a flag of the recipes: DeepSpeed comes from the launch here"),
    "a value of the wrong type": ("adamw", ["--num_train_epochs", "five"],
                                  "adamw: error: --num_train_epochs: invalid float value: 'five'"),
    "no held-out data while evaluating": ("adamw", ["--validation_split_percentage", "0"],
                                          "--validation_split_percentage must be between 1 and 99 (0, no held-out "
                                          "data, with --eval_strategy no)"),
    "unknown strategy": ("adamw", ["--save_strategy", "best"], "--save_strategy 'best': use one of no, steps, epoch"),
    "resume from a checkpoint that does not exist": ("adamw", ["--resume_from_checkpoint", "runs/nowhere/checkpoint-7"],
                                                     "--resume_from_checkpoint runs/nowhere/checkpoint-7: no such "
                                                     "folder (there is no checkpoint there)"),
}


# Launched as users launch them (the launcher's exit report included); the other cases stop inside the recipe's
# own start-up checks, so they run in-process through the same `main` (a launch costs ~15 s of imports here).
LAUNCHED = ("unknown flag", "batch larger than the data")
RECIPES = {r.name: r for r in all_recipes()}


def steps_unless_given(args: list[str]) -> list[str]:
    return [] if "--max_steps" in args else ["--max_steps", "3"]


@pytest.mark.parametrize("case", LAUNCHED)
def test_bad_input_fails_with_one_clear_line_and_writes_no_model(case, tmp_path):
    """Under `accelerate launch` (1.16) the launcher reports any non-zero exit with its own traceback (a
    CalledProcessError that repeats the line), and exits 1 whatever the script's status; with `-q` it adds nothing:
    the recipe's line is all of stderr (docs/flags.md)."""
    recipe, args, expected = CASES[case]
    out = tmp_path / "out"
    quiet = case == "batch larger than the data"
    proc = launch(recipe, *args, *steps_unless_given(args), "--output_dir", str(out), check=False,
                  launcher_flags=("-q",) if quiet else ())
    assert proc.returncode == 1  # accelerate's status for a failed script (the recipe exits 2: see the in-process cases)
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{recipe}: error:")]
    assert len(error_lines) == 1, proc.stderr[-3000:]
    assert expected in error_lines[0]
    if quiet:
        assert proc.stderr.strip() == error_lines[0], proc.stderr[-3000:]
    before, _, after = proc.stderr.partition(error_lines[0])
    assert "Traceback" not in before  # the recipe printed no traceback; after it, only the launcher's exit report
    assert "Traceback" not in after or "CalledProcessError" in after
    assert "parameters" not in proc.stdout  # the model was never loaded
    assert not any((out / f).exists() for f in MODEL_FILES)


@pytest.mark.parametrize("case", smoke([case for case in CASES if case not in LAUNCHED], "zero learning rate"))
def test_bad_input_stops_at_start_up_with_one_clear_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe, args, expected = CASES[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(RECIPES[recipe], [*args, *steps_unless_given(args), "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert stopped.value.code == 2
    error_lines = [line for line in captured.err.splitlines() if line.startswith(f"{recipe}: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], captured.err[-3000:]
    assert "Traceback" not in captured.err and "parameters" not in captured.out  # the model was never loaded
    assert not out.exists()  # nothing written


def test_missing_text_column_fails_before_the_model_loads(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"content": f"line {i}"}) + "\n" for i in range(50)))
    out = tmp_path / "out"
    proc = launch("adamw", "--dataset_name", str(data), "--output_dir", str(out), check=False)
    assert proc.returncode != 0
    assert f"adamw: error: --dataset_name {data} has columns content, which fit no data format" in proc.stderr
    assert "or pass --text_column for a text column" in proc.stderr
    assert "parameters" not in proc.stdout
    assert not any((out / f).exists() for f in MODEL_FILES)


def test_existing_model_is_never_overwritten_silently(tmp_path):
    out = tmp_path / "out"
    run_here("adamw", "--max_steps", "2", "--output_dir", str(out))
    before = (out / "model.safetensors").read_bytes()
    proc = run_here("adamw", "--max_steps", "2", "--output_dir", str(out), "--learning_rate", "0.5", check=False)
    assert proc.returncode != 0
    assert "already holds a trained model; choose another --output_dir, continue its training to a larger " \
           "--max_steps with --resume_from_checkpoint latest or pass --overwrite_output_dir" in proc.stderr
    assert (out / "model.safetensors").read_bytes() == before


def test_model_folder_without_config_and_unknown_data_configuration(tmp_path, capsys):
    not_a_model = tmp_path / "weights_only"
    not_a_model.mkdir()
    (not_a_model / "model.safetensors").write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(50)))
    for args, expected in (
            (["--model_name_or_path", str(not_a_model)],
             f"--model_name_or_path {not_a_model}: the folder has no config.json (it has model.safetensors)"),
            (["--dataset_name", str(data), "--dataset_config_name", "nope"],
             f"--dataset_config_name nope: --dataset_name {data} has no such configuration")):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as stopped:
            main(RECIPES["adamw"], [*args, "--output_dir", str(out)])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adamw: error:")]
        assert stopped.value.code == 2 and len(errors) == 1 and expected in errors[0]
        assert not out.exists()  # nothing written
