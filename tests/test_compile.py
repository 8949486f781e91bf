"""--torch_compile and --attn_implementation: the refusals that need a changed machine (no compiler, an accelerate
config that compiles too, a model class without the attention), and compiled runs against eager ones."""

from __future__ import annotations

import pytest
import yaml
from optimizer_recipes.adamw import RECIPE as ADAMW
from optimizer_recipes.core.models.attention import model_problem
from optimizer_recipes.core.run import torch_compile
from optimizer_recipes.core.run.config import ConfigError, parse_config

from tests.conftest import assert_same_weights, launch, launch_in_turn, results, run_flags, shared_output, train_losses
from tests.run_in_turn import outputs_of_each_run


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"--torch_compile on a CPU needs a C\+\+ compiler .* install one "
                                          r"\(e.g. apt install g\+\+\) or drop --torch_compile"):
        raise ConfigError(torch_compile.problem(parse_config(ADAMW, ["--torch_compile", "true"])))
    assert torch_compile.problem(parse_config(ADAMW, [])) is None  # not compiling: no compiler needed


def test_an_accelerate_config_that_compiles_the_whole_model_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # what `dynamo_config` in a config file sets
    with pytest.raises(ConfigError, match="the accelerate config sets dynamo_backend INDUCTOR, which would compile "
                                          "the whole model around the chunked loss; remove dynamo_config from the "
                                          "config file and pass --torch_compile true"):
        raise ConfigError(torch_compile.problem(parse_config(ADAMW, [])))


def test_a_compile_mode_turns_compiling_on_as_in_training_arguments():
    assert not parse_config(ADAMW, []).train.torch_compile
    assert parse_config(ADAMW, ["--torch_compile_mode", "max-autotune"]).train.torch_compile


def test_an_attention_the_model_class_lacks_is_named_with_the_ones_it_has():
    class OnlyEager:
        _supports_sdpa = False
        _supports_flash_attn = False
        _supports_flex_attn = False

    class WithSdpa(OnlyEager):
        _supports_sdpa = True

    config = parse_config(ADAMW, ["--attn_implementation", "sdpa"])
    assert model_problem(config, OnlyEager) == ("--attn_implementation sdpa: OnlyEager does not support it; it "
                                                "supports eager")
    assert model_problem(config, WithSdpa) is None
    assert model_problem(config, None) is None  # remote code: transformers decides while loading
    assert model_problem(parse_config(ADAMW, ["--attn_implementation", "eager"]), OnlyEager) is None


def test_compiling_under_zero3_is_refused_with_the_configs_that_compile(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match=r"--torch_compile under DeepSpeed ZeRO-3 would mostly run eager: .* compile "
                                          r"with accelerate_configs/zero2.yaml, fsdp2.yaml"):
        raise ConfigError(torch_compile.problem(parse_config(ADAMW, ["--torch_compile", "true"])))


# One recipe of each family, each under a setup it compiles in, against the same eager 1-process run (global batch
# 32): a plain optimizer step (adamw; under FSDP2 too, which gathers each block's shards around its compiled
# forward); schedule-free's train/eval modes, here with gradient checkpointing recomputing through the compiled
# blocks; LOMO's fused update in gradient hooks outside the graph, beside DDP's; GrokAdamW's gradient EMA; GaLore's
# SVD of each compiled block's gradients (the low-rank family: apollo, apollo_mini); 8-bit AdamW's quantized state.
# The one-process runs share one launch (tests/run_in_turn.py): inductor compiles the blocks' graph once for them.
ONE_PROCESS = [("adamw", ()), ("schedule_free_adamw", ("--gradient_checkpointing", "true")), ("grokadamw", ()),
               ("galore", ()), ("adamw_8bit", ())]
TWO_PROCESSES = [("lomo", "multi_gpu.yaml"), ("adamw", "fsdp2.yaml")]


@pytest.fixture(scope="module")
def compiled_in_turn(tmp_path_factory):
    def produce(out):
        launch_in_turn("cpu.yaml", [{"recipe": recipe, "args": [*run_flags(recipe), "--torch_compile", "true", *flags,
                                                                "--output_dir", str(out / recipe)]}
                                    for recipe, flags in ONE_PROCESS], out / "launch.log")

    return shared_output(tmp_path_factory, "compiled-one-process", produce)


@pytest.mark.parametrize("recipe, flags", ONE_PROCESS)
def test_a_compiled_run_trains_as_the_eager_one(recipe, flags, compiled_in_turn, one_process_runs):
    log = (compiled_in_turn / "launch.log").read_text()
    assert log.splitlines()[1] == "exit 0", log[-6000:]
    index = [r for r, _ in ONE_PROCESS].index(recipe)
    stdout, stderr = log.split("\n--- stderr\n")
    assert_trains_as_the_eager_one(compiled_in_turn / recipe, outputs_of_each_run(stdout)[index],
                                   outputs_of_each_run(stderr)[index], one_process_runs(recipe), processes=1)


@pytest.mark.parametrize("recipe, config", TWO_PROCESSES)
def test_a_compiled_two_process_run_trains_as_the_eager_one(recipe, config, tmp_path, one_process_runs):
    out = tmp_path / "compiled"
    proc = launch(recipe, *run_flags(recipe, 2), "--torch_compile", "true", "--output_dir", str(out), config=config,
                  env={"ACCELERATE_USE_CPU": "1"})
    assert_trains_as_the_eager_one(out, proc.stdout, proc.stderr, one_process_runs(recipe), processes=2)


def assert_trains_as_the_eager_one(out, stdout: str, stderr: str, reference, processes: int) -> None:
    assert "compile: 2 LlamaDecoderLayer blocks with torch.compile" in stdout
    assert "recompile_limit" not in stderr  # no frame fell back to eager
    done = results(out)
    assert done["num_processes"] == processes
    assert done["compiled_graphs"] >= 2  # at least a training and an evaluation graph were built and ran
    # compiled kernels fuse and reorder float operations: equal up to rounding (measured: the same to 5 digits)
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=1e-4)
    assert done["eval_loss"] == pytest.approx(results(reference)["eval_loss"], rel=1e-4)
    assert_same_weights(out, reference)  # every parameter updated, once per step (LOMO's hooks included)


def test_the_attention_flag_reaches_the_model(tmp_path):
    from tests.conftest import run_here

    for flags, expected in (([], "sdpa"), (["--attn_implementation", "eager"], "eager")):
        out = tmp_path / expected
        proc = run_here("adamw", "--max_steps", "1", *flags, "--output_dir", str(out))
        assert f"\nattention: {expected}\n" in proc.stdout
        assert yaml.safe_load((out / "run_config.yaml").read_text())["attention"] == expected  # the loaded model's
