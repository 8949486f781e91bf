"""What the chunked loss costs, or saves, in time: one training step's forward and backward with each loss, interleaved.

    python launch/loss_cost.py --model_name_or_path models/smollm2-135m-instruct --block_size 2048 \\
        --gradient_checkpointing --rounds 6

One process, one model, the same batch (random tokens of the model's vocabulary) for both losses: the recipes'
chunked loss (`--chunked_loss true`, the default) and the whole logits (`--chunked_loss false`). Two measurements,
each in interleaved rounds (every round runs both, in alternating order; `--warmup` rounds dropped; medians):
- the model's forward and backward (`--rounds`): what a step costs with each, the optimizer's step left out (the
  same for both, so the ratio shown is the largest it can be on a full step);
- the output layer and the cross-entropy alone, on random final hidden states (`--loss_rounds`, cheap, so many
  more rounds): their difference, as a share of the whole-logits step, is the chunked loss's cost (or saving) with
  far less of the machine's noise than the difference of two steps.
Two batches: every token trained (plain text) and answers only (`--trained_share` of each row's last tokens trained,
the rest -100, as in chat data: the chunked loss skips the others before the output layer). Prints a markdown
table; `--output_json` writes every time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="a local model folder; default the embedded model")
    parser.add_argument("--per_device_train_batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--trained_share", type=float, default=0.25, help="of each row, in the answers-only batch")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--loss_rounds", type=int, default=20, help="rounds of the loss alone")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output_json", default=None)
    return parser.parse_args(argv)


def load(args):
    import torch
    from optimizer_recipes.core.data.embedded import write_scaled_model
    from optimizer_recipes.core.run.run_setup import enable_gradient_checkpointing
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:  # the embedded model: a seeded copy, as the benchmark makes
        path = args.model_name_or_path or write_scaled_model(Path(folder) / "model")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)  # as the recipes do
    return model.train()


def batches(model, args) -> dict[str, dict]:
    import torch
    from optimizer_recipes.core.data.chat_masks import IGNORE_INDEX

    generator = torch.Generator().manual_seed(0)
    shape = (args.per_device_train_batch_size, args.block_size)
    ids = torch.randint(model.config.vocab_size, shape, generator=generator)
    answers = ids.clone()
    answers[:, : round(args.block_size * (1 - args.trained_share))] = IGNORE_INDEX
    return {"every token trained": {"input_ids": ids, "labels": ids},
            f"answers only ({args.trained_share:.0%} trained)": {"input_ids": ids, "labels": answers}}


def seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def interleaved(works: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each round runs every work once, in alternating order; the warm-up rounds are dropped."""
    times = {name: [] for name in works}
    for round_ in range(warmup + rounds):
        for name in list(works) if round_ % 2 == 0 else list(reversed(works)):
            took = seconds(works[name])
            if round_ >= warmup:
                times[name].append(took)
    return times


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from optimizer_recipes.core.run.throughput import hardware
    from optimizer_recipes.core.run.token_loss import ChunkedLoss, FullLogitsLoss, row_losses_from_logits

    model = load(args)
    head = model.get_output_embeddings()
    chunked, whole = ChunkedLoss(model), FullLogitsLoss()  # the chunked one is off while it is not called

    def train(rows):  # the loop's loss: the mean over the trained tokens
        (rows.loss_sums.sum() / rows.trained.sum()).backward()
        model.zero_grad(set_to_none=True)

    steps, alone = {}, {}
    for data, batch in batches(model, args).items():
        steps[data] = interleaved({"chunked": lambda: train(chunked(model, batch)),
                                   "whole": lambda: train(whole(model, batch))}, args.rounds, args.warmup)
        hidden = torch.randn(*batch["input_ids"].shape, head.in_features, requires_grad=True)
        labels = batch["labels"]
        alone[data] = interleaved({"chunked": lambda: train(chunked.of_hidden_states(hidden, labels)),
                                   "whole": lambda: train(row_losses_from_logits(head(hidden), labels))},
                                  args.loss_rounds, args.warmup)

    median = statistics.median
    print(f"{args.model_name_or_path or 'the embedded model'}, {args.per_device_train_batch_size} x "
          f"{args.block_size} tokens, fp32, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
          f"{hardware()}; seconds, medians of interleaved rounds after {args.warmup} warm-up round(s): forward + "
          f"backward of the model ({args.rounds} rounds), and of the output layer and cross-entropy alone on the "
          f"final hidden states ({args.loss_rounds} rounds)\n")
    print("| batch | step, chunked | step, whole | chunked / whole (median of rounds) | loss alone, chunked | "
          "loss alone, whole | chunked - whole, share of the whole step |\n|---|---:|---:|---:|---:|---:|---:|")
    for data in steps:
        step, loss = steps[data], alone[data]
        ratio = median(c / w for c, w in zip(step["chunked"], step["whole"]))
        share = (median(loss["chunked"]) - median(loss["whole"])) / median(step["whole"])
        print(f"| {data} | {median(step['chunked']):.3f} | {median(step['whole']):.3f} | {ratio:.3f} | "
              f"{median(loss['chunked']):.3f} | {median(loss['whole']):.3f} | {share:+.1%} |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"args": vars(args), "steps": steps, "loss_alone": alone},
                                                     indent=1))


if __name__ == "__main__":
    main()
