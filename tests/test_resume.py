"""Exact resume for every optimizer, atomic checkpoints, preemption by signal, and the non-finite-loss stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from optimizer_recipes.core.optimizers.protocol import all_recipes, recipe_names
from optimizer_recipes.core.run.loop import main
from safetensors.torch import load_file

from tests.conftest import (
    CONFIGS,
    REPO,
    assert_identical_weights,
    assert_shared_launch_ran,
    cpu_env,
    free_port,
    launch,
    offline_env,
    read_metrics,
    results,
    run_flags,
    run_here,
    shared_output,
    smoke,
    two_process_run,
)

FAULTS = str(Path(__file__).resolve().parent / "fault_injection")
RECIPES = {r.name: r for r in all_recipes()}


def losses_by_step(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


@pytest.mark.parametrize("recipe", smoke(recipe_names(), "adamw"))
def test_resume_is_bit_exact(recipe, tmp_path, one_process_runs):
    """The shared 1-process run (`run_flags`: 14 steps of 32 sequences, 9 an epoch, a checkpoint at step 7) against
    the same run resumed from its step-7 checkpoint: identical losses and final weights, across the epoch boundary
    and (GaLore, APOLLO) a refresh of the projection. 2-process runs resume in tests/test_distributed.py.

    CPU math here is deterministic, so equality is exact. Schedule-free saves at x (eval mode) and resumes with
    train(); both runs go through that same switch at step 7, so they stay bit-identical too.
    """
    straight, resumed = one_process_runs(recipe), tmp_path / "resumed"
    checkpoint = straight / "checkpoint-7"
    assert checkpoint.is_dir()
    # every file accelerate wrote loads with weights_only=True (no pickled objects)
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.load(checkpoint / name, weights_only=True)
    run_here(recipe, *run_flags(recipe), "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint))
    full, rest = losses_by_step(straight), losses_by_step(resumed)
    assert sorted(rest) == list(range(8, 15))
    assert [rest[s] for s in rest] == [full[s] for s in rest]
    assert_identical_weights(straight, resumed)


def test_adalomo_and_grokadamw_state_is_in_the_checkpoint(tmp_path):
    """The state upstream keeps outside state_dict is saved: AdaLomo's moments and step, GrokAdamW's moments."""
    for recipe in ("adalomo", "grokadamw"):
        out = tmp_path / recipe
        run_here(recipe, "--max_steps", "4", "--save_steps", "3", "--output_dir", str(out))
        state = torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=True)
        if recipe == "adalomo":
            assert state["second_moments"]["step_num"] == 3
            assert all(v.abs().sum() > 0 for v in state["second_moments"]["exp_avg_sq_row"].values())
        else:  # torch's optimizer state, by parameter index (recipes/grokadamw.py)
            moments = list(state["state"].values())
            assert moments and all(s["step"] == 3 and s["exp_avg"].abs().sum() > 0 for s in moments)


def start(recipe: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu.yaml"),
           str(REPO / "recipes" / f"{recipe}.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=offline_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_and_resume_works(tmp_path):
    out, straight = tmp_path / "out", tmp_path / "straight"
    args = ["--max_steps", "12", "--save_steps", "4", "--logging_steps", "1"]
    proc = start("adamw", *args, "--output_dir", str(out),
                 env={"PYTHONPATH": FAULTS, "INJECT_SLOW_SAVE": "2"})  # the save at step 8 hangs
    partial = out / ".checkpoint-8.partial"
    wait_for(lambda: (partial / ".save-in-progress").exists())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint-8").exists()
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()

    resumed = run_here("adamw", *args, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert f"resuming at step 4 from {out / 'checkpoint-4'}" in resumed.stdout
    run_here("adamw", *args, "--output_dir", str(straight))
    assert losses_by_step(out)[12] == losses_by_step(straight)[12]
    assert_identical_weights(out, straight)
    # the resumed run wrote step 8 afresh: the killed save's partial folder is gone, its marker never promoted
    assert (out / "checkpoint-8" / "trainer_state.json").is_file() and not partial.exists()
    assert not (out / "checkpoint-8" / ".save-in-progress").exists()


PREEMPTED_RUN = ["--max_steps", "200", "--logging_steps", "1", "--save_steps", "0"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    return shared_output(tmp_path_factory, "adamw-200-steps", lambda out: run_here(
        "adamw", *PREEMPTED_RUN, "--output_dir", str(out)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_exits_zero_and_resume_matches_an_uninterrupted_run(sig, tmp_path,
                                                                                          uninterrupted_run):
    """SIGTERM (preemption) or SIGUSR1 (SLURM's warning before the time limit)."""
    out, straight = tmp_path / "out", uninterrupted_run
    args = PREEMPTED_RUN
    proc = start("adamw", *args, "--output_dir", str(out))
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3)
    recipe_process = next(c for c in psutil.Process(proc.pid).children(recursive=True) if "adamw.py" in " ".join(c.cmdline()))
    recipe_process.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"{sig.name} received: saved" in stdout and "--resume_from_checkpoint latest" in stdout
    assert not (out / "model.safetensors").exists()  # not finished: only the checkpoint
    stopped_at = max(losses_by_step(out))
    assert (out / f"checkpoint-{stopped_at}").is_dir() and stopped_at < 200

    run_here("adamw", *args, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert losses_by_step(out)[200] == losses_by_step(straight)[200]
    assert results(out)["eval_loss"] == results(straight)["eval_loss"]


two_process_run("multi_gpu.yaml", "adamw", "adamw", lambda data: run_flags("adamw", 2))  # test_distributed's cell


def test_ctrl_c_under_a_two_process_launch_checkpoints_exits_130_and_resumes_exactly(tmp_path, two_process_runs):
    """Ctrl-C in a terminal: SIGINT to the launcher and both ranks (the foreground process group). Every rank stops
    after the same step, one checkpoint, the resume command, exit 130; resumed in a new 2-process launch, the run
    ends with the weights of the uninterrupted one (the shared 2-process adamw run)."""
    config, out, slow = "multi_gpu.yaml", tmp_path / "out", tmp_path / "slow"
    args = [*run_flags("adamw", 2), "--save_steps", "0", "--output_dir", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
         "--main_process_port", str(free_port()), str(REPO / "recipes" / "adamw.py"), *args],
        cwd=REPO, env=offline_env(**cpu_env(config), PYTHONPATH=FAULTS, INJECT_SLOW_STEPS=str(slow)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(slow.exists)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    saved = [line for line in stdout.splitlines() if "SIGINT received: saved" in line]
    assert len(saved) == 1 and "--resume_from_checkpoint latest" in saved[0], stdout[-3000:]
    assert "Traceback" not in stderr.split("SIGINT")[0], stderr[-3000:]
    (checkpoint,) = list(out.glob("checkpoint-*"))
    assert 1 <= int(checkpoint.name.split("-")[1]) < 14 and not (out / "model.safetensors").exists()

    launch("adamw", *args, "--resume_from_checkpoint", "latest", config=config, env=cpu_env(config))
    runs = two_process_runs(config)
    assert_shared_launch_ran(runs)
    straight = runs["adamw"][0]
    assert results(out)["num_processes"] == 2
    assert losses_by_step(out)[14] == losses_by_step(straight)[14]
    assert_identical_weights(out, straight)


def signal_while_loading(out: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python recipes/adamw.py ...` sent SIGTERM while it loads its model (slowed down to a minute)."""
    loading = tmp_path / "loading"
    cmd = [sys.executable, str(REPO / "recipes" / "adamw.py"), *args, "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=offline_env(PYTHONPATH=FAULTS, INJECT_SLOW_MODEL_LOAD=str(loading)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(loading.exists)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - started < 30  # at once, not after the minute of loading
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_signal_before_the_first_step_stops_at_once_and_leaves_no_run(tmp_path):
    out = tmp_path / "out"
    proc = signal_while_loading(out, tmp_path, "--max_steps", "4")
    assert proc.returncode == 128 + signal.SIGTERM
    assert proc.stderr.strip().splitlines()[-1] == (
        "adamw: SIGTERM received before the first step: nothing to save, stopped (nothing written to --output_dir); "
        "rerun the same command to start")
    assert not out.exists()


def test_signal_while_a_resume_loads_keeps_the_run_as_it_was(tmp_path):
    out = tmp_path / "out"
    run_here("adamw", "--max_steps", "2", "--save_steps", "2", "--output_dir", str(out))
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = signal_while_loading(out, tmp_path, "--max_steps", "4", "--resume_from_checkpoint", "latest")
    assert proc.returncode == 128 + signal.SIGTERM and "before the first step" in proc.stderr
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before  # not a file touched


def test_nonfinite_loss_stops_with_the_step_and_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    proc = launch("adamw", "--max_steps", "20", "--save_steps", "3", "--logging_steps", "1", "--output_dir", str(out),
                  env={"PYTHONPATH": FAULTS, "INJECT_NAN_AT_STEP": "5"}, check=False)
    assert proc.returncode != 0
    assert (f"adamw: stopped: the loss became non-finite at step 5; stopped without saving. the last good checkpoint "
            f"is {out / 'checkpoint-3'}: resume from it") in proc.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    assert not (out / "model.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-3" / "model.safetensors").values())


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    """adamw, 4 steps, checkpoints at 2 and 4: made once, copied by the tests that change it."""
    return shared_output(tmp_path_factory, "adamw-4-steps", lambda out: run_here(
        "adamw", "--max_steps", "4", "--save_steps", "2", "--output_dir", str(out)))


def start_up_error(recipe: str, args: list[str], capsys) -> str:
    """The one-line error of a run refused at start-up, run in-process through the recipe's own `main`."""
    with pytest.raises(SystemExit) as stopped:
        main(RECIPES[recipe], args)
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and "parameters" not in captured.out  # refused before any model loaded
    errors = [line for line in captured.err.splitlines() if line.startswith(f"{recipe}: error:")]
    assert len(errors) == 1, captured.err[-3000:]
    return errors[0]


@pytest.mark.parametrize("change, expected", [
    (["--max_steps", "4"], "holds checkpoints of an earlier run; resume it with --resume_from_checkpoint latest"),
    (["--max_steps", "4", "--resume_from_checkpoint", "latest", "--per_device_train_batch_size", "4"],
     "it was written with per_device_train_batch_size=8, this run has per_device_train_batch_size=4"),
])
def test_resume_that_cannot_be_exact_is_refused(change, expected, four_step_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_step_run, run)
    (run / "model.safetensors").unlink()  # as if the run had been preempted after its checkpoints
    assert expected in start_up_error("adamw", [*change, "--output_dir", str(run)], capsys)


def test_resume_with_another_optimizer_is_refused(four_step_run, tmp_path, capsys):
    error = start_up_error("lomo", ["--max_steps", "4", "--output_dir", str(tmp_path / "other"),
                                    "--resume_from_checkpoint", str(four_step_run / "checkpoint-2")], capsys)
    assert "it was written with recipe='adamw', this run has recipe='lomo'" in error


def test_latest_with_no_checkpoint_is_refused(tmp_path, capsys):
    error = start_up_error("adamw", ["--resume_from_checkpoint", "latest", "--output_dir", str(tmp_path / "empty")],
                           capsys)
    assert "--resume_from_checkpoint latest: no checkpoint in" in error


def test_auto_starts_fresh_without_a_checkpoint_and_resumes_the_newest_with_one(tmp_path):
    """One command for a job that may be requeued: `--resume_from_checkpoint auto`."""
    run = ["--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--resume_from_checkpoint", "auto"]
    first, requeued = tmp_path / "first", tmp_path / "requeued"
    proc = run_here("adamw", *run, "--output_dir", str(first))
    assert "resuming" not in proc.stdout and sorted(losses_by_step(first)) == list(range(1, 7))
    requeued.mkdir()  # a job preempted after its step-3 checkpoint, then requeued with the same command
    shutil.copytree(first / "checkpoint-3", requeued / "checkpoint-3")
    proc = run_here("adamw", *run, "--output_dir", str(requeued))
    assert f"resuming at step 3 from {requeued / 'checkpoint-3'}" in proc.stdout
    full, rest = losses_by_step(first), losses_by_step(requeued)
    assert sorted(rest) == [4, 5, 6] and [rest[s] for s in rest] == [full[s] for s in rest]
    assert_identical_weights(first, requeued)


def test_save_total_limit_keeps_the_newest(tmp_path):
    out = tmp_path / "out"
    run_here("adamw", "--max_steps", "9", "--save_steps", "2", "--save_total_limit", "2", "--output_dir", str(out))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-8", "checkpoint-9"]


def test_a_finished_run_continues_to_more_steps_with_its_schedule_recomputed(tmp_path):
    """--save_steps also checkpoints the last step, so a finished run can be continued to a larger --max_steps in
    the same output_dir (its model is in that checkpoint, so nothing is lost). The linear schedule is recomputed for
    the new total, the first continued step included: its lr is 1e-3 * (10 - 6) / 10, not the old schedule's 0."""
    out = tmp_path / "out"
    run_here("adamw", "--max_steps", "6", "--save_steps", "4", "--logging_steps", "1", "--output_dir", str(out))
    assert (out / "checkpoint-6").is_dir() and (out / "checkpoint-4").is_dir()
    proc = run_here("adamw", "--max_steps", "10", "--save_steps", "1", "--logging_steps", "1", "--output_dir",
                    str(out), "--resume_from_checkpoint", "latest")
    assert ("the checkpoint's run planned 6 steps, this one 10: the linear LR schedule is recomputed for 10 steps "
            "(the lr at step 7 is 0.0004, was 0)") in proc.stdout
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    assert [lrs[s] for s in range(7, 11)] == pytest.approx([4e-4, 3e-4, 2e-4, 1e-4])
    before, after = (load_file(out / f"checkpoint-{step}" / "model.safetensors") for step in (6, 7))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # step 7 trained at its new lr
    assert results(out)["step"] == 10 and (out / "checkpoint-10").is_dir()


def test_a_checkpoint_loads_with_from_pretrained_and_generates(four_step_run):
    """checkpoint-N holds the config, generation config and tokenizer beside its weights, as the Trainer's do: it
    loads and generates as a model folder, with the weights the checkpoint resumes from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = four_step_run / "checkpoint-2"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(saved[k], model.state_dict()[k]) for k in saved)
    prompt = tokenizer("the old king", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4 and tokenizer.decode(generated[0]).strip()
