"""Fault injection for tests, loaded by Python at start-up when this folder is on PYTHONPATH.

It changes nothing unless one of these is set:
- INJECT_SLOW_SAVE=N: the N-th checkpoint save (1-based) writes its files, touches `<dir>/.save-in-progress`,
  then sleeps, so a test can SIGKILL the run in the middle of a save.
- INJECT_NAN_AT_STEP=N: the N-th training forward pass of a Llama with real weights (not the memory check's, on
  the meta device) returns NaN logits (with the chunked loss: NaN per-row losses), so the loss is NaN.
- INJECT_SLOW_MODEL_LOAD=FILE: the recipe's model loading touches FILE, then sleeps a minute, so a test can signal
  a run before its first step.
- INJECT_SLOW_STEPS=FILE: from the 3rd training forward pass on, each touches FILE and takes a second longer, so a
  test can signal a run in the middle of training, every process alike.
"""

import os
import time

if os.environ.get("INJECT_SLOW_SAVE"):
    import accelerate

    _save_state = accelerate.Accelerator.save_state
    _saves = [0]

    def save_state(self, output_dir=None, *args, **kwargs):
        result = _save_state(self, output_dir, *args, **kwargs)
        _saves[0] += 1
        if _saves[0] == int(os.environ["INJECT_SLOW_SAVE"]):
            open(os.path.join(output_dir, ".save-in-progress"), "w").close()
            time.sleep(120)
        return result

    accelerate.Accelerator.save_state = save_state

if os.environ.get("INJECT_NAN_AT_STEP"):
    from transformers.models.llama import modeling_llama

    _forward = modeling_llama.LlamaForCausalLM.forward
    _calls = [0]

    def forward(self, *args, **kwargs):
        out = _forward(self, *args, **kwargs)
        if self.training and self.lm_head.weight.device.type != "meta":  # not the memory estimator's forward
            _calls[0] += 1
            if _calls[0] == int(os.environ["INJECT_NAN_AT_STEP"]):
                out.logits = out.logits * float("nan")  # what the loop's loss is computed from
        return out

    modeling_llama.LlamaForCausalLM.forward = forward

if os.environ.get("INJECT_SLOW_MODEL_LOAD"):
    from optimizer_recipes.core.models import sources

    _load_model = sources.load_model

    def load_model(*args, **kwargs):
        """Touch the file INJECT_SLOW_MODEL_LOAD names, then take a minute, as a large model's loading does."""
        open(os.environ["INJECT_SLOW_MODEL_LOAD"], "w").close()
        time.sleep(60)
        return _load_model(*args, **kwargs)

    sources.load_model = load_model

if os.environ.get("INJECT_SLOW_STEPS"):
    from transformers.models.llama import modeling_llama

    _forward_of_steps = modeling_llama.LlamaForCausalLM.forward
    _forwards = [0]

    def slow_forward(self, *args, **kwargs):
        if self.training and self.lm_head.weight.device.type != "meta":
            _forwards[0] += 1
            if _forwards[0] >= 3:
                open(os.environ["INJECT_SLOW_STEPS"], "w").close()
                time.sleep(1)
        return _forward_of_steps(self, *args, **kwargs)

    modeling_llama.LlamaForCausalLM.forward = slow_forward
