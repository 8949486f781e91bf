"""Which fine-tuning data format a data set is in, read from its columns, and each format in one common shape.

The formats are the shapes TRL and the hub use:
- `text`: a column of raw documents (`--text_column`, default `text`).
- `prompt_completion`: `prompt` and `completion` columns, both strings (plain text, no chat template) or both lists
  of messages (conversational: the completion holds the assistant's answer).
- `messages`: a `messages` column of `{role, content}` lists (system / user / assistant, any number of turns), or
  ShareGPT's `conversations` column of `{from, value}` lists, converted to it. `content` is a string, or a list of
  parts (`[{"type": "text", "text": ...}, ...]`, the OpenAI message format) whose text parts are joined in order;
  a part of another type (image, audio, file) is a bad row, and so is a tool call or a `tool` message: the recipes
  train text turns only.
- `alpaca`: `instruction`, `input` (optional) and `output` columns, turned into a one-turn conversation: the user
  says the instruction, plus "\\n" and the input when the input is not empty (LLaMA-Factory's and axolotl's
  convention); an optional `system` column becomes the system message.

`conversation_of(example, data_format)` returns what the tokenizer needs: the messages and the index of the first
message whose assistant turns are the completion (`None` for plain prompt/completion strings). A row it cannot use
raises `RowError` saying what is wrong and what was expected; the caller names the split and the row
(`--on_bad_rows error|skip` decides whether it stops the run or is dropped and counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from optimizer_recipes.core.run.config import ConfigError

FORMATS = ("text", "prompt_completion", "messages", "alpaca")
# The columns that identify each format (one of the alternatives must be present)
_SIGNATURES = {
    "prompt_completion": [("prompt", "completion")],
    "messages": [("messages",), ("conversations",)],
    "alpaca": [("instruction", "output")],
}
# every column some format is recognised by: each row of a file needs the same of these (others may come and go)
FORMAT_COLUMNS = frozenset({"text"} | {c for alternatives in _SIGNATURES.values() for a in alternatives for c in a})
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


class RowError(ConfigError):
    """One row of the data cannot be trained; the message says what is wrong with it (the caller names the row)."""


def conversation_of(example: dict, data_format: str) -> Conversation | PromptCompletion:
    """One example of a non-text format as messages (or as plain prompt/completion strings)."""
    if data_format == "messages":
        if "messages" in example:
            return Conversation(_checked_messages(example["messages"], "messages"))
        turns = example["conversations"]
        _expect_list(turns, "conversations", "{from, value}")
        return Conversation(_checked_messages([_from_sharegpt(turn, i) for i, turn in enumerate(turns, 1)],
                                              "conversations"))
    if data_format == "alpaca":
        for column in ("instruction", "output"):
            _expect_string(example[column], column)
        prompt = example["instruction"]
        if example.get("input"):
            _expect_string(example["input"], "input")
            prompt += "\n" + example["input"]
        system = [{"role": "system", "content": example["system"]}] if example.get("system") else []
        messages = system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["output"]}]
        return Conversation(_checked_messages(messages, "alpaca"), first_trained=len(messages) - 1)
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return PromptCompletion(prompt, completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        return Conversation(_checked_messages(prompt + completion, "prompt + completion"), first_trained=len(prompt))
    raise RowError("'prompt' and 'completion' must both be strings or both be lists of {role, content} messages; "
                   f"got {_kind(prompt)} and {_kind(completion)}")


_KINDS = {str: "a string", list: "a list", dict: "a mapping", int: "a number", float: "a number", bool: "a boolean"}


def _kind(value) -> str:
    return "null" if value is None else _KINDS.get(type(value), f"a {type(value).__name__}")


def _expect_list(value, column: str, of: str) -> None:
    if not isinstance(value, list):
        raise RowError(f"'{column}' is {_kind(value)}, expected a list of {of}")


def _expect_string(value, column: str) -> None:
    if not isinstance(value, str):
        raise RowError(f"'{column}' is {_kind(value)}, expected a string")


def _from_sharegpt(turn, number: int) -> dict:
    if not isinstance(turn, dict):
        raise RowError(f"'conversations' turn {number} is {_kind(turn)}, expected a {{from, value}} mapping")
    if "role" in turn:  # some ShareGPT-named data sets already use role/content
        return turn
    speaker = str(turn.get("from", "")).lower()
    if speaker not in _SHAREGPT_ROLES:
        raise RowError(f"'conversations' turn {number} is from {turn.get('from')!r}; the speakers understood are "
                       f"{', '.join(_SHAREGPT_ROLES)}")
    return {"role": _SHAREGPT_ROLES[speaker], "content": turn.get("value")}


def _checked_messages(messages, column: str) -> list[dict]:
    """{role, content} messages with string content: a list of content parts becomes the text of its text parts,
    joined in order (what chat templates of text models render for it)."""
    _expect_list(messages, column, "{role, content} messages")
    checked = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message:
            found = "a mapping without a role" if isinstance(message, dict) else _kind(message)
            raise RowError(f"'{column}' message {number} is {found}, expected a {{role, content}} mapping")
        role = message["role"]
        if role == "tool" or message.get("tool_calls"):
            raise RowError(f"'{column}' message {number} ({role}) is a tool call or its result; the recipes train "
                           "system, user and assistant text only: drop tool turns from the data")
        if role not in ROLES:
            raise RowError(f"'{column}' message {number} has role {role!r}; the roles trained here are "
                           f"{', '.join(ROLES)}")
        checked.append({"role": role, "content": _text_of(message.get("content"), column, number, role)})
    return checked


def _text_of(content, column: str, number: int, role: str) -> str:
    if isinstance(content, str):
        return content
    where = f"'{column}' message {number} ({role})"
    if content is None:
        raise RowError(f"{where} has no content (null), expected a string or a list of text parts")
    if not isinstance(content, list):
        raise RowError(f"{where} has content of type {type(content).__name__}, expected a string or a list of "
                       "text parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RowError(f"{where} has a content part of type {kind or _kind(part)!r}; the recipes train text: "
                           "only {\"type\": \"text\", \"text\": ...} parts are read")
        texts.append(part["text"])
    return "".join(texts)


# the flag that switches answer-only loss for each format (text trains every token)
ANSWER_ONLY_FLAG = {"messages": "assistant_only_loss", "prompt_completion": "completion_only_loss",
                    "alpaca": "completion_only_loss"}


def trains_on_answers_only(data_format: str, data_arguments) -> Optional[bool]:
    """Whether the loss is on the answers only for this format (None for text: every token is trained)."""
    flag = ANSWER_ONLY_FLAG.get(data_format)
    return None if flag is None else getattr(data_arguments, flag)
