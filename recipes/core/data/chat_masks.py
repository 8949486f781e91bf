"""Tokenize an instruction or chat example and mark which tokens the loss is on: the answers, never the prompt.

Conversations are rendered with the tokenizer's own chat template (`apply_chat_template`). Which tokens are the
assistant's comes from:
- the template's `{% generation %}` ... `{% endgeneration %}` markers, where it has them (transformers'
  `return_assistant_tokens_mask`);
- otherwise (most released templates: Llama 3, Qwen 2.5, Mistral), from prefixes: for each trained assistant turn,
  the conversation up to that turn rendered with the generation prompt, and up to the end of that turn, must both
  be token prefixes of the whole conversation; the tokens between them are the turn, with its end-of-turn token(s).
  transformers itself would return an all-zero mask for such a template, with only a warning. A template that
  renders earlier turns differently once later ones follow (e.g. one that drops earlier reasoning) fails that check
  and is refused with a message: no exact mask exists.
Plain prompt/completion strings need no template: the prompt and the completion are tokenized apart and joined,
with EOS after the completion, so the boundary is exact.
"""

from __future__ import annotations

import re
from pathlib import Path

from jinja2 import TemplateError
from optimizer_recipes.core.data.formats import Conversation, PromptCompletion, RowError
from optimizer_recipes.core.run.config import ConfigError

IGNORE_INDEX = -100  # the label of a token the loss skips (transformers' and PyTorch's convention)
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def use_chat_template_file(tokenizer, path: str | None) -> None:
    """--chat_template PATH: a Jinja file that replaces the tokenizer's template (and is saved with the model)."""
    if path:
        tokenizer.chat_template = Path(path).read_text()


def has_generation_markers(tokenizer) -> bool:
    return bool(tokenizer.chat_template and _GENERATION_MARKER.search(tokenizer.chat_template))


def tokenize_example(tokenizer, example: Conversation | PromptCompletion, answers_only: bool,
                     loss_flag: str) -> tuple[list[int], list[int]]:
    """`input_ids` and `labels` (IGNORE_INDEX where the loss is off) of one example. `loss_flag` names the switch
    (--assistant_only_loss or --completion_only_loss) that error messages point to."""
    if isinstance(example, PromptCompletion):
        prompt = tokenizer(example.prompt)["input_ids"]  # with the tokenizer's BOS, if it adds one
        completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        ids = prompt + completion + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        trained = [not answers_only] * len(prompt) + [True] * (len(ids) - len(prompt))
    else:
        if not tokenizer.chat_template:
            raise ConfigError("the tokenizer has no chat template, and the data set is conversational; pass "
                              "--chat_template PATH (a Jinja file, e.g. the chat_template.jinja of an instruct "
                              "model of the same family)")
        ids = _render(tokenizer, example.messages)
        trained = assistant_mask(tokenizer, example, ids, loss_flag) if answers_only else [True] * len(ids)
    return ids, [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]


def assistant_mask(tokenizer, conversation: Conversation, ids: list[int], loss_flag: str) -> list[bool]:
    """True on the tokens of every assistant turn from `conversation.first_trained` on, end-of-turn included."""
    messages = conversation.messages
    if has_generation_markers(tokenizer):
        rendered = _apply(tokenizer, messages, return_dict=True, return_assistant_tokens_mask=True)
        mask = [bool(m) for m in rendered["assistant_masks"]]
        if conversation.first_trained:  # the prompt's own assistant turns are not the completion
            prompt_length = _prefix_length(tokenizer, messages[:conversation.first_trained], True, ids, loss_flag)
            mask[:prompt_length] = [False] * prompt_length
        return mask
    mask = [False] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or turn < conversation.first_trained:
            continue
        start = _prefix_length(tokenizer, messages[:turn], True, ids, loss_flag) if turn else 0
        end = _prefix_length(tokenizer, messages[:turn + 1], False, ids, loss_flag)
        mask[start:end] = [True] * (end - start)
    return mask


def _prefix_length(tokenizer, messages: list[dict], add_generation_prompt: bool, ids: list[int],
                   loss_flag: str) -> int:
    prefix = _render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    if ids[:len(prefix)] != prefix:
        raise ConfigError(
            f"the chat template renders the first {len(messages)} message(s) differently once later turns follow "
            "(it rewrites earlier turns), so which tokens are the assistant's cannot be worked out exactly; pass "
            "--chat_template with a template that wraps assistant turns in {% generation %} ... {% endgeneration "
            f"%}}, or {loss_flag} false to train on every token")
    return len(prefix)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return list(_apply(tokenizer, messages, return_dict=True, add_generation_prompt=add_generation_prompt)["input_ids"])


def _apply(tokenizer, messages: list[dict], **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    except TemplateError as error:
        raise RowError(f"the chat template cannot render a conversation of roles "
                          f"{', '.join(m['role'] for m in messages)}: {error}; fix the data or pass "
                          "--chat_template") from None
