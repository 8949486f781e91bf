"""8-bit AdamW (bitsandbytes.optim.AdamW8bit): AdamW with both moments quantized blockwise to 8 bits.

Each moment is stored as one byte per element plus an fp32 scale per block of 256, a quarter of AdamW's state;
tensors under 4096 elements and the input embedding keep 32-bit moments (the Transformers Trainer's setting for
optim="adamw_bnb_8bit": bitsandbytes recommends 32-bit state for embeddings). Chosen over torchao's AdamW8bit:
bitsandbytes 0.50 runs the same blockwise update on a CPU and a GPU without torch.compile (torchao compiles its
step, which needs a C++ toolchain on a CPU), and its quantized state round-trips a checkpoint exactly.
Learning rate: --learning_rate, else 2e-5 with --model_name_or_path (the adamw recipe's), else 1e-3 for the
embedded tiny model trained from scratch. How each lr fares: docs/finetune/report.md.
Supports: every LR schedule with --warmup_steps, gradient accumulation, --max_grad_norm (default 1.0),
--weight_decay on matrices only, --adam_beta1/--adam_beta2/--adam_epsilon, DDP.
Refuses: DeepSpeed ZeRO (measured: it runs, but on one flat partition per parameter group the 256-element blocks
span tensors and tensors under 4096 elements get 8-bit moments, so 2 processes end 1.5e-3 of a tensor's norm away
from 1 where every other recipe agrees to 1e-4) and FSDP (bitsandbytes' kernel gets a DTensor shard beside plain
tensors and stops: "got mixed torch.Tensor and DTensor").
The embedding's 32-bit state is set through the parameter group ("optim_bits": 32), not bitsandbytes'
process-wide GlobalOptimManager, which keys parameters by id() (reused by a later model in the same process).
Install: pip install -e ".[bnb]".
"""

from optimizer_recipes.core.optimizers.knobs import AdamKnobs
from optimizer_recipes.core.optimizers.protocol import (
    OptimizerRecipe,
    decay_parameter_groups,
    numel,
    parameter_roles,
    refuse_flattened_partitions,
    refuse_sharded_tensors,
)
from optimizer_recipes.core.run.loop import main

BLOCK = 256  # elements per quantization block (bitsandbytes' blockwise 8-bit optimizers)
MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit moments (bitsandbytes' default)
QUANTILES = 256  # entries of each moment's quantization map (fp32)


class AdamW8bitRecipe(OptimizerRecipe):
    name = "adamw_8bit"
    order = 11
    trainer_optim = "adamw_bnb_8bit"  # the Transformers Trainer's optim= name
    default_learning_rate = 1e-3
    fine_tuning_learning_rate = 2e-5
    knobs = AdamKnobs
    requires = ("bitsandbytes", '-e ".[bnb]" (or: pip install bitsandbytes)')

    def refuse(self, config):
        return refuse_sharded_tensors(
            self, config, "each process holds a DTensor shard of every parameter, and bitsandbytes' 8-bit update "
            "takes plain tensors") or refuse_flattened_partitions(
            self, config, "bitsandbytes would quantize blocks that span tensors and give tensors under 4096 "
            "elements 8-bit moments", instead="multi_gpu.yaml")

    def optimizer_state_bytes(self, shapes, element_bytes):
        total = 0
        for shape, role in zip(shapes, getattr(shapes, "roles", ["other"] * len(shapes))):
            n = numel(shape)
            if role == "embedding" or n < MIN_8BIT_SIZE:
                total += 2 * n * 4  # two fp32 moments, whatever the weights' dtype
            else:
                total += 2 * (n + -(-n // BLOCK) * 4 + QUANTILES * 4)  # bytes, block scales, quantization map
        return total

    def build(self, model, config):
        from bitsandbytes.optim import AdamW8bit

        class AdamW8bitWithGroupBits(AdamW8bit):
            def get_config(self, gindex, pindex, group):
                found = super().get_config(gindex, pindex, group)
                found["optim_bits"] = group.get("optim_bits", found["optim_bits"])
                return found

        t, o = config.train, config.optim
        params = [p for p in model.parameters() if p.requires_grad]
        embedding = {id(p) for p, role in zip(params, parameter_roles(model)) if role == "embedding"}
        groups = []
        for group in decay_parameter_groups(model, t.weight_decay):
            groups.append({**group, "params": [p for p in group["params"] if id(p) not in embedding]})
            groups.append({**group, "params": [p for p in group["params"] if id(p) in embedding], "optim_bits": 32})
        return AdamW8bitWithGroupBits([g for g in groups if g["params"]], lr=t.learning_rate,
                                      betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                      min_8bit_size=MIN_8BIT_SIZE)


RECIPE = AdamW8bitRecipe()

if __name__ == "__main__":
    main(RECIPE)
