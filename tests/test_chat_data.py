"""Instruction and chat data: every format trains on its answers only, with exact masks, packing and evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from optimizer_recipes.adamw import RECIPE as ADAMW
from optimizer_recipes.core.data.chat_masks import IGNORE_INDEX, assistant_mask, tokenize_example
from optimizer_recipes.core.data.embedded import EMBEDDED_DIR, chat_conversations
from optimizer_recipes.core.data.formats import Conversation
from optimizer_recipes.core.data.loading import build_datasets, load_raw_datasets
from optimizer_recipes.core.data.packing import PaddingCollator, best_fit_decreasing
from optimizer_recipes.core.run.config import ConfigError, parse_config
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

EOS = "<|endoftext|>"
QA = [("what is two plus three?", "two plus three is five."), ("count from four.", "four, five, six, seven."),
      ("where does ben see the fox?", "ben sees the fox at the river.")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Each format as a user's file holds it, and the text the loss must be on (in order), found independently of the code
def format_cases(tmp_path):
    chat = [[{"role": "system", "content": "answer in words."}, {"role": "user", "content": QA[0][0]},
             {"role": "assistant", "content": QA[0][1]}, {"role": "user", "content": QA[1][0]},
             {"role": "assistant", "content": QA[1][1]}],
            [{"role": "user", "content": QA[2][0]}, {"role": "assistant", "content": QA[2][1]}]]
    sharegpt_roles = {"system": "system", "user": "human", "assistant": "gpt"}
    return {
        "text": ([{"text": f"{q} {a}"} for q, a in QA], [f"{q} {a}{EOS}" for q, a in QA]),
        "prompt_completion": ([{"prompt": q, "completion": " " + a} for q, a in QA], [f" {a}{EOS}" for _, a in QA]),
        "conversational_prompt_completion": (
            [{"prompt": c[:-1], "completion": c[-1:]} for c in chat],  # the first answer of chat[0] is prompt here
            [f"{QA[1][1]}{EOS}", f"{QA[2][1]}{EOS}"]),
        "messages": ([{"messages": c} for c in chat], [f"{QA[0][1]}{EOS}{QA[1][1]}{EOS}", f"{QA[2][1]}{EOS}"]),
        "sharegpt": ([{"conversations": [{"from": sharegpt_roles[m["role"]], "value": m["content"]} for m in c]}
                      for c in chat], [f"{QA[0][1]}{EOS}{QA[1][1]}{EOS}", f"{QA[2][1]}{EOS}"]),
        "alpaca": ([{"instruction": QA[0][0], "input": "", "output": QA[0][1]},
                    {"instruction": "answer in words.", "input": QA[1][0], "output": QA[1][1]}],
                   [f"{QA[0][1]}{EOS}", f"{QA[1][1]}{EOS}"]),
    }


def rows_of(tmp_path, records, *flags, block_size=128):
    path = write_jsonl(tmp_path / "data.jsonl", records * 10)  # 10 copies: a validation split is held out
    config = parse_config(ADAMW, ["--dataset_name", str(path), "--output_dir", str(tmp_path / "out"), *flags])
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    return build_datasets(load_raw_datasets(config), tokenizer, config, block_size), tokenizer


def tiny_model(attn_implementation="sdpa"):
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(EMBEDDED_DIR)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def positions_of(ids: list[int], pieces: list[list[int]]) -> list[int]:
    """Where each token sequence in `pieces` occurs in `ids`, in order (each searched after the previous one)."""
    found, start = [], 0
    for piece in pieces:
        at = next(i for i in range(start, len(ids) - len(piece) + 1) if ids[i:i + len(piece)] == piece)
        found += range(at, at + len(piece))
        start = at + len(piece)
    return found


@pytest.mark.parametrize("case", ["text", "prompt_completion", "conversational_prompt_completion", "messages",
                                  "sharegpt", "alpaca"])
def test_loss_is_on_the_answer_tokens_only(case, tmp_path):
    records, answers = format_cases(tmp_path)[case]
    (rows, summary), tokenizer = rows_of(tmp_path, records, "--packing", "false", "--validation_split_percentage", "10")
    expected_format = {"sharegpt": "messages", "conversational_prompt_completion": "prompt_completion"}.get(case, case)
    assert summary.data_format == expected_format
    # one example per row: find them in the same order as the records
    by_text = {tokenizer.decode(r["input_ids"]): r for r in rows["train"]}
    batch_rows, wanted = [], []
    for record, answer in zip(records, answers):
        row = next(r for text, r in by_text.items() if _first_words(record) in text)
        batch_rows.append(row)
        wanted.append(answer)
    batch = PaddingCollator(tokenizer.eos_token_id)(batch_rows)

    # The labels left on are exactly the answers' tokens (the text format: every token after the first)
    for row, answer in zip(batch_rows, wanted):
        trained = [i for i, label in zip(row["input_ids"][1:], row["labels"][1:]) if label != IGNORE_INDEX]
        assert tokenizer.decode(trained) == (answer[len(tokenizer.decode(row["input_ids"][:1])):]
                                             if case == "text" else answer)

    # Hand-computed: cross-entropy over the answer tokens found by searching for them, against the model's loss
    model = tiny_model()
    counts = batch.pop("token_counts")
    out = model(**batch, use_cache=False)
    out.logits.retain_grad()
    positions = [positions_of(row["input_ids"], [tokenizer(a.split(EOS)[0], add_special_tokens=False)["input_ids"]
                                                 + [tokenizer.eos_token_id] for a in answer.split(EOS)[:-1]])
                 for row, answer in zip(batch_rows, wanted)]
    if case == "text":
        positions = [list(range(1, len(row["input_ids"]))) for row in batch_rows]
    terms = [F.cross_entropy(out.logits[b, p - 1], batch["input_ids"][b, p], reduction="sum")
             for b, ps in enumerate(positions) for p in ps]
    hand = torch.stack(terms).sum() / len(terms)
    assert out.loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert counts[1].item() == len(terms)

    # ...and no gradient reaches the logits of a position whose next token is not trained
    out.loss.backward()
    for b, ps in enumerate(positions):
        predicting = {p - 1 for p in ps}
        for position in range(batch["input_ids"].shape[1]):
            grad_norm = out.logits.grad[b, position].abs().sum().item()
            assert (grad_norm > 0) == (position in predicting), (b, position)


def _first_words(record: dict) -> str:
    value = record.get("text") or record.get("prompt") or record.get("instruction")
    if "input" in record and record["input"]:
        value = record["input"]
    if value is None:
        turns = record.get("messages") or record.get("conversations")
        value = next(t.get("content", t.get("value")) for t in turns
                     if t.get("role", t.get("from")) in ("user", "human"))
    if isinstance(value, list):
        value = next(m["content"] for m in value if m["role"] == "user")
    return value


def test_untrainable_examples_are_dropped_and_counted_and_long_ones_truncated(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "hello"}]},  # no assistant turn: nothing to train
            {"messages": [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": QA[0][1]}]},
            {"messages": [{"role": "user", "content": " ".join([QA[2][0]] * 8)},  # the answer falls past the block
                          {"role": "assistant", "content": QA[2][1]}]}]
    (rows, summary), _ = rows_of(tmp_path, chat, "--dataset_test_split", "train", block_size=64)
    train = summary.splits["train"]
    assert (train.examples, train.dropped, train.truncated) == (30, 20, 10)
    assert all(any(label != IGNORE_INDEX for label in r["labels"]) for r in rows["train"])
    assert "20 dropped with no trained token" in summary.describe()


def test_completion_only_loss_false_trains_the_whole_example(tmp_path):
    records, _ = format_cases(tmp_path)["alpaca"]
    (rows, _), _ = rows_of(tmp_path, records, "--completion_only_loss", "false", "--packing", "false")
    assert all(r["labels"][1:] == r["input_ids"][1:] for r in rows["train"])


# --- chat templates: with generation markers (ChatML style) and without (Llama 3 style)
CHATML_WITH_MARKERS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Rewrites earlier assistant turns once a later one follows (as templates that drop earlier reasoning do)
REWRITES_EARLIER_TURNS = (
    "{% for m in messages %}{{ m['role'] + ': ' }}"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ '...' }}{% else %}{{ m['content'] }}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "answer in words."}, {"role": "user", "content": QA[0][0]},
                {"role": "assistant", "content": QA[0][1]}, {"role": "user", "content": QA[1][0]},
                {"role": "assistant", "content": QA[1][1]}]


def tokenizer_with(template: str):
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = template
    return tokenizer


def assistant_spans(tokenizer, ids, mask):
    """The masked tokens, decoded run by run."""
    spans, current = [], []
    for token, on in zip(ids, mask):
        if on:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("template,end_of_turn", [(CHATML_WITH_MARKERS, "<|im_end|>\n"), (LLAMA3_STYLE, "<|eot_id|>")],
                         ids=["chatml_with_markers", "llama3_without_markers"])
def test_assistant_masks_equal_the_assistant_turns_with_and_without_generation_markers(template, end_of_turn):
    tokenizer = tokenizer_with(template)
    conversation = Conversation(CONVERSATION)
    ids, _ = tokenize_example(tokenizer, conversation, True, "--assistant_only_loss")
    mask = assistant_mask(tokenizer, conversation, ids, "--assistant_only_loss")
    assert assistant_spans(tokenizer, ids, mask) == [QA[0][1] + end_of_turn, QA[1][1] + end_of_turn]
    # the same template without its markers: the prefix method gives the same mask
    unmarked = tokenizer_with(template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    assert assistant_mask(unmarked, conversation, ids, "--assistant_only_loss") == mask


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_way_out():
    tokenizer = tokenizer_with(REWRITES_EARLIER_TURNS)
    with pytest.raises(ConfigError, match=r"renders the first 3 message\(s\) differently.*\{% generation %\}.*"
                                          r"--assistant_only_loss false"):
        tokenize_example(tokenizer, Conversation(CONVERSATION), True, "--assistant_only_loss")


def test_a_tokenizer_without_a_chat_template_points_to_the_flag():
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template.*--chat_template PATH"):
        tokenize_example(tokenizer, Conversation(CONVERSATION), True, "--assistant_only_loss")


# --- packing
def test_best_fit_decreasing_fills_bins_without_overflow():
    lengths = [5, 9, 3, 7, 1, 4, 6, 2, 8]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # 45 tokens: the minimum number of 10-token bins


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_examples_get_the_logits_they_get_alone(attn_implementation, tmp_path):
    records = [{"messages": c} for c in chat_conversations(40, seed=3)]
    (rows, _), tokenizer = rows_of(tmp_path, records, "--validation_split_percentage", "10")
    packed = [r for r in rows["train"] if sum(p == 0 for p in r["position_ids"]) >= 2][:2]
    assert packed, "no row holds two examples"
    model = tiny_model(attn_implementation).eval()
    batch = PaddingCollator(tokenizer.eos_token_id)(packed)
    batch.pop("token_counts")
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for b, row in enumerate(packed):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
            for start, end in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row["input_ids"][start:end]]), use_cache=False).logits[0]
                torch.testing.assert_close(together[b, start:end], alone, rtol=1e-5, atol=1e-5)


def test_packing_is_refused_for_an_attention_that_would_mix_the_examples(tmp_path):
    from optimizer_recipes.core.run.run_setup import check_packed_examples_stay_apart

    records = [{"messages": c} for c in chat_conversations(20, seed=3)]
    (rows, _), _ = rows_of(tmp_path, records, "--validation_split_percentage", "10")
    check_packed_examples_stay_apart(tiny_model("sdpa"), rows["train"])  # keeps them apart: accepted
    with pytest.raises(ConfigError, match=r"attention \(flex_attention\) would let them attend to each other; use "
                                          "--packing false"):
        check_packed_examples_stay_apart(tiny_model("flex_attention"), rows["train"])
    (unpacked, _), _ = rows_of(tmp_path, records, "--packing", "false", "--validation_split_percentage", "10")
    check_packed_examples_stay_apart(tiny_model("flex_attention"), unpacked["train"])  # nothing packed: fine
