"""GrokAdamW's grokking signal reaches the optimizer and survives resume; launch/grokking.py writes its report."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from optimizer_recipes.measure import grokking  # noqa: E402
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, offline_env, read_metrics, results, run_here

P = 23
RUN = ["--dataset_format", "prompt_completion", "--packing", "false", "--block_size", "8",
       "--per_device_train_batch_size", "32", "--max_steps", "40", "--logging_steps", "1", "--eval_steps", "10",
       "--learning_rate", "3e-3", "--weight_decay", "1.0", "--save_steps", "15"]


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    """a + b mod 23, half the pairs for training, and a fresh 1-layer Llama with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("arithmetic")
    grokking.write_data(folder / "data", P, "+", 0.5, seed=0)
    grokking.write_model(folder / "model", P, "+", seed=0)
    return ["--model_name_or_path", str(folder / "model"), "--dataset_name", str(folder / "data")]


def evaluations(out):
    return [r for r in read_metrics(out) if "grokking_signal" in r]


def test_the_grokking_signal_moves_alpha_and_a_resumed_run_keeps_it(arithmetic, tmp_path):
    signal_on = ["--grokadamw_signal", "eval_train_gap"]
    straight, resumed, off = tmp_path / "straight", tmp_path / "resumed", tmp_path / "off"
    run_here("grokadamw", *arithmetic, *RUN, *signal_on, "--output_dir", str(straight))

    # signal = max(0, eval - train) / max(eval, train), train = mean training loss since the previous evaluation
    records = read_metrics(straight)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = evaluations(straight)
    assert [e["step"] for e in evals] == [10, 20, 30]
    for previous, e in zip([0, 10, 20], evals):
        train = sum(losses[s] for s in range(previous + 1, e["step"] + 1)) / (e["step"] - previous)
        gap = max(0.0, e["eval_loss"] - train) / max(e["eval_loss"], train)
        assert e["grokking_signal"] == pytest.approx(gap, rel=1e-5)
        assert e["grokadamw_alpha"] == pytest.approx(0.98 * math.exp(-0.1 * e["grokking_signal"]), rel=1e-12)
    alphas = [e["grokadamw_alpha"] for e in evals]
    assert len(set(alphas)) == 3 and min(alphas) < 0.98  # it moves with the gap

    # Resumed at step 15, the run goes on with the alpha of step 10's evaluation, and its step-20 signal counts the
    # training losses of steps 11-15 from the checkpoint: the same evaluations, the same weights
    run_here("grokadamw", *arithmetic, *RUN, *signal_on, "--output_dir", str(resumed), "--resume_from_checkpoint",
           str(straight / "checkpoint-15"))
    assert evaluations(resumed) == evals[1:]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # ... and the signal reaches the update: without it the same run ends elsewhere
    run_here("grokadamw", *arithmetic, *RUN, "--output_dir", str(off))
    assert evaluations(off) == []
    c = load_file(off / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_eval_token_accuracy_is_the_share_of_answers_the_model_gets_right(arithmetic, tmp_path):
    """Checked against the saved model, answer by answer: argmax at the '=' position against the answer token."""
    out = tmp_path / "out"
    run_here("adamw", *arithmetic, *RUN, "--output_dir", str(out))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    data = arithmetic[arithmetic.index("--dataset_name") + 1]
    rows = [json.loads(line) for line in open(f"{data}/validation.jsonl")]
    prompts = torch.tensor([tokenizer(r["prompt"])["input_ids"] for r in rows])
    answers = torch.tensor([tokenizer(r["completion"])["input_ids"][0] for r in rows])
    with torch.no_grad():
        predicted = model(prompts).logits[:, -1].argmax(-1)
    by_hand = (predicted == answers).float().mean().item()
    assert 0 < by_hand and results(out)["eval_token_accuracy"] == pytest.approx(by_hand, abs=1e-6)
    train = [r["token_accuracy"] for r in read_metrics(out) if "token_accuracy" in r]
    assert len(train) == 40 and train[-1] > train[0]


def test_quick_comparison_writes_the_report_the_json_and_the_plot(tmp_path):
    out = tmp_path / "grokking"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "grokking.py"), "--output_dir", str(out), "--quick"],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and "optimizer" not in line]
    names = ["adamw (weight decay 1)", "grokadamw (weight decay 1)", "grokadamw (weight decay 1, signal on)"]
    assert [row.split(" | ")[0].strip("| ") for row in table] == names
    record = json.loads((out / "results.json").read_text())
    summary, target = record["summary"], record["settings"]["target"]
    assert list(summary) == names
    for run in record["runs"]:  # the first logged step at the target, from the run's own curve (None: never)
        for curve, key in (("train", "steps_to_train_target"), ("validation", "steps_to_validation_target")):
            assert run[key] == next((step for step, accuracy in run["curves"][curve] if accuracy >= target), None)
    for name, numbers in summary.items():
        assert numbers["steps_to_train_target"] == [r["steps_to_train_target"] for r in record["runs"]
                                                    if r["setting"] == name]
    assert summary["adamw (weight decay 1)"]["steps_to_train_target"][0] is not None  # half the pairs: it fits them
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.endswith(report)


def test_the_committed_comparison_replots_from_its_results(tmp_path):
    """docs/grokking keeps report.md and results.json; --replot draws accuracy.png from them (no training)."""
    out = tmp_path / "grokking"
    out.mkdir()
    shutil.copy(REPO / "docs" / "grokking" / "results.json", out)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "grokking.py"), "--output_dir", str(out), "--replot"],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    with Image.open(out / "accuracy.png") as image:
        assert image.size[0] > 600 and image.size[1] > 300
    assert not (out / "data").exists()  # nothing was trained


def test_grokadamw_moments_are_torchs_optimizer_state():
    """grokadamw 0.1.2 keeps its moments outside `Optimizer.state`: torch's distributed checkpointing (FSDP2) then
    "initializes" the state with a zero-gradient step at each save, which decays the moments. The fix keeps them in
    `Optimizer.state`, where that step is skipped and state_dict() holds them by parameter index."""
    from grokadamw import GrokAdamW
    from optimizer_recipes.grokadamw import grokadamw_with_checkpointable_state
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    def after_a_step_and_a_checkpoint_init(optimizer_class):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 3))
        optimizer = optimizer_class([weight], lr=1e-2)
        weight.grad = torch.randn(4, 3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moment = next(iter(optimizer.param_groups[0]["state"].values()))["exp_avg"].clone()
        _init_optim_state(optimizer)  # what get_optimizer_state_dict runs before saving
        return optimizer, moment, next(iter(optimizer.param_groups[0]["state"].values()))["exp_avg"]

    upstream, before, after = after_a_step_and_a_checkpoint_init(GrokAdamW)
    assert not upstream.state and not torch.equal(before, after)  # upstream: decayed by a step nobody took
    fixed, before, after = after_a_step_and_a_checkpoint_init(grokadamw_with_checkpointable_state())
    assert torch.equal(before, after) and fixed.state[fixed.param_groups[0]["params"][0]]["step"] == 1
    saved = fixed.state_dict()
    assert torch.equal(saved["state"][0]["exp_avg"], before) and "state" not in saved["param_groups"][0]
