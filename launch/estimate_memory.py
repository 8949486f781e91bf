"""Estimate training memory per device for every recipe side by side, without loading a weight.

    python launch/estimate_memory.py --model_name_or_path meta-llama/Llama-3.1-8B --bf16 true \\
        --per_device_train_batch_size 1 --block_size 4096 --gradient_checkpointing true --world_size 8 --zero_stage 3

The shared flags are spelled as the recipes spell them (--bf16 true: bf16 autocast over fp32 weights; --dtype
bfloat16: bf16 weights, with --stochastic_rounding); --precision names the same settings directly.

Only the model's config is read (from the hub, a local folder or a GGUF file's header); the model is built on the
meta device. Without --model_name_or_path the embedded tiny Llama is used. Rows: what a training step holds by
category, the step's peak (`training`), the evaluation's peak at --per_device_eval_batch_size (`evaluation`), and
the run's (`total`, the larger: what the device must hold), and `with baseline`: the total plus the process's own
memory (Python, torch and the libraries: 0.5 GiB on a CPU, counted in the peak RSS; 0 on a GPU, where the CUDA peak
does not see it), which is what a recipe's pre-flight check and its start-up line say. Method:
recipes/core/memory/estimate.py.
"""

from __future__ import annotations

import argparse

import torch
from optimizer_recipes.core.memory.check import PROCESS_BASELINE
from optimizer_recipes.core.memory.estimate import PRECISIONS, estimate_each, meta_model
from optimizer_recipes.core.optimizers.protocol import all_recipes, reference_recipe
from optimizer_recipes.core.per_tensor.in_backward import UpdatesInBackward
from transformers.hf_argparser import string_to_bool

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "update_temporaries", "loss_temporaries",
              "training", "evaluation", "total")


def human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def estimate_table(args) -> str:
    model = meta_model(args.model_name_or_path, args.trust_remote_code)
    recipes = [UpdatesInBackward(r) if args.optimizer_in_backward and not r.updates_in_backward else r
               for r in all_recipes()]
    estimates = estimate_each(recipes, model, args.precision, args.per_device_train_batch_size,
                              args.block_size, args.gradient_checkpointing, args.world_size, args.zero_stage,
                              args.per_device_eval_batch_size, args.chunked_loss)
    rows = {name: e.as_dict() for name, e in estimates.items()}
    names = list(rows)
    lines = ["| per device | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for cat in CATEGORIES:
        lines.append(f"| {cat} | " + " | ".join(human(rows[n][cat]) for n in names) + " |")
    baseline = PROCESS_BASELINE[args.device]
    lines.append(f"| with baseline ({args.device}) | " + " | ".join(human(rows[n]["total"] + baseline) for n in names)
                 + " |")
    reference = reference_recipe()
    lines.append(f"| total vs {reference} | " + " | ".join(f"{rows[n]['total'] / rows[reference]['total']:.2f}x"
                                                         for n in names) + " |")
    params = sum(p.numel() for p in model.parameters())
    setup = (f"{args.model_name_or_path or 'embedded tiny Llama'} ({params / 1e6:.1f}M parameters), {args.precision}, "
             f"micro-batch {args.per_device_train_batch_size} x {args.block_size} tokens, evaluation batch "
             f"{args.per_device_eval_batch_size}, gradient checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}"
             f"{', updates in backward' if args.optimizer_in_backward else ''}"
             f", {'chunked loss' if args.chunked_loss else 'whole logits'}, world size {args.world_size}, "
             f"ZeRO stage {args.zero_stage}. training: a step's peak; evaluation: the evaluation's; total: the run's "
             "(the larger)")
    return setup + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--trust_remote_code", action="store_true")
    flag = {"type": string_to_bool, "nargs": "?", "const": True, "default": False}  # --x, --x true, --x false
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="default: from --bf16/--dtype, else fp32")
    parser.add_argument("--bf16", **flag, help="bf16 autocast over fp32 weights (precision bf16-mixed)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the weights' dtype")
    parser.add_argument("--stochastic_rounding", **(flag | {"default": True}),
                        help="with --dtype bfloat16: updates rounded stochastically (precision bf16), else to nearest")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8)
    parser.add_argument("--gradient_checkpointing", **flag)
    parser.add_argument("--optimizer_in_backward", **flag, help="every recipe's update in backward: one gradient at a "
                        "time (LOMO and AdaLomo always)")
    parser.add_argument("--chunked_loss", **(flag | {"default": True}))
    parser.add_argument("--world_size", type=int, default=1)
    parser.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=0)
    parser.add_argument("--device", choices=tuple(PROCESS_BASELINE), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the run would be: sets the process baseline added in the last rows")
    args = parser.parse_args(argv)
    implied = ("bf16-mixed" if args.bf16 else
               ("bf16" if args.stochastic_rounding else "bf16-nearest") if args.dtype == "bfloat16" else None)
    if args.precision and implied and args.precision != implied:
        parser.error(f"--precision {args.precision} and the recipe flags (precision {implied}) disagree: give one")
    args.precision = args.precision or implied or "fp32"
    print(estimate_table(args), end="")


if __name__ == "__main__":
    main()
