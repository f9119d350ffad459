"""verl-format writer and the dataset loader: round trips, real-world column layouts, CHAMP, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from buffer.schema import Prompt
from problems import DatasetError
from problems.champ import load_champ
from problems.files import load_dataset, write_dataset
from problems.toy import make_toy_task


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_write_then_load_round_trips(tmp_path: Path, suffix: str) -> None:
    prompts = make_toy_task(50, seed=2)
    path = tmp_path / f"toy{suffix}"
    write_dataset(prompts, path)
    assert load_dataset(path) == prompts
    assert load_dataset(path, limit=7) == prompts[:7]


def test_parquet_has_the_verl_columns(tmp_path: Path) -> None:
    prompts = make_toy_task(3, seed=0)
    write_dataset(prompts, tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet")
    assert set(table.column_names) >= {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    row = table.to_pylist()[1]
    assert row["prompt"] == prompts[1].messages
    assert row["reward_model"] == {"style": "rule", "ground_truth": prompts[1].gold}
    assert row["data_source"] == "toy_arith"
    assert row["extra_info"]["index"] == 1


def test_dapo_style_verl_file_without_prompt_ids(tmp_path: Path) -> None:
    # DAPO-Math-17k layout: prompt chat list, reward_model struct, extra_info with a non-unique index.
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": f"Solve problem {i}. Answer: $Answer"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(10 + i), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": "same-id"},
        }
        for i in range(4)
    ]
    prompts = load_dataset(write_parquet(tmp_path / "dapo-math-17k.parquet", rows))
    assert [p.gold for p in prompts] == ["10", "11", "12", "13"]
    assert {p.data_source for p in prompts} == {"math_dapo"}
    # Duplicate ids in the file: fall back to row-based ids, still unique.
    assert [p.prompt_id for p in prompts] == [f"dapo-math-17k-{i:06d}" for i in range(4)]


def test_math500_style_problem_answer_columns(tmp_path: Path) -> None:
    rows = [
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{3}$.", "solution": "...", "answer": "\\frac{5}{6}",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "What is $2^{10}$?", "solution": "...", "answer": "1024",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/2.json"},
    ]
    prompts = load_dataset(write_jsonl(tmp_path / "math500.jsonl", rows))
    assert prompts[0].messages == [{"role": "user", "content": rows[0]["problem"]}]
    assert prompts[0].gold == "\\frac{5}{6}"
    assert prompts[1].prompt_id == "test/algebra/2.json"
    assert prompts[1].data_source == "math500"


def test_gsm8k_style_answers_keep_the_final_number(tmp_path: Path) -> None:
    rows = [{"question": "Tom has 3 apples and buys 1,200 more. How many?", "answer": "3+1200=1203\n#### 1,203"}]
    (prompt,) = load_dataset(write_parquet(tmp_path / "gsm8k.parquet", rows))
    assert prompt.gold == "1203"


def test_numeric_answers_and_json_list_files(tmp_path: Path) -> None:
    path = tmp_path / "nums.json"
    path.write_text(json.dumps([{"question": "1+1?", "answer": 2}, {"question": "half?", "answer": 0.5}]))
    assert [p.gold for p in load_dataset(path)] == ["2", "0.5"]


def test_string_prompt_column_is_a_user_turn(tmp_path: Path) -> None:
    rows = [{"prompt": "What is 2+2?", "reward_model": {"ground_truth": "4"}}]
    (p,) = load_dataset(write_jsonl(tmp_path / "s.jsonl", rows))
    assert p.messages == [{"role": "user", "content": "What is 2+2?"}] and p.gold == "4"


def test_load_champ_gives_270_problems_with_answers() -> None:
    problems = load_champ()
    assert len(problems) == 270
    assert len({p.prompt_id for p in problems}) == 270
    assert all(p.gold.strip() and p.messages[0]["content"].strip() for p in problems)
    by_id = {p.prompt_id: p for p in problems}
    assert by_id["P_Combinatorics_1"].gold == "239"
    assert "strings of length 6" in by_id["P_Combinatorics_1"].messages[0]["content"]
    assert all(isinstance(p, Prompt) and p.data_source == "champ" for p in problems)


# ---- bad input: every error names the file/row and what is wrong ----


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope.parquet")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="unsupported file type '.csv'"):
        load_dataset(tmp_path / "x.csv")
    with pytest.raises(DatasetError, match="is a directory"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("name", ["empty.parquet", "empty.jsonl", "empty.json"])
def test_empty_files(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(DatasetError, match="file is empty"):
        load_dataset(tmp_path / name)


def test_files_without_rows(tmp_path: Path) -> None:
    table = pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())})
    pq.write_table(table, tmp_path / "zero.parquet")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(tmp_path / "zero.parquet")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(tmp_path / "blank.jsonl")


def test_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DatasetError, match="not a readable parquet file"):
        load_dataset(tmp_path / "bad.parquet")
    (tmp_path / "bad.jsonl").write_text('{"problem": "x", "answer": "1"}\n{"problem": \n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: invalid JSON"):
        load_dataset(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DatasetError, match="expected a JSON object"):
        load_dataset(tmp_path / "list.jsonl")
    (tmp_path / "obj.json").write_text('{"problem": "x"}')
    with pytest.raises(DatasetError, match="expected a JSON list of objects"):
        load_dataset(tmp_path / "obj.json")


def test_missing_question_column_lists_what_is_there(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "q.parquet", [{"text": "hi", "answer": "1"}])
    with pytest.raises(DatasetError, match=r"row 0: no question column.*columns present: \['answer', 'text'\]"):
        load_dataset(path)


def test_missing_answer_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", [{"problem": "1+1?", "solution": "it is 2"}])
    with pytest.raises(DatasetError, match="no answer column"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"problem": "1+1?", "answer": None}, "column 'answer' must be a string or number, got None"),
        ({"problem": "1+1?", "answer": "  "}, "column 'answer' is empty"),
        ({"problem": "1+1?", "answer": True}, "must be a string or number"),
        ({"problem": "1+1?", "answer": [1, 2]}, "must be a string or number, got list"),
        ({"problem": 12, "answer": "1"}, "column 'problem' must be a non-empty string"),
        ({"problem": "", "answer": "1"}, "column 'problem' must be a non-empty string"),
        ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "'prompt' must be a non-empty list"),
        ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}, "message 0 must have string"),
        ({"prompt": [{"role": "robot", "content": "x"}], "reward_model": {"ground_truth": "1"}}, "unknown role"),
        ({"prompt": [{"role": "system", "content": "x"}], "reward_model": {"ground_truth": "1"}},
         "no non-empty user message"),
        ({"prompt": "2+2?", "reward_model": {"answer": "4"}}, "'reward_model' must be a struct with a 'ground_truth'"),
        ({"prompt": "2+2?", "reward_model": {"ground_truth": {"a": 1}}}, "reward_model.ground_truth"),
        ({"problem": "2+2?", "answer": "4", "data_source": 5}, "'data_source' must be a string"),
    ],
)
def test_wrong_types_are_named_with_file_and_row(tmp_path: Path, row: dict, message: str) -> None:
    good = {"problem": "3+3?", "answer": "6"} if "problem" in row else {
        "prompt": "3+3?", "reward_model": {"ground_truth": "6"}}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, row])
    with pytest.raises(DatasetError, match="rows.jsonl row 1") as info:
        load_dataset(path)
    assert message in str(info.value)


def test_bad_limit_and_empty_write(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    write_dataset(make_toy_task(3), path)
    with pytest.raises(DatasetError, match="limit must be"):
        load_dataset(path, limit=-1)
    with pytest.raises(DatasetError, match="empty dataset"):
        write_dataset([], tmp_path / "e.parquet")
