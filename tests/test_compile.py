"""--torch_compile and --attn_implementation: the refusals that need a changed machine (no compiler, an accelerate
config that compiles too, a model class without the attention), and compiled runs against eager ones."""

from __future__ import annotations

import pytest
import yaml

from recipes.adamw import RECIPE as ADAMW
from recipes.core import torch_compile
from recipes.core.attention import model_problem
from recipes.core.config import ConfigError, parse_config
from tests.conftest import STEPS, assert_same_weights, launch, results, train_losses


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
# 8): a plain optimizer step (adamw; under FSDP2 too, which gathers each block's shards around its compiled
# forward); schedule-free's train/eval modes, here with gradient checkpointing recomputing through the compiled
# blocks; LOMO's fused update in gradient hooks outside the graph, beside DDP's; GrokAdamW's gradient EMA; GaLore's
# SVD of each compiled block's gradients (the low-rank family: apollo, apollo_mini); 8-bit AdamW's quantized state.
COMPILED = [("adamw", "cpu.yaml", ()), ("schedule_free_adamw", "cpu.yaml", ("--gradient_checkpointing", "true")),
            ("lomo", "multi_gpu.yaml", ()), ("adamw", "fsdp2.yaml", ()), ("grokadamw", "cpu.yaml", ()),
            ("galore", "cpu.yaml", ()), ("adamw_8bit", "cpu.yaml", ())]


@pytest.mark.parametrize("recipe, config, flags", COMPILED)
def test_a_compiled_run_trains_as_the_eager_one(recipe, config, flags, tmp_path, one_process_runs):
    processes = 1 if config == "cpu.yaml" else 2
    out = tmp_path / "compiled"
    proc = launch(recipe, *STEPS, "--per_device_train_batch_size", str(8 // processes), "--torch_compile", "true",
                  *flags, "--output_dir", str(out), config=config,
                  env={"ACCELERATE_USE_CPU": "1"} if processes > 1 else None)
    reference = one_process_runs(recipe)
    assert "compile: 2 LlamaDecoderLayer blocks with torch.compile" in proc.stdout
    assert "recompile_limit" not in proc.stderr  # no frame fell back to eager
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
