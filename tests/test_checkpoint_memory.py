"""Writing a checkpoint, resuming from it and the final save add no copy of the weights to the run's peak: measured
per phase (results.json) on a 0.54B-parameter random model in bf16, whose 1 GiB of weights dwarf the rest."""

from __future__ import annotations

import json

import pytest
from optimizer_recipes.core.data.embedded import train_documents
from optimizer_recipes.core.memory.check import GIB, PROCESS_BASELINE
from optimizer_recipes.measure.make_model import write_model

from tests.conftest import REPO, launch, results, shared_output

MID_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=16)
# what a phase may hold beyond the weights and what another phase held: a tenth of the weights, not a copy of them
NOT_A_COPY = 0.15


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def produce(out):
        shape = json.loads((REPO / "launch" / "shapes" / "llama-7b.json").read_text()) | MID_SHAPE
        (out / "shape.json").write_text(json.dumps(shape))
        made = write_model(str(out / "shape.json"), out / "model")
        (out / "text.txt").write_text("".join(doc + "\n" for doc in train_documents()[:40]))
        args = ["--model_name_or_path", str(out / "model"), "--dtype", "bfloat16", "--dataset_name",
                str(out / "text.txt"), "--block_size", "32", "--per_device_train_batch_size", "1",
                "--save_steps", "1", "--output_dir", str(out / "run")]
        launch("lomo", *args, "--max_steps", "1", timeout=600)
        (out / "fresh.json").write_text(json.dumps(results(out / "run")))
        launch("lomo", *args, "--max_steps", "2", "--resume_from_checkpoint", "latest", timeout=600)
        (out / "made.json").write_text(json.dumps(made))
    out = shared_output(tmp_path_factory, "checkpoint-memory", produce)
    made = json.loads((out / "made.json").read_text())
    return {"fresh": json.loads((out / "fresh.json").read_text()), "resumed": results(out / "run"), "made": made,
            "weights_gib": made["weights_gib"]}


def test_the_model_is_written_without_a_second_copy(runs):
    """launch/make_model.py builds the model in bf16 and saves it sharded: its peak is the weights once."""
    made = runs["made"]
    assert made["peak_rss_gib"] <= PROCESS_BASELINE["cpu"] / GIB + (1 + NOT_A_COPY) * made["weights_gib"]


def test_resuming_reads_the_checkpoint_into_the_model_in_place(runs):
    """The resumed run's loading (the model, then the checkpoint's weights over it) holds the weights once: with
    accelerate's own load_state it held them twice (the whole file, then the model)."""
    loading = runs["resumed"]["phase_peak_loading_gib"]
    assert loading <= PROCESS_BASELINE["cpu"] / GIB + (1 + NOT_A_COPY) * runs["weights_gib"]


@pytest.mark.parametrize("run", ["fresh", "resumed"])
def test_checkpoint_and_final_save_add_no_copy(runs, run):
    peaks = runs[run]
    before_saving = max(peaks["phase_peak_loading_gib"], peaks["phase_peak_training_gib"])
    assert peaks["phase_peak_saving_gib"] <= before_saving + NOT_A_COPY * runs["weights_gib"]


def test_scale_run_reports_every_phase_of_a_fresh_and_a_resumed_run(tmp_path):
    """launch/scale_run.py (the 7B reproductions) on a tiny shape, with the memory savers in backward: both runs of
    each recipe measured (Adafactor stepped in backward beside LOMO, which always is), folders deleted after."""
    import subprocess
    import sys

    from tests.conftest import offline_env

    shape = json.loads((REPO / "launch" / "shapes" / "llama-7b.json").read_text()) | dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    (tmp_path / "tiny.json").write_text(json.dumps(shape))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "scale_run.py"), "--output_dir",
                           str(tmp_path / "report"), "--shape", str(tmp_path / "tiny.json"), "--work_dir", str(tmp_path / "work"), "--recipes",
                           "lomo,adafactor", "--optimizer_in_backward", "true", "--block_size", "64"], cwd=REPO, env=offline_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    for row in rows.values():
        for kind in ("fresh", "resumed"):
            assert all(row[kind]["phases_gib"][phase] > 0 for phase in ("loading", "training", "evaluation", "saving"))
            assert row[kind]["seconds_per_step"] > 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert all(f"| `{name}` | {kind} |" in table for name in ("lomo", "adafactor") for kind in ("fresh", "resumed"))
    assert "updates in backward" in table
    assert "updates: in backward, each parameter stepped" in (tmp_path / "work" / "adafactor-fresh.log").read_text()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "adafactor-fresh.log", "adafactor-resumed.log", "lomo-fresh.log", "lomo-resumed.log", "text.txt"]
