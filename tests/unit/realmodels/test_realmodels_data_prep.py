"""`tbrm data prepare` on real files: the 270 CHAMP problems exported to JSONL/parquet in several layouts, a
prepared parquet read back by the loader the cluster uses, and bad input through the real CLI (exit code, message)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from actor_service.schema import DEFAULT_SYSTEM_PROMPT
from deploy.cli import app
from deploy.dataset_convert import R1_TEMPLATE, PrepareOptions, prepare, question_of
from problems import DatasetError
from problems.champ import load_champ
from problems.files import load_dataset, write_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def champ() -> list:
    return load_champ()


@pytest.fixture
def champ_jsonl(tmp_path: Path, champ: list) -> Path:
    """CHAMP as a user would have it: one JSON object per line with `problem` and `answer`."""
    path = tmp_path / "champ.jsonl"
    with path.open("w") as f:
        for p in champ:
            f.write(json.dumps({"problem": p.messages[-1]["content"], "answer": p.gold, "id": p.prompt_id}) + "\n")
    return path


def cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["data", "prepare", *args])
    return res.exit_code, res.output


def test_champ_jsonl_to_parquet_with_the_qwen_math_template(tmp_path: Path, champ_jsonl: Path, champ: list) -> None:
    out = tmp_path / "train.parquet"
    code, text = cli(str(champ_jsonl), str(out))
    assert code == 0, text
    assert "rows written" in text and "270" in text
    got = load_dataset(out)  # what `tbrm up` / deploy.prepare read
    assert len(got) == len(champ) == 270
    for p, ref in zip(got, champ, strict=True):
        assert p.messages == [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": ref.messages[-1]["content"].strip()},
        ]
        assert p.gold == ref.gold
    assert len({p.prompt_id for p in got}) == 270
    # verl columns, as verl/TBRM's own trainers expect them
    table = pq.read_table(out)
    assert {"data_source", "prompt", "ability", "reward_model", "extra_info"} <= set(table.column_names)


def test_builtin_champ_source_and_r1_template(tmp_path: Path, champ: list) -> None:
    out = tmp_path / "champ-r1.jsonl"
    rep = prepare("champ", out, PrepareOptions(template="r1"))
    assert rep.read == rep.written == 270 and rep.data_sources == {"champ": 270}
    got = load_dataset(out)
    first = got[0].messages
    assert len(first) == 1 and first[0]["role"] == "user"
    assert first[0]["content"] == R1_TEMPLATE.format(question=champ[0].messages[-1]["content"].strip())
    assert "<think>" in first[0]["content"] and "\\boxed{" in first[0]["content"]


def test_prepared_parquet_round_trips_with_keep(tmp_path: Path, champ_jsonl: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    prepare(champ_jsonl, a)
    prepare(a, b, PrepareOptions(template="keep"))
    assert load_dataset(a) == load_dataset(b)
    # re-templating a prepared file does not stack system turns
    c = tmp_path / "c.parquet"
    prepare(a, c, PrepareOptions(template="qwen-math"))
    assert [p.messages for p in load_dataset(c)] == [p.messages for p in load_dataset(a)]


def test_filters_dedup_shuffle_limit(tmp_path: Path, champ: list) -> None:
    # a verl file with two sources, a duplicated problem and one long question
    rows = [p.model_copy(update={"data_source": "champ_a" if i % 2 else "champ_b"}) for i, p in enumerate(champ[:40])]
    rows.append(rows[0].model_copy(update={"prompt_id": "dup"}))
    src = tmp_path / "verl.parquet"
    write_dataset(rows, src)
    lengths = sorted(len(question_of(p)) for p in rows)
    cut = lengths[len(lengths) // 2]

    rep = prepare(src, tmp_path / "o1.parquet", PrepareOptions(data_sources=["champ_b"]))
    assert rep.dropped_source == 20 and rep.dropped_duplicate == 1 and rep.written == 20
    assert {p.data_source for p in load_dataset(tmp_path / "o1.parquet")} == {"champ_b"}

    rep = prepare(src, tmp_path / "o2.parquet", PrepareOptions(max_prompt_chars=cut))
    kept = load_dataset(tmp_path / "o2.parquet")
    assert rep.dropped_length > 0 and all(len(question_of(p)) <= cut for p in kept)

    o3, o4, o5 = (tmp_path / f"o{i}.parquet" for i in (3, 4, 5))
    prepare(src, o3, PrepareOptions(shuffle_seed=1))
    prepare(src, o4, PrepareOptions(shuffle_seed=1))
    prepare(src, o5, PrepareOptions(shuffle_seed=2, limit=7))
    q3 = [question_of(p) for p in load_dataset(o3)]
    assert q3 == [question_of(p) for p in load_dataset(o4)]  # deterministic
    assert q3 != [question_of(p) for p in rows[:40]] and sorted(q3) == sorted(question_of(p) for p in rows[:40])
    assert len(load_dataset(o5)) == 7

    rep = prepare(src, tmp_path / "o6.parquet", PrepareOptions(dedup=False))
    assert rep.written == 41


def test_named_columns_numbers_and_dapo_wrapper(tmp_path: Path) -> None:
    wrapper = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{q}\n\nRemember to put "
        'your answer on its own line after "Answer:".'
    )
    src = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"Frage": wrapper.format(q="What is 6 times 7?"), "Loesung": 42, "data_source": "dapo"},
        {"Frage": "Compute 1/4 + 1/4.", "Loesung": 0.5, "data_source": "dapo"},
    ]), src)  # fmt: skip
    out = tmp_path / "out.parquet"
    code, text = cli(str(src), str(out), "--question-col", "Frage", "--answer-col", "Loesung")
    assert code == 0, text
    got = load_dataset(out)
    assert [p.gold for p in got] == ["42", "0.5"]
    assert got[0].messages[-1]["content"] == "What is 6 times 7?"  # DAPO's "Answer:" instructions removed
    assert got[1].messages[-1]["content"] == "Compute 1/4 + 1/4."


@pytest.mark.parametrize(
    ("content", "args", "needle"),
    [
        ('{"problem": "1+1?", "answer": "2"}\n', ["--question-col", "question_text"], "'question_text'"),
        ('{"problem": "1+1?", "answer": "2"}\n', ["--answer-col", "final"], "'final'"),
        ('{"query_x": "1+1?", "answer": "2"}\n', [], "no question column"),
        ('{"problem": "1+1?", "sol": "2"}\n', [], "no answer column"),
        ('{"problem": 17, "answer": "2"}\n', [], "'problem' must be a non-empty string"),
        ('{"problem": "1+1?", "answer": ["2"]}\n', [], "'answer' must be a string or number"),
        ('{"problem": "1+1?", "answer": "  "}\n', [], "'answer' is empty"),
        ('{"q": 5, "answer": "2"}\n', ["--question-col", "q"], "'q' must be a non-empty string"),
        ("", [], "file is empty"),
        ("not json\n", [], "invalid JSON"),
        ('{"problem": "1+1?", "answer": "2", "data_source": "a"}\n', ["--data-source", "b"], "no rows left"),
        ('{"problem": "1+1?", "answer": "2"}\n', ["--template", "chatml"], "--template"),
    ],
)
def test_bad_input_exits_nonzero_naming_the_problem(tmp_path: Path, content: str, args: list[str], needle: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    code, text = cli(str(src), str(tmp_path / "out.parquet"), *args)
    assert code != 0
    assert needle in " ".join(text.split()), text
    assert not (tmp_path / "out.parquet").exists()


def test_bad_paths(tmp_path: Path, champ_jsonl: Path) -> None:
    code, text = cli(str(tmp_path / "missing.parquet"), str(tmp_path / "o.parquet"))
    assert code == 2 and "no such file" in text
    code, text = cli(str(champ_jsonl), str(tmp_path / "o.csv"))
    assert code == 2 and ".parquet or .jsonl" in text
    with pytest.raises(DatasetError, match="overwrite the input"):
        prepare(champ_jsonl, champ_jsonl)
    with pytest.raises(DatasetError, match="do not apply"):
        prepare("champ", tmp_path / "o.parquet", PrepareOptions(question_col="x"))
