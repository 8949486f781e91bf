"""Training data: load with `datasets`, detect the format, tokenize (answers-only labels), pack or pad into rows.

The format modules: `data_formats` (which columns mean what), `chat_masks` (rendering and which tokens are
trained), `packing` (rows and batches). This module runs them over the splits and says what it did, once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from datasets import Dataset, DatasetDict, load_dataset
from optimizer_recipes.core.data import embedded
from optimizer_recipes.core.data.chat_masks import IGNORE_INDEX, tokenize_example
from optimizer_recipes.core.data.formats import (
    ANSWER_ONLY_FLAG,
    RowError,
    conversation_of,
    detect_format,
    trains_on_answers_only,
)
from optimizer_recipes.core.data.packing import concatenate_into_blocks, pack_examples
from optimizer_recipes.core.run.config import Config, ConfigError, data_file_builder

ROW_NUMBER = "_row_number"  # a column added to every split: each row's 1-based position as loaded


def load_raw_datasets(config: Config) -> DatasetDict:
    """Train and validation splits: a hub id, a local file or folder, or the embedded corpus."""
    d = config.data
    if d.dataset_name is None:
        return DatasetDict(train=with_row_numbers(Dataset.from_dict({d.text_column: embedded.train_documents()})),
                           validation=with_row_numbers(Dataset.from_dict(
                               {d.text_column: embedded.validation_documents()})))
    builder = data_file_builder(d.dataset_name)
    if builder is not None:
        raw = load_dataset(builder, data_files={d.dataset_train_split: d.dataset_name})
    else:
        raw = load_dataset(d.dataset_name, d.dataset_config_name)
    if d.dataset_train_split not in raw:
        raise ConfigError(f"--dataset_name {d.dataset_name} has no {d.dataset_train_split!r} split (it has "
                          f"{', '.join(raw)}); pass --dataset_train_split <one of those>")
    test_split = d.dataset_test_split or ("validation" if "validation" in raw else None)
    if d.dataset_test_split and d.dataset_test_split not in raw:
        raise ConfigError(f"--dataset_test_split {d.dataset_test_split}: --dataset_name {d.dataset_name} has no such "
                          f"split (it has {', '.join(raw)}); drop the flag to hold out "
                          f"{d.validation_split_percentage}% of train")
    train = with_row_numbers(raw[d.dataset_train_split])
    if test_split is None and d.validation_split_percentage == 0:  # --eval_strategy no: train on every row
        return DatasetDict(train=train, validation=train.select([]))
    if test_split is None:
        held_out = train.train_test_split(test_size=d.validation_split_percentage / 100, seed=config.train.seed)
        return DatasetDict(train=held_out["train"], validation=held_out["test"])
    return DatasetDict(train=train, validation=with_row_numbers(raw[test_split]))


def with_row_numbers(ds: Dataset) -> Dataset:
    """Each row's 1-based position in its split as loaded (the line of a JSON Lines file), kept through the
    held-out split so that a data error names the row the user can find."""
    return ds.add_column(ROW_NUMBER, list(range(1, len(ds) + 1)))


@dataclass
class SplitSummary:
    examples: int
    truncated: int  # examples longer than the block, cut to it (their start kept)
    dropped: int  # examples without a single trained token (after truncation), left out
    rows: int
    tokens: int
    trained_tokens: int
    bad_rows_skipped: int = 0  # rows the data format cannot use, dropped by --on_bad_rows skip


@dataclass
class DataSummary:
    data_format: str
    loss_on: str
    packing: str
    splits: dict[str, SplitSummary]

    def describe(self) -> str:
        train = self.splits["train"]
        skipped = sum(split.bad_rows_skipped for split in self.splits.values())
        bad = (f"{skipped:,} bad rows skipped (--on_bad_rows skip; "
               + ", ".join(f"{name} {split.bad_rows_skipped:,}" for name, split in self.splits.items()) + "); "
               if skipped else "")
        return (f"data: {self.data_format}, loss on {self.loss_on}; {bad}train: {train.examples:,} examples -> "
                f"{train.rows:,} rows ({self.packing}), {train.truncated:,} truncated to the block, {train.dropped:,} "
                f"dropped with no trained token, {train.trained_tokens / max(train.tokens, 1):.0%} of "
                f"{train.tokens:,} tokens trained; validation: {self.splits['validation'].rows:,} rows")

    def to_dict(self) -> dict:
        return asdict(self)


def build_datasets(raw: DatasetDict, tokenizer, config: Config, block_size: int) -> tuple[DatasetDict, DataSummary]:
    """Rows of `input_ids` and `labels` (IGNORE_INDEX off the loss), plus `position_ids` when examples are packed."""
    d = config.data
    columns = [c for c in raw["train"].column_names if c != ROW_NUMBER]
    data_format = detect_format(columns, d.dataset_format, d.text_column,
                                d.dataset_name or "(embedded corpus)")
    answers_only = trains_on_answers_only(data_format, d)
    loss_flag = f"--{ANSWER_ONLY_FLAG.get(data_format)}"
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize_one(example: dict) -> tuple[list[int], list[int]]:
        if data_format == "text":
            text = example[d.text_column]
            if not isinstance(text, str):
                raise RowError(f"'{d.text_column}' is {'null' if text is None else type(text).__name__}, expected "
                               "a string")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            return ids, list(ids)
        return tokenize_example(tokenizer, conversation_of(example, data_format), answers_only, loss_flag)

    def tokenize(batch, split: str):
        out = {"input_ids": [], "labels": [], "bad_row": []}
        for values in zip(*batch.values()):
            example = dict(zip(batch, values))
            bad = False
            try:
                ids, labels = tokenize_one(example)
            except RowError as error:
                if d.on_bad_rows == "error":
                    raise ConfigError(f"{split} row {example[ROW_NUMBER]}: {error}; fix or drop the row, or pass "
                                      "--on_bad_rows skip to leave out rows like it (and count them)") from None
                ids, labels, bad = [], [], True
            except ConfigError as error:  # not the row's fault (e.g. the template), but say where it showed
                raise ConfigError(f"{split} row {example[ROW_NUMBER]}: {error}") from None
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["bad_row"].append(bad)  # (a row that tokenizes to nothing is dropped later, as untrainable)
        return out

    def truncate(batch):  # keep the start (the prompt and the beginning of the answer)
        return {"truncated": [len(ids) > block_size for ids in batch["input_ids"]],
                "input_ids": [ids[:block_size] for ids in batch["input_ids"]],
                "labels": [labels[:block_size] for labels in batch["labels"]]}

    def has_trained_token(batch):
        return [any(label != IGNORE_INDEX for label in labels[1:]) for labels in batch["labels"]]

    rows, splits = DatasetDict(), {}
    for split, ds in raw.items():
        if len(ds) == 0:  # no held-out data (--eval_strategy no): nothing to tokenize
            rows[split] = Dataset.from_dict({"input_ids": [], "labels": []})
            splits[split] = SplitSummary(0, 0, 0, 0, 0, 0)
            continue
        tokens = ds.map(tokenize, batched=True, remove_columns=ds.column_names, fn_kwargs={"split": split},
                        desc=f"tokenizing {split}")
        bad = sum(tokens["bad_row"])
        tokens = (tokens.filter(lambda rows: [not b for b in rows], input_columns="bad_row", batched=True,
                                desc=f"leaving out bad {split} rows") if bad else tokens).remove_columns("bad_row")
        if data_format == "text" and d.packing:
            rows[split] = tokens.map(concatenate_into_blocks, batched=True, batch_size=1000,
                                     fn_kwargs={"block_size": block_size}, desc=f"packing {split}")
            truncated = dropped = 0
        else:
            tokens = tokens.map(truncate, batched=True, desc=f"truncating {split} to {block_size}")
            truncated = sum(tokens["truncated"])
            kept = tokens.filter(has_trained_token, batched=True, desc=f"dropping untrainable {split} examples")
            dropped = len(tokens) - len(kept)
            kept = kept.remove_columns("truncated")
            rows[split] = (kept.map(pack_examples, batched=True, batch_size=1000, remove_columns=kept.column_names,
                                    fn_kwargs={"block_size": block_size}, desc=f"packing {split}")
                           if d.packing else kept)
        if len(rows[split]) == 0:
            raise ConfigError(f"the {split} split gives no training rows (fewer tokens than one block of "
                              f"{block_size}, or no example with a trained token); use more data or a smaller "
                              "--block_size")
        lengths = [len(ids) for ids in rows[split]["input_ids"]]
        trained = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in rows[split]["labels"])
        splits[split] = SplitSummary(len(ds) - bad, truncated, dropped, len(rows[split]), sum(lengths), trained, bad)
    packing = (f"{block_size}-token blocks of the token stream" if data_format == "text" and d.packing
               else f"whole examples packed into {block_size}-token rows" if d.packing
               else "one example per row, padded per batch")
    loss_on = ("every token" if not answers_only
               else "the assistant turns" if data_format == "messages" else "the completions")
    return rows, DataSummary(data_format, loss_on, packing, splits)
