"""The run config of `tbrm up`: one TOML for the whole cluster, resolved once and written into the run directory.

Sections (docs/operations.md#configuration):
- `[run]`     the launcher itself (this module's `RunSection`): actors, budget, evaluation, dataset, threads.
- `[table]`   the replay table, copied into `[buffer.table]`, `[actor.table]` and `[learner.table]` unless those are
              given (the three must agree, so it is written once).
- `[reward]`, `[buffer]`, `[actor]`, `[learner]`: each service's settings with the same field names as its
  pydantic-settings class (`TBRM_<SERVICE>_*` env vars still override them inside the service).

Resolution: `configs/toy.toml` (the default toy run) <- `--config FILE` (deep-merged) <- CLI flags and dotted
overrides (`tbrm up learner.lr=3e-5 actor.temperature=1.0`, or `--learner.lr 3e-5`: `parse_overrides`, built on
pydantic-settings' CLI over one model whose fields are the sections' settings classes, so every setting of every
service can be given and `tbrm settings` documents them all). The result is written to `<run_dir>/config.toml` and
every service gets `TBRM_RUN_CONFIG=<run_dir>/config.toml`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter

from deploy.supervisor import RestartPolicy

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "toy.toml"
SERVICE_SECTIONS = ("reward", "buffer", "actor", "learner")


class RunSection(BaseModel):
    """`[run]`: how the launcher runs the cluster (not read by any service)."""

    model_config = ConfigDict(extra="forbid")

    actors: int = Field(default=1, ge=1, le=64)
    """Actor processes (each one vLLM engine). On 2 cores one actor + the learner measured best."""
    minutes: float | None = Field(default=5.0, gt=0)
    """Time budget from the first service start to the end of training (None = no limit, then `steps` must be
    set). The one-time toy-model build on first use is not counted; the final evaluation and shutdown follow."""
    steps: int | None = Field(default=None, ge=1)
    """Stop after this many learner steps (None = until the time budget ends)."""
    sync: bool = False
    """Synchronous baseline: actors generate only with the newest weights and the learner waits for them."""

    # ---- data ----
    dataset: str = "toy"
    """Training prompts: "toy" (the arithmetic task's train split) or a dataset file (parquet/jsonl)."""
    test_dataset: str = "toy"
    """Held-out prompts: "toy" (the test split, disjoint from train) or a dataset file."""
    toy_train_size: int = Field(default=20_000, ge=1)
    toy_test_size: int = Field(default=200, ge=1)
    toy_digits: int = Field(default=2, ge=1, le=9)
    toy_ops: str = "+-"
    data_seed: int = 0
    epochs: int = Field(default=3, ge=1)
    """Passes over the training prompts loaded into the queue (the run stops on its budget, not on data)."""

    # ---- held-out evaluation ----
    eval_interval_s: float = Field(default=30.0, gt=0)
    """Seconds between held-out evaluations during training (plus one at start and one at the end)."""
    eval_size: int | None = Field(default=None, ge=1)
    """Evaluate on the first N held-out prompts (None = all)."""
    eval_max_tokens: int = Field(default=48, ge=1)
    """Most new tokens per greedy answer."""
    eval_timeout_s: float = Field(default=120.0, gt=0)
    target_gain_points: float = 40.0
    """The run reports whether held-out accuracy rose by at least this many points."""

    # ---- processes ----
    actor_threads: int = Field(default=1, ge=1)
    """OpenMP/torch threads of each actor's vLLM engine."""
    learner_threads: int = Field(default=1, ge=1)
    """torch threads of the learner."""
    vllm_cpu_bind: str = "nobind"
    """VLLM_CPU_OMP_THREADS_BIND for the actors ("nobind": leave placement to the OS on a shared machine;
    "auto" lets vLLM pin its threads itself; or a CPU list like "0")."""
    ports: Literal["default", "free"] = "default"
    """"default": the documented ports (Redis 6379, reward 8001, buffer 8002, learner 8003, actor i 8100 + i) where
    free, else free ones; "free": OS-assigned free ports for every service (several runs on one machine, tests)."""
    health_timeout_s: float = Field(default=300.0, gt=0)
    """How long a heavy service (actor, learner) may take to answer /health (first DeepSpeed start compiles)."""
    stop_timeout_s: float = Field(default=30.0, gt=0)
    """Grace period between SIGTERM and SIGKILL when stopping a service."""
    poll_interval_s: float = Field(default=1.0, gt=0)
    """Dashboard and metrics refresh period."""
    final_sync_timeout_s: float = Field(default=30.0, gt=0)
    """At the end, wait this long for the actors to load the learner's last weights before the final eval."""
    loss: Literal["tbrm", "grpo", "keep"] = "keep"
    """Shortcut for `--loss`: replace `[learner.loss]` with the named objective ("keep" = as configured)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers (learner/tracking.py): TensorBoard event files in `<run_dir>/tensorboard` (default),
    W&B and MLflow offline in the run directory (optional packages: `pip install "tbrm[wandb]"` / `"tbrm[mlflow]"`);
    [] = only the JSONL files. Also the learner's `report_to` unless `[learner]` sets its own."""
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    """`[run.restart]`: a service that dies is restarted with back-off up to a crash-loop limit
    (`deploy/supervisor.py`); mode = "no" ends the run at the first crash instead."""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins key by key, recursively; a tagged value (a dict with `kind`) of another kind replaces the whole
    base value (a constant schedule must not inherit the toy's cosine fields)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict) and "kind" in v and v["kind"] != old.get("kind"):
            out[k] = copy.deepcopy(v)
        elif isinstance(v, dict) and isinstance(old, dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ValueError(f"config file {p} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {p} is not valid TOML: {e}") from e


def resolve(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base_file: str | Path | None = DEFAULT_CONFIG,
) -> tuple[RunSection, dict[str, Any]]:
    """Defaults <- config file <- overrides (nested dicts like `{"run": {"actors": 2}}`).

    Returns the validated `[run]` section and the full config dict as the services will read it (the `[table]`
    section distributed into each service section, `[run].loss` applied to `[learner.loss]`)."""
    data: dict[str, Any] = load_toml(base_file) if base_file and Path(base_file).exists() else {}
    if config_file is not None:
        data = deep_merge(data, load_toml(config_file))
    if overrides:
        data = deep_merge(data, overrides)
    unknown = sorted(set(data) - {"run", "table", *SERVICE_SECTIONS})
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; known: run, table, {', '.join(SERVICE_SECTIONS)}")
    run = RunSection.model_validate(data.get("run", {}))
    for sec in SERVICE_SECTIONS:
        data.setdefault(sec, {})
    table = data.get("table")
    if table:
        for sec in ("buffer", "actor", "learner"):
            data[sec]["table"] = deep_merge(table, data[sec].get("table", {}))
    if run.loss != "keep":
        current = data["learner"].get("loss", {})
        if current.get("kind", "tbrm") != run.loss:
            data["learner"]["loss"] = {"kind": run.loss}
    _shape_batches(run, data)
    if run.steps is not None:
        data["learner"]["max_steps"] = run.steps
    if run.minutes is None and run.steps is None:
        raise ValueError("set a budget: run.minutes or run.steps (--minutes / --steps)")
    data["run"] = run.model_dump(mode="json", exclude_none=True)
    return run, data


def setting(data: dict[str, Any], section: str, name: str) -> Any:
    """`[section] name` of the config, else the default of that section's settings class (never a guess)."""
    if name in data.get(section, {}):
        return data[section][name]
    return section_classes()[section].model_fields[name].get_default(call_default_factory=True)


def _loss(data: dict[str, Any]) -> Any:
    """The run's learner loss as the learner's typed config (its default when the run sets none)."""
    spec = section_classes()["learner"].model_fields["loss"]
    raw = data["learner"].get("loss")
    return spec.get_default(call_default_factory=True) if raw is None else (
        TypeAdapter(spec.rebuild_annotation()).validate_python(raw))


def _shape_batches(run: RunSection, data: dict[str, Any]) -> None:
    """Actor batch shapes that the objective and the mode need (GRPO / centered TBRM groups, sync batches)."""
    actor = data["actor"]
    if _loss(data).needs_groups and setting(data, "actor", "n_samples_per_prompt") < 2:
        # GRPO and centered TBRM compare the samples of one prompt: groups of 1 carry no signal.
        # Keep the trajectories per step, split as prompts x 4 samples (4 x 4 measured best for the toy).
        per_batch = setting(data, "actor", "prompts_per_batch") * setting(data, "actor", "n_samples_per_prompt")
        actor["n_samples_per_prompt"] = 4
        actor["prompts_per_batch"] = max(1, per_batch // 4)
    if run.sync:
        data["learner"]["sync"] = True
        actor["sync"] = True
        # Sync trains only on the current version: an actor batch larger than one learner batch would be mostly
        # discarded after the first step. Generate one learner batch per version (fair baseline, no waste by design).
        n = setting(data, "actor", "n_samples_per_prompt")
        batch = setting(data, "learner", "batch_size")
        if setting(data, "actor", "prompts_per_batch") * n > batch:
            actor["prompts_per_batch"] = max(1, batch // n)


def table_config(config: dict[str, Any]) -> Any:
    """The replay table of a resolved config (`[buffer.table]`, else `[table]`) as a `buffer.schema.TableConfig`."""
    from buffer.schema import TableConfig

    table = config.get("buffer", {}).get("table") or config.get("table") or {}
    return TableConfig.model_validate(table)


def resolve_up(config: str | None, flags: dict[str, Any], tokens: list[str]) -> tuple[RunSection, dict[str, Any]]:
    """`tbrm up`'s config: defaults <- `config` <- the named flags (`{"actors": 2, ...}`, None = not given) <- dotted
    overrides (`tokens`, typed and validated against the settings classes). Raises ValueError."""
    over: dict[str, Any] = {"run": {k: v for k, v in flags.items() if v is not None}}
    if flags.get("steps") is not None and flags.get("minutes") is None:
        over["run"]["minutes"] = 60.0  # a step budget alone: the time limit only guards against a stuck run
    raw = parse_overrides(tokens)
    if raw:
        base = load_toml(DEFAULT_CONFIG)
        base = deep_merge(base, load_toml(config)) if config else base
        over = deep_merge(over, typed_overrides(raw, deep_merge(base, over)))
    return resolve(config, over)


# ---- dotted overrides of any setting (`tbrm up learner.lr=3e-5 --actor.temperature 1.0`) ----

_KEY_VALUE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")


def section_classes() -> dict[str, type[BaseModel]]:
    """The settings class of each run TOML section (all light modules: pydantic only)."""
    from actor_service.settings import ActorSettings
    from buffer.schema import TableConfig
    from buffer.settings import BufferSettings
    from learner.settings import LearnerSettings
    from reward.settings import RewardSettings

    return {"run": RunSection, "table": TableConfig, "reward": RewardSettings, "buffer": BufferSettings,
            "actor": ActorSettings, "learner": LearnerSettings}  # fmt: skip


def overrides_parser(prog: str = "tbrm up") -> tuple[argparse.ArgumentParser, Any]:
    """pydantic-settings' CLI over one model with a field per section: `--<section>.<field>[.<sub>] VALUE`
    (kebab or snake case), nested models also as JSON, booleans as `--x.flag` / `--no-x.flag`; `--help` lists every
    setting of every service with its documentation."""
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

    from common.settings import cli_source

    classes = section_classes()
    fields: dict[str, Any] = {name: (cls | None, None) for name, cls in classes.items()}

    class Sections(BaseSettings):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, *args: Any, **kw: Any
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings,)  # the command line only: never the environment

    from pydantic import create_model

    model = create_model("RunOverrides", __base__=Sections, **fields)
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} [OPTIONS] [SECTION.FIELD=VALUE | --SECTION.FIELD VALUE ...]",
        description="Override any setting of the run config: SECTION.FIELD=VALUE or --SECTION.FIELD VALUE "
        "(nested: learner.loss.beta=0.02, table.rate_limiter.error_buffer=200; JSON for a whole model: "
        "learner.schedule='{\"kind\": \"constant\"}'). Sections: run (the launcher), table (the replay table, "
        "copied into buffer, actor and learner), reward, buffer, actor, learner.",
    )  # fmt: skip
    return parser, cli_source(model, parser)


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """Command-line overrides -> nested dict of raw values ({"learner": {"lr": "3e-5"}}). `a.b=c` tokens are read as
    `--a.b=c`. An unknown setting exits with argparse's message (status 2), like any bad flag."""
    if not tokens:
        return {}
    argv = [_flag(t) for t in tokens]
    parser, source = overrides_parser()
    args = parser.parse_args(argv)
    return _empty_lists({k: v for k, v in source(parsed_args=args)().items() if v is not None})


def _empty_lists(d: dict[str, Any]) -> dict[str, Any]:
    """pydantic-settings' CLI reads an empty list `[]` as `[""]`; no setting takes a list of one empty string."""
    return {k: _empty_lists(v) if isinstance(v, dict) else [] if v == [""] else v for k, v in d.items()}


def _flag(token: str) -> str:
    """`a.b_c=v` -> `--a.b-c=v`, `--a.b_c` -> `--a.b-c` (snake or kebab case); values are left alone."""
    if _KEY_VALUE.match(token):
        token = "--" + token
    if not token.startswith("--"):
        return token
    name, sep, value = token.partition("=")
    return name.replace("_", "-") + sep + value


def typed_overrides(raw: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """`raw` (strings from the command line) with every value converted to its setting's type: each section is
    validated merged over `base` (defaults <- config file), so a bad value is a ValueError naming the field."""
    from pydantic import ValidationError

    classes = section_classes()
    out: dict[str, Any] = {}
    for section, values in raw.items():
        merged = deep_merge(base.get(section, {}), values)
        try:
            model = classes[section].model_validate(merged)
        except ValidationError as e:
            raise ValueError(f"[{section}] override {values}: {e}") from e
        out[section] = _pick(model, values)
    return out


def _pick(model: BaseModel, values: dict[str, Any]) -> dict[str, Any]:
    """The validated values of exactly the keys given in `values` (recursively), as TOML-writable data."""
    out: dict[str, Any] = {}
    for key, given in values.items():
        value = getattr(model, key)
        if isinstance(given, dict) and isinstance(value, BaseModel) and not _replaces(given, value):
            out[key] = _pick(value, given)
        else:
            out[key] = _plain(value)
    return out


def _replaces(given: dict[str, Any], value: BaseModel) -> bool:
    """A tagged model given with its `kind` is written whole (deep_merge replaces it when the kind changes)."""
    return "kind" in given and hasattr(value, "kind")


def _plain(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return {k: _plain(x) for k, x in v if x is not None}
    if isinstance(v, SecretStr):
        return v.get_secret_value()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ---- a small TOML writer (the stdlib reads TOML but cannot write it) ----


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise ValueError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_scalar(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"cannot write {type(v).__name__} to TOML: {v!r}")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def dump_toml(data: dict[str, Any]) -> str:
    """TOML text for nested dicts of scalars/lists (None values are left out: TOML has no null)."""
    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        subs = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_key(k)} = {_scalar(v)}")
        if prefix or scalars:
            lines.append("")
        for k, v in subs.items():
            table(f"{prefix}.{_key(k)}" if prefix else _key(k), v)

    table("", data)
    return "\n".join(lines).rstrip() + "\n"
