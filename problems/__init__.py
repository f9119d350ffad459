"""Where the math problems come from: each loader returns `buffer.schema.Prompt` records (user-turn chat messages
+ gold answer), the unit the prompt queue holds; nothing here knows about tokenizers.

- `problems.toy`: the synthetic arithmetic task (`make_toy_task`, disjoint `toy_splits`).
- `problems.files`: dataset files: the verl/TBRM parquet format (read and write), MATH-500, GSM8K, DAPO-Math-17k
  and other question/answer column pairs, as parquet, JSONL or a JSON list.
- `problems.champ`: the 270 CHAMP competition problems (evaluation).

Light: standard library + pydantic + pyarrow; imports only `buffer.schema` and `common`.
"""


class DatasetError(ValueError):
    """A dataset file or generator argument is unusable; the message names the file/row and the problem."""
