"""CLI of the real-model-on-CPU workflow: `tbrm sft`, `tbrm data toy` and `tbrm model from-run`.

Registered on the main `tbrm` app by `register(app, data_app, model_app)` (deploy/cli.py); implementations live in
deploy/sft.py (warm-up) and here (small file helpers). README "Real model on CPU" shows the whole sequence.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import typer


def sft(
    model: str = typer.Argument(..., help="HF model folder to warm up (e.g. .cache/smollm2-135m-instruct)."),
    out: str = typer.Argument(..., help="Folder to write the warmed-up model to."),
    data: str = typer.Option(..., "--data", help="Training prompts (parquet/jsonl, e.g. from `tbrm data toy`)."),
    test: str = typer.Option(None, "--test", help="Held-out prompts for the before/after greedy accuracy."),
    targets: str = typer.Option("self", "--targets", help="self (RFT on own correct answers) or gold (templated)."),
    system_prompt: str = typer.Option("", "--system-prompt", help="System turn used to sample, train and evaluate."),
    stop_at_accuracy: float = typer.Option(None, "--stop-at-accuracy", min=0.01, max=1.0,
                                           help="gold: stop at this held-out teacher-forced exact match."),
    check_every: int = typer.Option(5, "--check-every", min=1, help="Steps between those checks."),
    prompts: int = typer.Option(400, "--prompts", min=1, help="Training prompts to sample answers for."),
    samples: int = typer.Option(4, "--samples", min=1, help="Answers sampled per prompt."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="Sampling temperature."),
    max_tokens: int = typer.Option(48, "--max-tokens", min=1, help="Most new tokens per answer."),
    keep_per_prompt: int = typer.Option(1, "--keep-per-prompt", min=1, help="Correct answers kept per prompt."),
    epochs: float = typer.Option(2.0, "--epochs", min=0.01, help="Passes over the kept answers."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    lr: float = typer.Option(1e-5, "--lr", min=0.0),
    autocast: str = typer.Option("auto", "--autocast", help="auto (bfloat16 where the CPU/GPU runs it natively), bfloat16 or none."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch/OpenMP threads."),
    eval_size: int = typer.Option(100, "--eval-size", min=0, help="Held-out prompts evaluated before and after."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Warm-up before RL: rejection-sampling fine-tuning on the model's own correct answers (deploy/sft.py)."""
    from rich.console import Console

    from deploy.sft import SftOptions, run_sft
    from problems import DatasetError
    from problems.files import load_dataset

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console(soft_wrap=True)
    if targets not in ("self", "gold"):
        raise typer.BadParameter(f"--targets must be self or gold, got {targets!r}")
    if autocast not in ("auto", "bfloat16", "none"):
        raise typer.BadParameter(f"--autocast must be auto, bfloat16 or none, got {autocast!r}")
    try:
        train = load_dataset(data)
        held_out = load_dataset(test) if test else []
    except (DatasetError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from e
    opts = SftOptions(
        targets=targets, system_prompt=system_prompt, stop_at_accuracy=stop_at_accuracy, check_every=check_every,
        prompts=prompts, samples=samples, temperature=temperature, max_tokens=max_tokens,
        keep_per_prompt=keep_per_prompt, epochs=epochs, batch_size=batch_size, lr=lr, autocast=autocast,
        threads=threads, eval_size=eval_size if held_out else 0, eval_max_tokens=max_tokens, seed=seed,
    )
    try:
        report = run_sft(model, out, train, held_out, opts)
    except RuntimeError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from e
    console.print(json.dumps(report.model_dump(), indent=2), highlight=False)
    if report.accuracy_before is not None:
        console.print(
            f"held-out greedy accuracy: {100 * report.accuracy_before:.1f} -> {100 * (report.accuracy_after or 0):.1f}"
            f" on {report.eval_n} problems (warm-up gain, before any RL); model: {out}",
            highlight=False,
        )


def data_toy(
    out_dir: str = typer.Argument(..., help="Folder for train.parquet and test.parquet (verl format)."),
    digits: int = typer.Option(1, "--digits", min=1, max=9, help="Operand digits (1: operands 0..9)."),
    ops: str = typer.Option("+-*", "--ops", help="Operators, a subset of +-*."),
    n_train: int = typer.Option(20000, "--n-train", min=1, help="Training problems (repeats when the space is small)."),
    n_test: int = typer.Option(100, "--n-test", min=1, help="Held-out problems (never in the training split)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write the toy arithmetic task's disjoint train/test splits as verl parquet: the same problems `tbrm up` uses
    with `[run] dataset = "toy"` and the same toy_digits/toy_ops/toy_*_size/data_seed."""
    from problems import DatasetError
    from problems.files import write_dataset
    from problems.toy import toy_splits

    try:
        train, test = toy_splits(n_train, n_test, digits=digits, ops=ops, seed=seed)
    except DatasetError as e:
        raise typer.BadParameter(str(e)) from e
    out = Path(out_dir)
    write_dataset(train, out / "train.parquet")
    write_dataset(test, out / "test.parquet")
    print(f"{out / 'train.parquet'}: {len(train)} problems; {out / 'test.parquet'}: {len(test)} held-out problems")


def model_from_run(
    run_dir: str = typer.Argument(..., help="A `tbrm up` run directory."),
    out: str = typer.Argument(..., help="HF folder to write (config and tokenizer from the run's model)."),
) -> None:
    """The run's last exported weights as an HF folder, for `tbrm eval` (learner/weights/policy-v<N>.safetensors)."""
    from deploy.run_config import load_toml

    rd = Path(run_dir)
    # `tbrm up` puts the learner's exports under <run>/learner/weights; a bare learner run dir has weights/
    found = [*(rd / "learner" / "weights").glob("policy-v*.safetensors"), *(rd / "weights").glob("policy-v*.safetensors")]
    files = sorted(found, key=lambda p: int(p.stem.split("-v")[-1]))
    if not files:
        raise typer.BadParameter(f"{rd}/learner/weights and {rd}/weights hold no policy-v*.safetensors")
    base = Path(load_toml(rd / "config.toml").get("learner", {}).get("model_path", ""))
    if not (base / "config.json").exists():
        raise typer.BadParameter(f"the run's model_path {base} is not an HF folder (run from the same directory)")
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".json.index")):
            shutil.copy2(f, dest / f.name)
    shutil.copy2(files[-1], dest / "model.safetensors")
    print(f"{dest}: {files[-1].name} with {base}'s config and tokenizer")


def register(app: typer.Typer, data_app: typer.Typer, model_app: typer.Typer) -> None:
    """Add the commands to the `tbrm` CLI (one call in deploy/cli.py)."""
    app.command("sft")(sft)
    data_app.command("toy")(data_toy)
    model_app.command("from-run")(model_from_run)
