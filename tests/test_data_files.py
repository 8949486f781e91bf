"""Data as users have it: broken files get one line naming the file and line; bad rows name the split and row.

Every stop is exit status 2, one line on stderr (no traceback), before any model loads, with nothing written to
--output_dir.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from optimizer_recipes.core.data.files import check_data_files
from optimizer_recipes.core.data.loading import build_datasets, load_raw_datasets
from optimizer_recipes.core.models.sources import load_tokenizer
from optimizer_recipes.core.optimizers.protocol import all_recipes
from optimizer_recipes.core.run.config import parse_config

from tests.conftest import REPO, offline_env, run_here

ADAMW = next(r for r in all_recipes() if r.name == "adamw")
GOOD = {"messages": [{"role": "user", "content": "what is two plus two?"},
                     {"role": "assistant", "content": "two plus two is four."}]}


def jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def assert_stops_with(proc, out, *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("adamw: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]  # besides it, at most the data set's progress bars
    assert "Traceback" not in proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())


def run(tmp_path, data: str, *flags: str):
    out = tmp_path / "out"
    return run_here("adamw", "--dataset_name", data, "--max_steps", "2", "--per_device_train_batch_size", "2",
                    "--output_dir", str(out), *flags, check=False), out


@pytest.mark.parametrize("case", ["corrupt line", "cut-off last line", "empty file", "mixed columns", "not an object",
                                  "csv fields", "not parquet", "empty folder"])
def test_a_file_that_cannot_be_read_gets_one_line_naming_file_and_line(case, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    if case == "corrupt line":
        data, expected = jsonl(folder / "d.jsonl", [GOOD, "{not json", GOOD]), ["d.jsonl: line 2 is not JSON"]
    elif case == "cut-off last line":
        data = str(folder / "d.jsonl")
        (folder / "d.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:30])
        expected = ["d.jsonl: line 2, the last, is cut off", "write it again, or delete the line"]
    elif case == "empty file":
        data, expected = jsonl(folder / "d.jsonl", []), ["d.jsonl: is empty"]
    elif case == "mixed columns":
        data = jsonl(folder / "d.jsonl", [GOOD, GOOD, {"prompt": "a", "completion": "b"}])
        expected = ["d.jsonl: line 3 has the columns completion, prompt, the lines before it messages"]
    elif case == "not an object":
        data, expected = jsonl(folder / "d.jsonl", [GOOD, "[1, 2]"]), ["line 2 is a JSON list, expected an object"]
    elif case == "csv fields":
        data = str(folder / "d.csv")
        (folder / "d.csv").write_text("text\nfirst document\nsecond, with a comma\n")
        expected = ["d.csv: line 3 has 2 fields, the header (text) 1; quote fields that hold commas"]
    elif case == "not parquet":
        data = str(folder / "d.parquet")
        (folder / "d.parquet").write_bytes(b"not a parquet file")
        expected = ["d.parquet: cannot be read as Parquet"]
    else:
        (folder / "notes.md").write_text("no data here")
        data, expected = str(folder), ["the folder holds no data file"]
    proc, out = run(tmp_path, data)
    assert_stops_with(proc, out, *expected)


def test_a_broken_file_is_refused_by_the_script_as_users_run_it(tmp_path):
    """`python recipes/adamw.py --dataset_name FILE`, in its own process: exit status 2 and the one line."""
    data = jsonl(tmp_path / "d.jsonl", [GOOD, "{not json"] + [GOOD] * 8)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "adamw.py"), "--dataset_name", data, "--max_steps",
                           "2", "--output_dir", str(out)], cwd=REPO, env=offline_env(), capture_output=True, text=True,
                          timeout=300)
    assert_stops_with(proc, out, "d.jsonl: line 2 is not JSON")


def tokenized(data: str, tmp_path):
    config = parse_config(ADAMW, ["--dataset_name", data, "--output_dir", str(tmp_path / "unused")])
    rows, summary = build_datasets(load_raw_datasets(config), load_tokenizer(config), config, 64)
    return rows, summary


def test_content_parts_train_the_same_tokens_as_strings(tmp_path):
    """OpenAI-style content: a list of {"type": "text"} parts is its text, joined in order."""
    parts = [{"messages": [{"role": "system", "content": [{"type": "text", "text": "answer "},
                                                          {"type": "text", "text": "in words."}]},
                           {"role": "user", "content": [{"type": "text", "text": f"what is {i} plus one?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": f"{i} plus one is "},
                                                             {"type": "text", "text": f"{i + 1}."}]}]}
             for i in range(40)]
    strings = [{"messages": [{"role": "system", "content": "answer in words."},
                             {"role": "user", "content": f"what is {i} plus one?"},
                             {"role": "assistant", "content": f"{i} plus one is {i + 1}."}]} for i in range(40)]
    with_parts, _ = tokenized(jsonl(tmp_path / "parts.jsonl", parts), tmp_path)
    with_strings, _ = tokenized(jsonl(tmp_path / "strings.jsonl", strings), tmp_path)
    for split in ("train", "validation"):
        assert with_parts[split]["input_ids"] == with_strings[split]["input_ids"]
        assert with_parts[split]["labels"] == with_strings[split]["labels"]


def test_columns_some_rows_leave_out_are_read_as_missing(tmp_path):
    """Alpaca's optional input, or an id on some rows: datasets fills the gaps with null, and they train as if left
    out (only the columns that make a format must be in every row)."""
    sparse = [{"instruction": f"add one to {i}", "output": f"{i + 1}", **({"input": "in words"} if i % 3 else {}),
               **({"id": i} if i % 2 else {})} for i in range(40)]
    full = [{"instruction": f"add one to {i}", "output": f"{i + 1}", "input": "in words" if i % 3 else "",
             "id": i} for i in range(40)]
    check_data_files(jsonl(tmp_path / "sparse.jsonl", sparse))  # what a run checks first: no error
    with_gaps, _ = tokenized(str(tmp_path / "sparse.jsonl"), tmp_path)
    without, _ = tokenized(jsonl(tmp_path / "full.jsonl", full), tmp_path)
    for split in ("train", "validation"):
        assert with_gaps[split]["input_ids"] == without[split]["input_ids"]
        assert with_gaps[split]["labels"] == without[split]["labels"]


BAD_ROWS = {
    "messages not a list": ({"messages": "user: hi"}, "'messages' is a string, expected a list of {role, content}"),
    "null content": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
                     "'messages' message 2 (assistant) has no content (null), expected a string or a list of text "
                     "parts"),
    "non-text part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                    {"role": "assistant", "content": "a cat."}]},
                      "'messages' message 1 (user) has a content part of type 'image_url'"),
    "tool call": ({"messages": [{"role": "user", "content": "weather?"},
                                {"role": "assistant", "content": "", "tool_calls": [{"name": "weather"}]},
                                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "sunny."}]},
                  "'messages' message 2 (assistant) is a tool call or its result"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_stops_the_run_naming_split_row_and_column(case, tmp_path):
    bad, expected = BAD_ROWS[case]
    data = jsonl(tmp_path / "d.jsonl", [GOOD] * 30 + [bad] + [GOOD] * 30)  # line 31
    proc, out = run(tmp_path, data, "--validation_split_percentage", "1")
    assert_stops_with(proc, out, "row 31: " + expected, "--on_bad_rows skip")


def test_on_bad_rows_skip_leaves_them_out_and_counts_them(tmp_path):
    rows = [GOOD] * 30 + [BAD_ROWS["null content"][0], BAD_ROWS["non-text part"][0]] + [GOOD] * 30
    proc, out = run(tmp_path, jsonl(tmp_path / "d.jsonl", rows), "--on_bad_rows", "skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 bad rows skipped (--on_bad_rows skip; " in proc.stdout
    summary = yaml.safe_load((out / "run_config.yaml").read_text())["data_summary"]["splits"]
    assert summary["train"]["bad_rows_skipped"] + summary["validation"]["bad_rows_skipped"] == 2
    assert summary["train"]["examples"] + summary["validation"]["examples"] == 60


def test_rows_of_a_cached_hub_data_set_get_the_same_checks(tmp_path):
    """A data set that `load_dataset` reads by name (here a local folder, as a cached hub data set is read): the
    per-row checks name the split and row all the same."""
    folder = tmp_path / "hub_like"
    folder.mkdir()
    jsonl(folder / "train.jsonl", [GOOD] * 10 + [BAD_ROWS["messages not a list"][0]])
    jsonl(folder / "validation.jsonl", [GOOD] * 4)
    proc, out = run(tmp_path, str(folder))
    assert_stops_with(proc, out, "train row 11: 'messages' is a string")
