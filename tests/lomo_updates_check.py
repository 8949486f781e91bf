"""lomo-optim's Lomo/AdaLomo and this repo's linear-time ones, side by side in every process of a launch.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml tests/lomo_updates_check.py   (DDP)
    accelerate launch --config_file accelerate_configs/zero3.yaml tests/lomo_updates_check.py       (ZeRO-3)

Both are built by the recipes' own `build` (DDP: each gradient averaged across processes before the update;
ZeRO-3: parameters partitioned and gathered per layer, no engine) and trained on each rank's own batches with the
recipes' `backward`; the full weights must then be equal, bit for bit. Prints one line per mode, `checked N modes
on W processes` at the end, and exits 1 at the first difference (run by tests/test_lomo_updates.py).
"""

from __future__ import annotations

import copy
import sys
import tempfile

import torch
import torch.distributed as dist
from lomo_optim import Lomo
from optimizer_recipes.adalomo import AdaLomoRecipe
from optimizer_recipes.core.data.embedded import EMBEDDED_DIR
from optimizer_recipes.core.fused_backward import engine_free_zero3
from optimizer_recipes.core.fused_backward.lomo_fixes import AdaLomoOnModelDevice
from optimizer_recipes.core.run.config import parse_config
from optimizer_recipes.core.run.loop import exit_before_interpreter_teardown
from optimizer_recipes.core.run.run_setup import build_accelerator
from optimizer_recipes.lomo import LomoRecipe
from transformers import AutoConfig, AutoModelForCausalLM

STEPS = 3


class UpstreamLomo(LomoRecipe):
    def build_fused(self, model, config):
        t, o = config.train, config.optim
        return Lomo(model, lr=t.learning_rate, clip_grad_norm=t.max_grad_norm or None,
                    clip_grad_value=o.clip_grad_value, weight_decay=t.weight_decay)


class UpstreamAdaLomo(AdaLomoRecipe):
    def build_fused(self, model, config):
        t, o = config.train, config.optim
        return AdaLomoOnModelDevice(model, lr=t.learning_rate, loss_scale=o.loss_scale,
                                    clip_grad_norm=t.max_grad_norm or None, clip_grad_value=o.clip_grad_value,
                                    weight_decay=t.weight_decay)


# name: (upstream recipe, this repo's recipe, flags, weight dtype); global-norm clipping is refused under ZeRO-3
MODES = {
    "lomo": (UpstreamLomo(), LomoRecipe(), [], torch.float32),
    "lomo clip value, weight decay": (UpstreamLomo(), LomoRecipe(),
                                      ["--clip_grad_value", "1e-3", "--weight_decay", "0.1"], torch.float32),
    "lomo bf16 weights": (UpstreamLomo(), LomoRecipe(), ["--weight_decay", "0.1"], torch.bfloat16),
    "lomo two-pass global norm": (UpstreamLomo(), LomoRecipe(), ["--max_grad_norm", "0.5"], torch.float32),
    "adalomo": (UpstreamAdaLomo(), AdaLomoRecipe(), [], torch.float32),
    "adalomo clip value, weight decay, loss scale": (
        UpstreamAdaLomo(), AdaLomoRecipe(), ["--clip_grad_value", "1e-3", "--weight_decay", "0.1",
                                             "--loss_scale", "64"], torch.float32),
    "adalomo bf16 weights": (UpstreamAdaLomo(), AdaLomoRecipe(), ["--weight_decay", "0.1"], torch.bfloat16),
    "adalomo two-pass global norm": (UpstreamAdaLomo(), AdaLomoRecipe(), ["--max_grad_norm", "0.5"],
                                     torch.float32),
}


def full_weights(model) -> dict[str, torch.Tensor]:
    if engine_free_zero3.is_partitioned(model):
        state = engine_free_zero3.gathered_state_dict(model)  # whole, on rank 0
        return {k: v for k, v in state.items() if k in dict(model.named_parameters())}
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def initial_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EMBEDDED_DIR)).to(dtype)


def train(recipe, config, accelerator, dtype) -> dict[str, torch.Tensor]:
    model = initial_model(dtype)
    optimizer = recipe.build(model, config)
    assert optimizer.zero3_enabled == engine_free_zero3.is_partitioned(model)  # lomo-optim's ZeRO-3 path or not
    rank = accelerator.process_index
    for step in range(STEPS):
        batch = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(
            100 * step + rank))  # each rank its own batch: averaging across processes matters
        loss = model(input_ids=batch, labels=batch).loss
        recipe.backward(accelerator, model, optimizer, loss, 0.05 * (1 - step / STEPS))
    return full_weights(model)


def main() -> int:
    with tempfile.TemporaryDirectory() as out:
        first = MODES["lomo"][1]
        config = parse_config(first, ["--output_dir", out])
        accelerator = build_accelerator(config, first)
        zero3 = engine_free_zero3.runs_engine_free(config.launch.kind, config.launch.zero_stage)
        checked = 0
        for mode, (upstream, ours, flags, dtype) in MODES.items():
            if zero3 and "--max_grad_norm" in flags:
                continue
            config = parse_config(ours, ["--output_dir", out, "--learning_rate", "0.05", *flags])
            expected = train(upstream, config, accelerator, dtype)
            got = train(ours, copy.deepcopy(config), accelerator, dtype)
            differs = [name for name in expected if not torch.equal(expected[name], got[name])]
            initial = dict(initial_model(dtype).named_parameters())
            trained = sum(not torch.equal(initial[name], weights) for name, weights in expected.items())
            if accelerator.is_main_process and trained < 0.7 * len(initial):  # bf16 drops a few tiny steps
                differs.append(f"nothing: only {trained} of {len(initial)} tensors changed")
            failed = torch.tensor(float(bool(differs)))
            dist.all_reduce(failed)
            if accelerator.is_main_process:
                print(f"{mode}: {'differs in ' + ', '.join(differs) if differs else 'same weights'}", flush=True)
            if failed.item():
                return 1
            checked += 1
        if accelerator.is_main_process:
            print(f"checked {checked} modes on {accelerator.num_processes} processes"
                  f"{' (ZeRO-3 partitions)' if zero3 else ''}", flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    dist.destroy_process_group()
    if status == 0:
        exit_before_interpreter_teardown()  # as the recipes do: DeepSpeed on CPU may abort in teardown
    sys.exit(status)
