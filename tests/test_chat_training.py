"""Chat and Alpaca files train end to end: one process (in-process) and 2-process DDP (launched), reload, trackers."""

from __future__ import annotations

import glob
import json

import pytest
import yaml
from accelerate import Accelerator
from optimizer_recipes.core.data.embedded import CHAT_TEMPLATE
from optimizer_recipes.core.data.loading import load_raw_datasets
from optimizer_recipes.core.optimizers.protocol import all_recipes
from optimizer_recipes.core.run.config import MODEL_FILES, parse_config
from optimizer_recipes.core.run.loop import evaluate
from optimizer_recipes.core.run.run_setup import build_dataloaders
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import assert_shared_launch_ran, read_metrics, results, run_here, train_losses, two_process_run

RECIPES = {r.name: r for r in all_recipes()}
STEPS = ["--max_steps", "30", "--logging_steps", "5", "--per_device_train_batch_size", "4"]


@pytest.fixture(scope="module")
def data_files(shared_data):
    return {"chat": shared_data["chat"], "alpaca": shared_data["alpaca"]}


def instruction_flags(data_file, processes: int) -> list[str]:
    return ["--dataset_name", str(data_file), *STEPS[:-1], str(4 // processes)]  # a global batch of 4 either way


CASES = [("chat", "adalomo", "cpu.yaml"), ("chat", "adalomo", "multi_gpu.yaml"),
         ("alpaca", "adamw", "cpu.yaml"), ("alpaca", "lomo", "multi_gpu.yaml")]
for _data, _recipe, _config in CASES:  # the 2-process ones run in multi_gpu.yaml's shared launch (tests/conftest.py)
    if _config != "cpu.yaml":
        two_process_run(_config, f"instruction-{_data}-{_recipe}", _recipe,
                        lambda data, name=_data: instruction_flags(data[name], 2))


@pytest.mark.parametrize("data, recipe, config", CASES)
def test_instruction_data_trains_end_to_end_and_the_model_reloads(data, recipe, config, data_files, tmp_path,
                                                                  two_process_runs, fresh_accelerate_state):
    processes = 2 if config == "multi_gpu.yaml" else 1
    if processes == 2:
        runs = two_process_runs(config)
        assert_shared_launch_ran(runs)
        out = runs[f"instruction-{data}-{recipe}"][0]
    else:
        out = tmp_path / "out"
        run_here(recipe, *instruction_flags(data_files[data], 1), "--output_dir", str(out))

    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["num_processes"] == processes, resolved["distributed_type"]
    summary = resolved["data_summary"]
    assert summary["data_format"] == {"chat": "messages", "alpaca": "alpaca"}[data]
    assert summary["loss_on"] == {"chat": "the assistant turns", "alpaca": "the completions"}[data]
    losses = train_losses(out)
    assert losses[-1] < 0.85 * losses[0], losses
    final = results(out)
    assert final["replicas_identical"] and final["num_processes"] == processes
    assert 0 < final["trained_tokens_seen"] < 0.6 * final["tokens_seen"]  # the prompts are in, not trained

    # A normal Hugging Face folder: the model reloads, the tokenizer keeps its chat template, and the saved model
    # re-evaluated in one process gives the eval loss the run reported (masked tokens, every row counted once)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    config_ = parse_config(RECIPES[recipe], ["--dataset_name", str(data_files[data]),
                                             "--output_dir", str(tmp_path / "reeval")])
    _, eval_loader, _, _ = build_dataloaders(config_, load_raw_datasets(config_), tokenizer, resolved["block_size"],
                                             Accelerator(cpu=True))
    evaluation = evaluate(model, eval_loader, Accelerator(cpu=True))
    assert evaluation["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_padding_instead_of_packing_trains_the_same_examples(data_files, tmp_path):
    """--packing false: one example per row, padded per batch; the same tokens are trained, the loss falls."""
    packed, padded = tmp_path / "packed", tmp_path / "padded"
    for out, flags in ((packed, []), (padded, ["--packing", "false"])):
        run_here("adamw", "--dataset_name", str(data_files["chat"]), *STEPS, "--output_dir", str(out), *flags)
    summaries = [yaml.safe_load((out / "run_config.yaml").read_text())["data_summary"] for out in (packed, padded)]
    assert summaries[0]["splits"]["train"]["trained_tokens"] == summaries[1]["splits"]["train"]["trained_tokens"]
    assert summaries[1]["splits"]["train"]["rows"] > summaries[0]["splits"]["train"]["rows"]
    losses = train_losses(padded)
    assert losses[-1] < 0.85 * losses[0]


def test_tensorboard_holds_the_logged_scalars_and_the_run_configuration(data_files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "out"
    run_here("adamw", "--dataset_name", str(data_files["chat"]), "--max_steps", "6", "--logging_steps", "2",
             "--eval_steps", "3", "--report_to", "tensorboard", "--run_name", "chat-run", "--output_dir", str(out))
    scalars, hparams = {}, {}
    for path in glob.glob(str(out / "chat-run" / "**" / "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
        try:  # accelerate writes the configuration with add_hparams, into an event file of its own
            content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        except KeyError:
            continue
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    logged = [r for r in read_metrics(out) if "loss" in r]
    assert [step for step, _ in scalars["loss"]] == [r["step"] for r in logged] == [2, 4, 6]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert [step for step, _ in scalars["eval_loss"]] == [3, 6]
    assert {"lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s"} <= set(scalars)
    assert hparams["learning_rate"].number_value == pytest.approx(1e-3)
    assert hparams["dataset_name"].string_value == str(data_files["chat"])
    assert hparams["recipe"].string_value == "adamw"


def test_grad_norm_is_logged_only_where_it_is_measured(tmp_path):
    """LOMO without global-norm clipping measures no norm: no grad_norm at all, never a stand-in 0."""
    out = tmp_path / "out"
    run_here("lomo", "--max_steps", "4", "--logging_steps", "2", "--output_dir", str(out))
    assert all("grad_norm" not in r for r in read_metrics(out))
    run_here("adamw", "--max_steps", "4", "--logging_steps", "2", "--output_dir", str(tmp_path / "adamw"))
    assert all(r["grad_norm"] > 0 for r in read_metrics(tmp_path / "adamw") if "loss" in r)


BAD_DATA = {
    "columns fit no format": ([{"question": "q", "answer": "a"}], [],
                              "has columns question, answer, which fit no data format; the formats are text ('text')"),
    "columns fit two formats": ([{"text": "t", "prompt": "p", "completion": "c"}], [],
                                "which fit the formats prompt_completion and text; say which with --dataset_format "
                                "prompt_completion|text"),
    "format without its columns": ([{"text": "t"}], ["--dataset_format", "alpaca"],
                                   "--dataset_format alpaca: --dataset_name"),
    "unknown speaker": ([{"conversations": [{"from": "narrator", "value": "x"}]}], [],
                        "'conversations' turn 1 is from 'narrator'; the speakers understood are"),
    "missing chat template file": ([{"text": "t"}], ["--chat_template", "no/such/template.jinja"],
                                   "--chat_template no/such/template.jinja: no such file"),
    "no chat template": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
                         ["--tokenizer_name", "TOKENIZER_WITHOUT_TEMPLATE"],
                         "the tokenizer has no chat template, and the data set is conversational; pass "
                         "--chat_template PATH"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_fails_with_one_line_before_the_model_loads(case, tmp_path):
    records, flags, expected = BAD_DATA[case]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records * 20))
    if "TOKENIZER_WITHOUT_TEMPLATE" in flags:
        from optimizer_recipes.core.data.embedded import EMBEDDED_DIR

        tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
        tokenizer.chat_template = None
        tokenizer.save_pretrained(tmp_path / "plain_tokenizer")
        (tmp_path / "plain_tokenizer" / "chat_template.jinja").unlink(missing_ok=True)
        flags = [str(tmp_path / "plain_tokenizer") if f == "TOKENIZER_WITHOUT_TEMPLATE" else f for f in flags]
    out = tmp_path / "out"
    proc = run_here("adamw", "--dataset_name", str(data), *flags, "--max_steps", "2", "--output_dir", str(out),
                    check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("adamw: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split(errors[0])[0]
    assert not any((out / f).exists() for f in MODEL_FILES) and not (out / "metrics.jsonl").exists()
