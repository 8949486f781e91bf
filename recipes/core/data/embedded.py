"""The embedded default: a tiny Llama, its tokenizer and a generated corpus, so a recipe trains with no network.

The tokenizer and model config live in `recipes/embedded_default/` and load with `from_pretrained` like any local
folder. The corpus is generated here, deterministically, from a small grammar: enough structure that the loss falls
visibly within a few dozen steps. `python -m optimizer_recipes.core.data.embedded` rebuilds the folder from this code.
"""

from __future__ import annotations

import random
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "embedded_default"
VOCAB_SIZE = 512
EOS = "<|endoftext|>"
# role line, content, EOS as the end of every turn; assistant turns (with their EOS) marked for the loss mask
CHAT_TEMPLATE = """{%- for message in messages -%}
{{- message['role'] + '\\n' -}}
{%- if message['role'] == 'assistant' -%}
{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}
{%- else -%}
{{- message['content'] + eos_token -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'assistant\\n' -}}{%- endif -%}
"""

_NAMES = ["anna", "ben", "carla", "dev", "emil", "fatima", "george", "hana", "ivan", "jun", "kofi", "lena"]
_ANIMALS = ["fox", "dog", "cat", "owl", "horse", "rabbit", "bear", "crow", "goat", "otter"]
_ADJECTIVES = ["quick", "lazy", "red", "small", "old", "clever", "quiet", "brave", "sleepy", "green"]
_VERBS = ["sees", "follows", "feeds", "paints", "finds", "helps", "watches", "calls"]
_PLACES = ["the river", "the market", "the old mill", "the forest", "the station", "the garden"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return (f"the {rng.choice(_ADJECTIVES)} {rng.choice(_ANIMALS)} {rng.choice(_VERBS)} "
                f"the {rng.choice(_ADJECTIVES)} {rng.choice(_ANIMALS)} near {rng.choice(_PLACES)}.")
    if kind == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]} is {_NUMBER_WORDS[a + b]}."
    if kind == 2:
        name = rng.choice(_NAMES)
        return f"{name} {rng.choice(_VERBS)} a {rng.choice(_ANIMALS)} at {rng.choice(_PLACES)}, and {name} is happy."
    start = rng.randrange(len(_NUMBER_WORDS) - 4)
    return "counting: " + ", ".join(_NUMBER_WORDS[start:start + 4]) + "."


def generate_corpus(num_documents: int, seed: int) -> list[str]:
    """Documents of 3-6 sentences each, the same for the same seed on every machine."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(num_documents)]


def train_documents() -> list[str]:
    return generate_corpus(num_documents=400, seed=0)


def validation_documents() -> list[str]:
    return generate_corpus(num_documents=40, seed=1)


def _question_and_answer(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        return (f"what is {_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]}?",
                f"{_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]} is {_NUMBER_WORDS[a + b]}.")
    if kind == 1:
        start = rng.randrange(len(_NUMBER_WORDS) - 4)
        return f"count from {_NUMBER_WORDS[start]}.", ", ".join(_NUMBER_WORDS[start:start + 4]) + "."
    name, animal, place = rng.choice(_NAMES), rng.choice(_ANIMALS), rng.choice(_PLACES)
    return f"where does {name} see the {animal}?", f"{name} sees the {animal} at {place}."


def chat_conversations(num_conversations: int, seed: int) -> list[list[dict]]:
    """Conversations of 1-2 question/answer turns, a third with a system message: the chat data of the tests and of
    `--chat_out`."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(num_conversations):
        messages = [{"role": "system", "content": "answer in words."}] if rng.random() < 1 / 3 else []
        for _ in range(rng.randint(1, 2)):
            question, answer = _question_and_answer(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append(messages)
    return conversations


def alpaca_examples(num_examples: int, seed: int) -> list[dict]:
    """instruction / input / output records (input empty for half of them)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(num_examples):
        question, answer = _question_and_answer(rng)
        if rng.random() < 0.5:
            examples.append({"instruction": question, "input": "", "output": answer})
        else:
            examples.append({"instruction": "answer the question in words.", "input": question, "output": answer})
    return examples


def build_tokenizer_and_config(out_dir: Path = EMBEDDED_DIR) -> None:
    """Train the byte-level BPE tokenizer on the corpus and write it with the model config to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_documents(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False,
    ).save_pretrained(out_dir)


def write_scaled_model(out_dir: Path, seed: int = 0, **config_overrides) -> Path:
    """A randomly initialised model of the embedded architecture with other sizes, saved with the embedded tokenizer
    (a local folder that from_pretrained loads), e.g. hidden_size=512, num_hidden_layers=8."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(EMBEDDED_DIR)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"LlamaConfig has no field {key!r}")
        setattr(config, key, type(getattr(config, key))(value))
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(EMBEDDED_DIR).save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Rebuild the embedded tokenizer and config, or (--scaled_out) write "
                                     "a randomly initialised model of the same architecture at other sizes.")
    parser.add_argument("--scaled_out", default=None, help="folder for the scaled model (from_pretrained loads it)")
    parser.add_argument("--sizes", default="", help="LlamaConfig fields, e.g. hidden_size=512,num_hidden_layers=8")
    parser.add_argument("--chat_out", default=None, help="write a chat data set (messages, .jsonl) to this file")
    parser.add_argument("--alpaca_out", default=None, help="write an Alpaca data set (.jsonl) to this file")
    parser.add_argument("--num_examples", type=int, default=2000, help="examples in --chat_out / --alpaca_out")
    args = parser.parse_args()
    if args.chat_out or args.alpaca_out:
        import json

        for path, records in ((args.chat_out, [{"messages": m} for m in chat_conversations(args.num_examples, 0)]),
                              (args.alpaca_out, alpaca_examples(args.num_examples, 0))):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
                print(f"wrote {len(records)} examples to {path}")
    elif args.scaled_out:
        overrides = dict(item.split("=") for item in args.sizes.split(",") if item)
        print(f"wrote {write_scaled_model(Path(args.scaled_out), **overrides)}")
    else:
        build_tokenizer_and_config()
        print(f"wrote {EMBEDDED_DIR}")
