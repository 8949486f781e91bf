"""Model, tokenizer and data sources: resolved before anything heavy loads (one line for each problem), then loaded.

A model source is the embedded default (no flag), a local folder or hub id (`from_pretrained`), or a local GGUF
file (`recipes/core/models/gguf_source.py`: dequantized to --dtype, its tokenizer and chat template from the file).
The commonest first-run mistakes (a mistyped local folder, a hub id that is not in the cache of an offline node, a
data set configuration that does not exist, a file that is not GGUF) otherwise end in chained tracebacks after the
data was tokenized. Resolving costs a config file, a GGUF header or a data set's metadata, never weights or data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from optimizer_recipes.core.data import embedded

from optimizer_recipes.core.models import gguf_source
from optimizer_recipes.core.data.chat_masks import use_chat_template_file
from optimizer_recipes.core.run.config import Config, ConfigError, data_file_builder
from optimizer_recipes.core.data.files import check_data_files
from optimizer_recipes.core.run.launch_setup import LaunchSetup

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def check_sources(config: Config) -> None:
    m, d = config.model, config.data
    if gguf_source.is_gguf(m.model_name_or_path):
        gguf_source.check_file("--model_name_or_path", m.model_name_or_path)
        setup = LaunchSetup.from_environment()
        if setup.kind == "deepspeed" and setup.zero_stage == 3:
            raise ConfigError(f"--model_name_or_path {m.model_name_or_path}: a GGUF file under {setup.describe()} is "
                              "not supported: ZeRO-3 partitions the model as it is built, and every process would "
                              "dequantize the whole file; convert it once with python launch/import_gguf.py "
                              f"{m.model_name_or_path} OUT and pass --model_name_or_path OUT")
    elif m.model_name_or_path:
        _check_model_files("--model_name_or_path", m.model_name_or_path, ("config.json",), m.trust_remote_code)
    if gguf_source.is_gguf(m.tokenizer_name):
        gguf_source.check_file("--tokenizer_name", m.tokenizer_name)
    elif m.tokenizer_name:
        _check_model_files("--tokenizer_name", m.tokenizer_name, ("tokenizer_config.json", "tokenizer.json"),
                           m.trust_remote_code)
    local = d.dataset_name and Path(d.dataset_name).expanduser().exists()
    if local:  # every line of a local file or folder read once: one line for the first problem
        check_data_files(d.dataset_name)
    if d.dataset_name and data_file_builder(d.dataset_name) is None:
        _check_dataset(d.dataset_name, d.dataset_config_name)


def offline_variable() -> str | None:
    """The environment variable that keeps the Hub from being asked, if one is set."""
    return next((name for name in _OFFLINE if os.environ.get(name, "").lower() in ("1", "true", "yes", "on")), None)


def _looks_local(value: str) -> bool:
    """A path, not a hub id ('org/name' or 'name'): starts like a path, or has more than one '/'."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or os.sep in value.replace("/", "")


def _check_model_files(flag: str, value: str, any_of: tuple[str, ...], trust_remote_code: bool) -> None:
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in any_of):
            have = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise ConfigError(f"{flag} {value}: the folder has no {' or '.join(any_of)} (it has {have}); give a "
                              "folder written by save_pretrained, or a hub id")
        return
    if path.exists() or _looks_local(value):
        raise ConfigError(f"{flag} {value}: no such folder ({path.resolve()} does not exist); check the path, or give "
                          "a hub id such as Qwen/Qwen2.5-0.5B")
    try:
        if flag == "--tokenizer_name":
            AutoTokenizer.from_pretrained(value, trust_remote_code=trust_remote_code)
        else:
            AutoConfig.from_pretrained(value, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(_hub_message(flag, value, error, "hf download " + value)) from None


def _check_dataset(name: str, config_name: str | None) -> None:
    from datasets import load_dataset_builder

    path = Path(name).expanduser()
    if not path.exists() and _looks_local(name):
        raise ConfigError(f"--dataset_name {name}: no such file or folder ({path.resolve()} does not exist); check "
                          "the path, or give a hub id")
    try:
        builder = load_dataset_builder(name, config_name)
    except ValueError as error:  # e.g. "BuilderConfig 'x' not found. Available: [...]"
        first = str(error).splitlines()[0]
        raise ConfigError(f"--dataset_config_name {config_name}: --dataset_name {name} has no such configuration "
                          f"({first}); pass one of those, or drop the flag") from None
    except (OSError, ConnectionError, FileNotFoundError) as error:
        raise ConfigError(_hub_message("--dataset_name", name, error, f"hf download {name} --repo-type dataset")) \
            from None
    del builder


def _hub_message(flag: str, value: str, error: Exception, download: str) -> str:
    offline = offline_variable()
    if offline:
        return (f"{flag} {value}: not in the local Hugging Face cache, and {offline} is set so the Hub is not asked; "
                f"fetch it where there is internet (`{download}`, same HF_HOME), or give a local path")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{flag} {value}: could not be loaded ({first}); check the id on huggingface.co (a private or gated "
            "repo needs `hf auth login`), or give a local path")


def load_tokenizer(config: Config):
    """The model's tokenizer (or --tokenizer_name's), with --chat_template's template if given."""
    m = config.model
    source = m.tokenizer_name or m.model_name_or_path or str(embedded.EMBEDDED_DIR)
    if gguf_source.is_gguf(source):
        tokenizer = gguf_source.load_tokenizer(source)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=m.trust_remote_code)
    use_chat_template_file(tokenizer, config.data.chat_template)
    return tokenizer


def load_model_config(config: Config):
    m = config.model
    if gguf_source.is_gguf(m.model_name_or_path):
        return gguf_source.load_config(m.model_name_or_path)
    return AutoConfig.from_pretrained(m.model_name_or_path or str(embedded.EMBEDDED_DIR),
                                      trust_remote_code=m.trust_remote_code)


def model_class(model_config):
    """The causal-LM class transformers builds for this config, or None (remote code, an unknown type)."""
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)] if type(model_config) in MODEL_FOR_CAUSAL_LM_MAPPING else None


def load_model(config: Config, model_config):
    m = config.model
    dtype = DTYPES[m.dtype]
    if m.model_name_or_path is None:  # the embedded default: a fresh tiny Llama, seeded
        # Built from its class, not from_config: outside DeepSpeed's zero.Init, so the same init under every setup;
        # initialised in fp32, then in --dtype (the same weights as a pretrained checkpoint loaded in it)
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)](model_config)
        return model if dtype == "auto" else model.to(dtype)
    if gguf_source.is_gguf(m.model_name_or_path):
        return gguf_source.load_model(m.model_name_or_path, torch.float32 if dtype == "auto" else dtype)
    return AutoModelForCausalLM.from_pretrained(m.model_name_or_path, dtype=dtype,
                                                trust_remote_code=m.trust_remote_code)
