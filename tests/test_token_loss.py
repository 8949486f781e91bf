"""The loss: one mean over each step's trained tokens however the batch is split, and logits never whole.

Answers of one word or of 24-40 words make the split visible: with a mean per micro-batch (what `outputs.loss` is),
a one-word answer weighs as much as a forty-word one, and batch 4, batch 1 x 4 accumulated and 2 processes x 2 end
in different weights (measured before this loss: 0.90 and 0.35 of what training moved them).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from optimizer_recipes.core.run.token_loss import ChunkedLoss, FullLogitsLoss
from transformers import AutoModelForCausalLM

from tests.conftest import (
    REAL_MODEL_BLOCK,
    assert_same_weights,
    assert_shared_launch_ran,
    read_metrics,
    results,
    run_here,
    train_losses,
    two_process_run,
)

# 8 steps of 4 rows at a constant lr, one example per row
FLAGS = ["--max_steps", "8", "--logging_steps", "1", "--lr_scheduler_type", "constant", "--packing", "false",
         "--save_steps", "0"]


def token_mean_flags(data: dict, per_device: int, accumulation: int = 1) -> list[str]:
    return ["--dataset_name", str(data["uneven_chat"]), *FLAGS, "--per_device_train_batch_size", str(per_device),
            "--gradient_accumulation_steps", str(accumulation)]


# The 2-process runs, made in their config file's shared launch (tests/conftest.py): a step of 4 rows split over
# 2 processes x 2 (DDP) and over 2 processes x 1 x 2 accumulated (ZeRO-2); LOMO and AdaLomo over 2 processes x 2.
two_process_run("multi_gpu.yaml", "token-mean-adamw", "adamw", lambda data: token_mean_flags(data, 2))
two_process_run("zero2.yaml", "token-mean-adamw", "adamw", lambda data: token_mean_flags(data, 1, accumulation=2))
for _fused in ("lomo", "adalomo"):
    two_process_run("multi_gpu.yaml", f"token-mean-{_fused}", _fused, lambda data: token_mean_flags(data, 2))


def two_processes(runs: dict, name: str):
    assert_shared_launch_ran(runs)
    out = runs[name][0]
    assert yaml.safe_load((out / "run_config.yaml").read_text())["num_processes"] == 2
    return out


def test_adamw_ends_with_the_same_weights_however_a_step_is_split(shared_data, two_process_runs, tmp_path):
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    run_here("adamw", *token_mean_flags(shared_data, 4), "--output_dir", str(whole))
    run_here("adamw", *token_mean_flags(shared_data, 1, accumulation=4), "--output_dir", str(accumulated))
    ddp = two_processes(two_process_runs("multi_gpu.yaml"), "token-mean-adamw")
    zero2 = two_processes(two_process_runs("zero2.yaml"), "token-mean-adamw")

    train = yaml.safe_load((whole / "run_config.yaml").read_text())["data_summary"]["splits"]["train"]
    assert 0.1 < train["trained_tokens"] / train["tokens"] < 0.9  # answers only: the prompts are in, not trained
    for other in (accumulated, ddp, zero2):
        assert_same_weights(other, whole)
        # the logged loss is the same token mean, step by step
        assert train_losses(other) == pytest.approx(train_losses(whole), rel=1e-5)


@pytest.mark.parametrize("recipe", ["lomo", "adalomo"])
def test_fused_updates_use_the_same_token_mean_across_processes(recipe, shared_data, two_process_runs, tmp_path):
    one = tmp_path / "one"
    run_here(recipe, *token_mean_flags(shared_data, 4), "--output_dir", str(one))
    ddp = two_processes(two_process_runs("multi_gpu.yaml"), f"token-mean-{recipe}")
    assert_same_weights(ddp, one)
    assert train_losses(ddp) == pytest.approx(train_losses(one), rel=1e-5)


def _losses_and_gradients(model, loss_fn, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    rows = loss_fn(model, batch)
    rows.loss_sums.sum().backward()
    return rows, torch.cat([p.grad.flatten() for p in model.parameters()])


def uneven_batch(vocab_size: int) -> dict:
    ids = torch.randint(0, vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :70] = -100  # a prompt, then the answer
    labels[1, 150:] = -100  # an answer, then padding
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("model_kind", ["embedded", "real"])
def test_chunked_loss_and_gradients_equal_the_whole_logits(model_kind, request, tmp_path):
    if model_kind == "real":
        model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue("real_model"))
        assert model.config.tie_word_embeddings  # the output layer's weight is the input embedding
    else:
        from optimizer_recipes.core.data.embedded import write_scaled_model

        model = AutoModelForCausalLM.from_pretrained(write_scaled_model(tmp_path / "embedded"))
    model.train()
    batch = uneven_batch(model.config.vocab_size)
    whole, whole_grads = _losses_and_gradients(model, FullLogitsLoss(), batch)
    chunked = ChunkedLoss(model, chunk_logits=64 * model.config.vocab_size)  # 64 positions a chunk: 5 chunks
    parts, parts_grads = _losses_and_gradients(model, chunked, batch)

    assert torch.equal(parts.trained, whole.trained) and parts.trained.tolist() == [130, 149]
    assert torch.equal(parts.correct, whole.correct)
    assert parts.loss_sums.detach() == pytest.approx(whole.loss_sums.detach(), rel=1e-6)
    assert (parts_grads - whole_grads).norm() <= 1e-6 * whole_grads.norm()
    # outside a loss computation the output layer is the plain layer again (generation, saving)
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"][:, :8]).logits
    assert plain.shape == (2, 8, model.config.vocab_size)


def test_chunked_loss_drops_the_step_peak_by_the_logits(real_model_runs):
    chunked, whole = (json.loads((real_model_runs[k] / "memory_profile.json").read_text()) for k in ("chunked",
                                                                                                   "whole"))
    logits = (REAL_MODEL_BLOCK - 1) * 49_152 * 4  # one row's fp32 logits of the trained positions
    assert whole["peak_bytes"] - chunked["peak_bytes"] >= logits
    # the same training either way
    assert train_losses(real_model_runs["chunked"]) == pytest.approx(train_losses(real_model_runs["whole"]), rel=1e-5)
    assert results(real_model_runs["chunked"])["eval_loss"] == pytest.approx(
        results(real_model_runs["whole"])["eval_loss"], rel=1e-6)


def test_the_runs_peak_is_reported_with_the_phase_that_set_it(real_model_runs):
    """Evaluating 8 rows (the default eval batch) of whole logits sets the run's peak; chunked, it does not."""
    for kind, run in real_model_runs.items():
        final = results(run)
        assert final["run_peak_phase"] in ("loading", "training", "evaluation", "saving")
        assert final["run_peak_rss_gib"] >= max(r.get("peak_rss_gib", 0) for r in read_metrics(run))
    assert results(real_model_runs["whole"])["run_peak_phase"] == "evaluation"
    assert results(real_model_runs["chunked"])["run_peak_phase"] != "evaluation"
    assert results(real_model_runs["chunked"])["run_peak_rss_gib"] < results(real_model_runs["whole"])[
        "run_peak_rss_gib"]
    assert read_metrics(real_model_runs["chunked"])[-1]["run_peak_phase"] == results(real_model_runs["chunked"])[
        "run_peak_phase"]  # the last log line says it too


def test_chunked_loss_under_bf16_mixed_precision_matches_the_whole_logits(tmp_path):
    """Under autocast (--bf16 true) the chunks' backward recomputes the logits in bf16, as the forward made them."""
    from optimizer_recipes.core.data.embedded import write_scaled_model

    model = AutoModelForCausalLM.from_pretrained(write_scaled_model(tmp_path / "embedded")).train()
    batch = uneven_batch(model.config.vocab_size)

    def under_autocast(loss_fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _losses_and_gradients(model, loss_fn, batch)

    whole, whole_grads = under_autocast(FullLogitsLoss())
    parts, parts_grads = under_autocast(ChunkedLoss(model, chunk_logits=64 * model.config.vocab_size))
    assert parts.loss_sums.detach() == pytest.approx(whole.loss_sums.detach(), rel=1e-5)
    assert (parts_grads - whole_grads).norm() <= 1e-2 * whole_grads.norm()  # bf16 products, summed in other orders


def test_chunked_loss_with_16_bit_weights_is_as_close_to_fp32_as_the_whole_logits(tmp_path):
    """bf16 weights (--dtype bfloat16, no autocast): the chunks' output-layer gradients are summed in fp32 and
    rounded once, so they are as close to the fp32 gradient as autograd's single product (summed in bf16, 63 chunks
    were twice as far)."""
    from optimizer_recipes.core.data.embedded import write_scaled_model

    folder = write_scaled_model(tmp_path / "embedded")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).train()
    ids = torch.randint(0, model.config.vocab_size, (64, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}

    def head_gradient(model, loss_fn):
        model.zero_grad()
        loss_fn(model, batch).loss_sums.sum().backward()
        return model.get_output_embeddings().weight.grad

    exact = head_gradient(reference, FullLogitsLoss())
    whole = head_gradient(model, FullLogitsLoss())
    parts = head_gradient(model, ChunkedLoss(model, chunk_logits=64 * model.config.vocab_size))  # 63 chunks
    assert parts.dtype == whole.dtype == torch.bfloat16
    assert (parts.float() - exact).norm() <= 1.25 * (whole.float() - exact).norm()
