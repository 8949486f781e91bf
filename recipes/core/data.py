"""Text data: load with `datasets`, tokenize with `.map`, pack into fixed-length blocks (no padding, no waste)."""

from __future__ import annotations

from itertools import chain

import torch
from datasets import Dataset, DatasetDict, load_dataset

from recipes.core import embedded
from recipes.core.config import Config, ConfigError, data_file_builder


def load_raw_datasets(config: Config) -> DatasetDict:
    """Train and validation splits holding `text_column`: a hub id, a local file or folder, or the embedded corpus."""
    d = config.data
    if d.dataset_name is None:
        return DatasetDict(train=Dataset.from_dict({d.text_column: embedded.train_documents()}),
                           validation=Dataset.from_dict({d.text_column: embedded.validation_documents()}))
    builder = data_file_builder(d.dataset_name)
    if builder is not None:
        raw = load_dataset(builder, data_files={"train": d.dataset_name})
    else:
        raw = load_dataset(d.dataset_name, d.dataset_config_name)
    if "train" not in raw:
        raise ConfigError(f"--dataset_name {d.dataset_name} has no 'train' split (it has {', '.join(raw)})")
    if d.text_column not in raw["train"].column_names:
        raise ConfigError(f"--dataset_name {d.dataset_name} has no column {d.text_column!r} (it has "
                          f"{', '.join(raw['train'].column_names)}); pass --text_column <one of those>")
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=d.validation_split_percentage / 100,
                                                 seed=config.train.seed)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
    return DatasetDict(train=raw["train"], validation=raw["validation"])


def tokenize_and_pack(raw: DatasetDict, tokenizer, text_column: str, block_size: int) -> DatasetDict:
    """Each document ends with EOS; the token stream is cut into `block_size` blocks, the remainder dropped."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + eos for x in ids]}

    def pack(batch):
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i:i + block_size] for i in range(0, usable, block_size)]}

    packed = DatasetDict()
    for split, ds in raw.items():
        tokens = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")
        packed[split] = tokens.map(pack, batched=True, batch_size=1000, desc=f"packing {split} into {block_size}")
        if len(packed[split]) == 0:
            raise ConfigError(f"the {split} split has fewer tokens than one block of {block_size}; use more data "
                              "or a smaller --block_size")
    return packed.with_format("torch")


def collate_causal_lm(examples: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack([e["input_ids"] for e in examples])
    return {"input_ids": input_ids, "labels": input_ids.clone()}
