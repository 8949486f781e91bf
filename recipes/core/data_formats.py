"""Which fine-tuning data format a data set is in, read from its columns, and each format in one common shape.

The formats are the shapes TRL and the hub use:
- `text`: a column of raw documents (`--text_column`, default `text`).
- `prompt_completion`: `prompt` and `completion` columns, both strings (plain text, no chat template) or both lists
  of messages (conversational: the completion holds the assistant's answer).
- `messages`: a `messages` column of `{role, content}` lists (system / user / assistant, any number of turns), or
  ShareGPT's `conversations` column of `{from, value}` lists, converted to it.
- `alpaca`: `instruction`, `input` (optional) and `output` columns, turned into a one-turn conversation: the user
  says the instruction, plus "\\n" and the input when the input is not empty (LLaMA-Factory's and axolotl's
  convention); an optional `system` column becomes the system message.

`conversation_of(example, data_format)` returns what the tokenizer needs: the messages and the index of the first
message whose assistant turns are the completion (`None` for plain prompt/completion strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from recipes.core.config import ConfigError

FORMATS = ("text", "prompt_completion", "messages", "alpaca")
# The columns that identify each format (one of the alternatives must be present)
_SIGNATURES = {
    "prompt_completion": [("prompt", "completion")],
    "messages": [("messages",), ("conversations",)],
    "alpaca": [("instruction", "output")],
}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}
ROLES = ("system", "user", "assistant")


def detect_format(columns: list[str], requested: str, text_column: str, dataset_name: str) -> str:
    """The format named by --dataset_format, or the one the columns fit; one line if none fits or several do."""
    fits = [name for name, alternatives in _SIGNATURES.items()
            if any(all(c in columns for c in alternative) for alternative in alternatives)]
    if text_column in columns:
        fits.append("text")
    have = ", ".join(columns)
    if requested != "auto":
        if requested not in fits:
            raise ConfigError(f"--dataset_format {requested}: --dataset_name {dataset_name} does not have its columns "
                              f"({_columns_of(requested, text_column)}); it has {have}")
        return requested
    if not fits:
        accepted = "; ".join(f"{name} ({_columns_of(name, text_column)})" for name in FORMATS)
        raise ConfigError(f"--dataset_name {dataset_name} has columns {have}, which fit no data format; the formats "
                          f"are {accepted}. Rename the columns, or pass --text_column for a text column")
    if len(fits) > 1:
        raise ConfigError(f"--dataset_name {dataset_name} has columns {have}, which fit the formats "
                          f"{' and '.join(fits)}; say which with --dataset_format {'|'.join(fits)}")
    return fits[0]


def _columns_of(data_format: str, text_column: str) -> str:
    if data_format == "text":
        return f"'{text_column}'"
    return " or ".join("+".join(f"'{c}'" for c in alternative) for alternative in _SIGNATURES[data_format])


@dataclass
class Conversation:
    messages: list[dict]
    first_trained: int = 0  # messages before this index are the prompt: their assistant turns are not trained


@dataclass
class PromptCompletion:
    prompt: str
    completion: str


def conversation_of(example: dict, data_format: str) -> Conversation | PromptCompletion:
    """One example of a non-text format as messages (or as plain prompt/completion strings)."""
    if data_format == "messages":
        if "messages" in example:
            return Conversation(_checked_messages(example["messages"]))
        return Conversation(_checked_messages([_from_sharegpt(turn) for turn in example["conversations"]]))
    if data_format == "alpaca":
        prompt = example["instruction"]
        if example.get("input"):
            prompt += "\n" + example["input"]
        system = [{"role": "system", "content": example["system"]}] if example.get("system") else []
        messages = system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["output"]}]
        return Conversation(_checked_messages(messages), first_trained=len(messages) - 1)
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return PromptCompletion(prompt, completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        return Conversation(_checked_messages(prompt + completion), first_trained=len(prompt))
    raise ConfigError("'prompt' and 'completion' must both be strings or both be lists of {role, content} messages; "
                      f"got {type(prompt).__name__} and {type(completion).__name__}")


def _from_sharegpt(turn: dict) -> dict:
    if "role" in turn:  # some ShareGPT-named data sets already use role/content
        return turn
    speaker = str(turn.get("from", "")).lower()
    if speaker not in _SHAREGPT_ROLES:
        raise ConfigError(f"a 'conversations' turn is from {turn.get('from')!r}; the speakers understood are "
                          f"{', '.join(_SHAREGPT_ROLES)}")
    return {"role": _SHAREGPT_ROLES[speaker], "content": turn.get("value", "")}


def _checked_messages(messages: list) -> list[dict]:
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError(f"a message must be a {{role, content}} mapping, got {message!r}")
        if message["role"] not in ROLES:
            raise ConfigError(f"a message has role {message['role']!r}; the roles trained here are "
                              f"{', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# the flag that switches answer-only loss for each format (text trains every token)
ANSWER_ONLY_FLAG = {"messages": "assistant_only_loss", "prompt_completion": "completion_only_loss",
                    "alpaca": "completion_only_loss"}


def trains_on_answers_only(data_format: str, data_arguments) -> Optional[bool]:
    """Whether the loss is on the answers only for this format (None for text: every token is trained)."""
    flag = ANSWER_ONLY_FLAG.get(data_format)
    return None if flag is None else getattr(data_arguments, flag)
