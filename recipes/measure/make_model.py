"""Write a random-weight model of a published shape, without a download: for memory and speed at real scale.

    python launch/make_model.py llama-7b models/llama-7b            # LLaMA-7B as the LOMO paper measured it
    python launch/make_model.py --list

The shapes are architecture configs kept in `launch/shapes/<name>.json` (or give any config.json path). The model
is built in --dtype (bf16 by default) directly, initialised as transformers initialises it (seeded), and saved as
sharded safetensors with `save_pretrained`: no second copy of the weights is made (the command prints its peak RSS
beside the weights' size). The tokenizer is the embedded one (recipes/embedded_default/: 497 tokens, all within the
shape's vocabulary), so the recipes' default data trains it. The weights are random: figures measured on such a
folder are memory and speed, never quality; say so wherever they appear.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)

SHAPES = REPO / "launch" / "shapes"
DTYPES = ("bfloat16", "float16", "float32")


def shape_file(shape: str) -> Path:
    path = Path(shape)
    if path.suffix == ".json":
        return path
    found = SHAPES / f"{shape}.json"
    if not found.is_file():
        raise SystemExit(f"make_model: no shape {shape!r}; one of {', '.join(known_shapes())}, or a config.json path")
    return found


def known_shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES.glob("*.json"))


def write_model(shape: str, out: Path, dtype: str = "bfloat16", seed: int = 0, max_shard_size: str = "2GB") -> dict:
    """Build the shape's model in `dtype` and save it with the embedded tokenizer; returns what was written."""
    import torch
    from optimizer_recipes.core.data import embedded
    from optimizer_recipes.core.memory.profile import GIB, peak_rss_bytes
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fields = json.loads(shape_file(shape).read_text())
    fields.pop("_comment", None)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    tokenizer = AutoTokenizer.from_pretrained(embedded.EMBEDDED_DIR)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id  # the tokenizer it is saved with decides
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"make_model: the embedded tokenizer has {len(tokenizer)} tokens, more than the shape's "
                         f"vocabulary ({config.vocab_size})")
    started = time.perf_counter()
    torch.manual_seed(seed)
    # built in dtype (no fp32 copy), on the GPU where there is one: initialising 7B weights takes ~4 minutes on a CPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    built = time.perf_counter()
    staging = out.parent / f".{out.name}.partial"  # a folder named `out` is always whole
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"shape": shape, "output": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": dtype, "weights_gib": weights / GIB, "peak_rss_gib": peak_rss_bytes() / GIB,
            "build_s": built - started, "save_s": time.perf_counter() - built}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", nargs="?", help=f"one of launch/shapes/ ({', '.join(known_shapes())}) or a "
                                                 "config.json path")
    parser.add_argument("output_dir", nargs="?", help="the model folder to write (from_pretrained loads it)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_shard_size", default="2GB")
    parser.add_argument("--list", action="store_true", help="list the shapes and their parameter counts")
    args = parser.parse_args(argv)
    if args.list:
        for name in known_shapes():
            print(f"{name}: {json.loads(shape_file(name).read_text()).get('_comment', '')}")
        return
    if not (args.shape and args.output_dir):
        parser.error("give a shape and an output folder (or --list)")
    out = Path(args.output_dir)
    if out.exists():
        raise SystemExit(f"make_model: {out} exists; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    written = write_model(args.shape, out, args.dtype, args.seed, args.max_shard_size)
    print(f"wrote {out}: {written['shape']}, {written['parameters'] / 1e9:.2f}B parameters in {args.dtype} "
          f"({written['weights_gib']:.2f} GiB of random weights) in {written['build_s']:.0f} s + "
          f"{written['save_s']:.0f} s to save; peak RSS {written['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
