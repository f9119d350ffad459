import typer

app = typer.Typer()


# ---- tbrm up / tbrm eval (cluster engineer; implementations in deploy/launcher.py and deploy/evaluation.py) ----


@app.command("up")
def up(
    actors: int = typer.Option(None, "--actors", min=1, help="Actor processes (default: the config's run.actors)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Stop after this many learner steps."),
    minutes: float = typer.Option(None, "--minutes", min=0.05, help="Time budget in minutes (default 5)."),
    config: str = typer.Option(None, "--config", help="Run TOML merged over configs/toy.toml."),
    run_dir: str = typer.Option(None, "--run-dir", help="Run directory (default: a new folder under runs/)."),
    sync: bool = typer.Option(None, "--sync/--async", help="Synchronous baseline (actors wait for new weights)."),
    loss: str = typer.Option(None, "--loss", help="Objective: tbrm or grpo (default: the config's)."),
    no_dashboard: bool = typer.Option(False, "--no-dashboard", help="Plain progress lines instead of the live view."),
) -> None:
    """Run the whole cluster locally (redis, reward, buffer API, actors, learner) and train the toy model."""
    import logging

    from deploy.launcher import run_cluster
    from deploy.run_config import resolve
    from deploy.run_dir import RunDir, default_run_dir

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    over: dict = {}
    for key, value in (("actors", actors), ("steps", steps), ("minutes", minutes), ("sync", sync), ("loss", loss)):
        if value is not None:
            over[key] = value
    if loss is not None and loss not in ("tbrm", "grpo"):
        raise typer.BadParameter(f"--loss must be tbrm or grpo, got {loss!r}")
    if steps is not None and minutes is None:
        over["minutes"] = 60.0  # a step budget alone: the time limit only guards against a stuck run
    try:
        run, cfg = resolve(config, {"run": over} if over else None)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    rd = RunDir(run_dir or default_run_dir())
    raise typer.Exit(run_cluster(run, cfg, rd, dashboard=not no_dashboard))


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="HF model folder."),
    data: str = typer.Argument(..., help="Dataset file (parquet/jsonl/json) or 'toy' (the toy test split)."),
    k: int = typer.Option(1, "--k", min=1, help="Also report avg@k with k samples per prompt."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature of the avg@k samples."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate the first N prompts only."),
    output: str = typer.Option(None, "--output", help="Write the result as JSON to this file."),
) -> None:
    """Greedy accuracy (and avg@k) of MODEL on DATA, graded with the reward service's grader."""
    from pathlib import Path

    from rich.console import Console

    from buffer.data import load_dataset, toy_splits
    from deploy.evaluation import eval_model

    prompts = toy_splits()[1] if data == "toy" else load_dataset(data)
    prompts = prompts[:limit] if limit else prompts
    res = eval_model(model, prompts, k=k, temperature=temperature, max_tokens=max_tokens)
    console = Console()
    line = f"{model} on {data} ({res.n} prompts): greedy accuracy {res.accuracy:.3f}"
    if res.avg_at_k is not None:
        line += f", avg@{k} {res.avg_at_k:.3f}"
    console.print(line, highlight=False)
    if output:
        Path(output).write_text(res.model_dump_json(indent=2))
