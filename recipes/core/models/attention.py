"""--attn_implementation: checked against this machine, the installed packages and the model's class before any
weight loads, then set on the loaded model (`PreTrainedModel.set_attn_implementation`, the same for every source).

Without the flag the model keeps what transformers picks (`sdpa` where the model supports it, else `eager`).
Transformers itself finds most of these problems only while loading the weights, or, for a flash kernel on a
CPU, at the first forward; here each is one line before anything loads.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Optional

import torch

from optimizer_recipes.core.models.sources import offline_variable

if TYPE_CHECKING:
    from optimizer_recipes.core.run.config import Config

BUILT_IN = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
# Packed rows keep their examples apart through position_ids; these attentions read them (the others would let
# the examples of one row attend to each other)
SEPARATES_PACKED_EXAMPLES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
# the package each flash attention comes from: (module, what to pip install)
FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
                  "flash_attention_4": ("flash_attn.cute", "flash-attn-cute")}
# what the model class must declare for each (transformers' `_supports_*` class attributes)
CLASS_SUPPORT = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn",
                 "flash_attention_2": "_supports_flash_attn", "flash_attention_3": "_supports_flash_attn",
                 "flash_attention_4": "_supports_flash_attn"}


def is_hub_kernel(name: str) -> bool:
    """A kernel repository on the Hub (`kernels-community/flash-attn2`, optionally `:function`)."""
    return "/" in name


def machine_problem(config: Config) -> Optional[str]:
    """Why this machine or its packages cannot run --attn_implementation, or None (read from the flags alone)."""
    name = config.model.attn_implementation
    if name is None:
        return None
    flag = f"--attn_implementation {name}"
    if not is_hub_kernel(name) and name not in BUILT_IN:
        return f"{flag} is not an attention implementation; use one of {', '.join(BUILT_IN)}, or a kernel " \
               "repository on the Hub (e.g. kernels-community/flash-attn2)"
    if is_hub_kernel(name) or name.startswith("flash_attention"):
        if not torch.cuda.is_available():
            return f"{flag} runs on a CUDA GPU, and this machine has none; use sdpa (the default) or eager"
    if is_hub_kernel(name):
        if importlib.util.find_spec("kernels") is None:
            return f"{flag} is loaded by the kernels package, which is not installed: pip install kernels"
        offline = offline_variable()
        if offline:
            return (f"{flag} is downloaded from the Hub, and {offline} is set; fetch it where there is internet "
                    f"(`hf download {name.split(':')[0]}`, same HF_HOME) or use sdpa")
    elif name in FLASH_PACKAGES:
        module, pip = FLASH_PACKAGES[name]
        if not _installed(module) and importlib.util.find_spec("kernels") is None:
            return (f"{flag} needs the {module} package (pip install {pip}) or the kernels package (pip install "
                    "kernels: transformers then takes a prebuilt kernel from the Hub)")
    if config.data.packing and name not in SEPARATES_PACKED_EXAMPLES:
        return packing_problem(name)
    return None


def model_problem(config: Config, model_class) -> Optional[str]:
    """Why the model's class does not support --attn_implementation, or None (`model_class`: None when unknown,
    e.g. remote code, where transformers' own check at load time decides)."""
    name = config.model.attn_implementation
    needs = CLASS_SUPPORT.get(name or "")
    if model_class is None or needs is None or getattr(model_class, needs, False):
        return None
    supported = ["eager"] + [n for n, attribute in CLASS_SUPPORT.items() if getattr(model_class, attribute, False)]
    return (f"--attn_implementation {name}: {model_class.__name__} does not support it; it supports "
            f"{', '.join(dict.fromkeys(supported))}")


def packing_problem(implementation: str | None) -> str:
    return (f"--packing true puts several examples in one row, and the model's attention ({implementation}) would let "
            f"them attend to each other; use --packing false, or --attn_implementation with one of "
            f"{', '.join(SEPARATES_PACKED_EXAMPLES)}")


def set_attention(model, config: Config) -> None:
    """Give the loaded model --attn_implementation (nothing without the flag)."""
    if config.model.attn_implementation is not None:
        model.set_attn_implementation(config.model.attn_implementation)


def attention_of(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False
