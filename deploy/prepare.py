"""What a cluster needs before its services train: the resolved config, the model, the prompt queue. The one home
of these steps: `tbrm up` calls `ensure_model` / `load_prompts` / `load_queue` in-process (deploy/launcher.py);
containerized runs (compose `prepare` service, Kubernetes init container and Job) run this module once, since no
launcher process exists there:
1. resolve the run TOML exactly as the launcher does (`deploy.run_config.resolve`: `[table]` copied into the
   buffer/actor/learner sections, `[run]` shortcuts applied) and write it where every service reads it
   (`TBRM_RUN_CONFIG`);
2. build the toy model when the run uses it (no `actor.model_dir`, or no `learner.model_path`: `uses_toy_model`),
   once, before any replica starts (replicas building it concurrently would race on the shared volume);
3. load the training prompts into the Redis prompt queue, unless the queue already holds some (a restarted
   cluster keeps its queue and position).

    python -m deploy.prepare --source /etc/tbrm/run.toml --out /var/lib/tbrm/config/run.toml

Unlike `tbrm up --config FILE`, the source is used as the whole config (not merged over configs/toy.toml): a GPU
config must not silently inherit the toy's tiny context length. Heavy imports (transformers for the toy model)
happen only in step 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy import topology
from deploy.run_config import RunSection, dump_toml, resolve

log = logging.getLogger("tbrm.prepare")


def apply_thread_counts(run: RunSection, data: dict[str, Any]) -> None:
    """`[run]` thread counts as the learner's and the actors' defaults (a section's own setting wins), as both
    `tbrm up` and the containers write them into the resolved config."""
    data["learner"].setdefault("torch_threads", run.learner_threads)
    data["actor"].setdefault("vllm_threads", run.actor_threads)


def resolve_to(source: Path, out: Path) -> tuple[RunSection, dict[str, Any]]:
    """Resolve `source` and write the result to `out` atomically (readers never see a half-written file)."""
    run, data = resolve(config_file=source, base_file=None)
    apply_thread_counts(run, data)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".run-", suffix=".toml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dump_toml(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return run, data


def uses_toy_model(config: dict[str, Any]) -> bool:
    """True when the actor or the learner falls back to the toy model (`$TBRM_HOME/models/toy`)."""
    return not config.get("actor", {}).get("model_dir") or not config.get("learner", {}).get("model_path")


def warmup_system_prompt(model_dir: Path) -> str | None:
    """The system prompt recorded by the toy model's warm-up (None for other models)."""
    try:
        report = json.loads((Path(model_dir) / "warmup.json").read_text())
    except (OSError, ValueError):
        return None
    prompt = report.get("system_prompt")
    return prompt if isinstance(prompt, str) else None


def ensure_model(config: dict[str, Any], say: Callable[[str], None] = log.info) -> None:
    """Build the toy model if a service falls back to it (`uses_toy_model`; services would otherwise race to build
    it), and give the actors the system prompt their model was warmed up with (a toy model answers garbage under
    another one). `say` reports a first (slow) build."""
    from common.files import toy_model_dir
    from deploy.toy_model import TOY_SYSTEM_PROMPT, ensure_toy_model

    actor = config["actor"]
    toy_dir: Path | None = None
    if uses_toy_model(config):
        if not (toy_model_dir() / "config.json").exists():
            say(f"building the toy model in {toy_model_dir()} (once; a few minutes) ...")
        t = time.monotonic()
        toy_dir = ensure_toy_model()
        if time.monotonic() - t > 2:
            say(f"toy model ready ({time.monotonic() - t:.0f} s)")
    if actor.get("model_dir"):
        prompt = warmup_system_prompt(Path(actor["model_dir"]))
    else:
        prompt = (warmup_system_prompt(toy_dir) if toy_dir else None) or TOY_SYSTEM_PROMPT
    if prompt is not None:
        actor.setdefault("system_prompt", prompt)


def load_prompts(run: RunSection) -> tuple[list[Any], list[Any]]:
    """(train, held-out) prompts of the run (`run.dataset` / `run.test_dataset`: "toy" or a file)."""
    from problems.files import load_dataset
    from problems.toy import toy_splits

    train: list[Any] = []
    test: list[Any] = []
    if run.dataset == "toy" or run.test_dataset == "toy":
        train, test = toy_splits(
            run.toy_train_size, run.toy_test_size, digits=run.toy_digits, ops=run.toy_ops, seed=run.data_seed
        )
    if run.dataset != "toy":
        train = load_dataset(run.dataset)
    if run.test_dataset != "toy":
        test = load_dataset(run.test_dataset)
    return train, test


def load_queue(run: RunSection, config: dict[str, Any], redis_url: str, train: list[Any] | None = None) -> int:
    """Load the run's training prompts (`train`, else read by `load_prompts`) into the actors' prompt queue; 0 (and
    nothing loaded) if it already holds a dataset."""
    from buffer.client import PromptQueue, connect

    r = connect(redis_url)
    try:
        queue = PromptQueue(r, config.get("actor", {}).get("prompt_queue", "train"))
        if queue.loaded():  # even with every prompt handed out or claimed: a resumed run keeps its epochs
            log.info("prompt queue already holds a dataset (%d prompts queued): not reloading", queue.size())
            return 0
        train = load_prompts(run)[0] if train is None else train
        n = queue.load(train, epochs=run.epochs, shuffle_seed=run.data_seed, if_empty=True)
        log.info("loaded %d training prompts (%d epochs) into the queue", n, run.epochs)
        return n
    finally:
        r.close()


def prepare_cluster(run: RunSection, data: dict[str, Any], redis_url: str, *, model: bool, prompts: bool) -> None:
    """Steps 2 and 3 of the module docstring (toy model if used, prompt queue if empty)."""
    if model and uses_toy_model(data):
        from deploy.toy_model import ensure_toy_model  # transformers: heavy

        log.info("toy model ready at %s", ensure_toy_model())
    if prompts:
        load_queue(run, data, redis_url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=Path(topology.CONTAINER_RUN_CONFIG_SOURCE),
                   help="run TOML as written by the user (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path(topology.CONTAINER_RUN_CONFIG),
                   help="where the resolved config goes; services read it as TBRM_RUN_CONFIG (default: %(default)s)")
    p.add_argument("--redis-url", default=os.environ.get(topology.ENV_REDIS_URL, "redis://127.0.0.1:6379/0"),
                   help="Redis of the prompt queue (default: $TBRM_REDIS_URL)")  # fmt: skip
    p.add_argument("--config-only", action="store_true", help="only resolve the config (no model, no prompts)")
    p.add_argument("--skip-model", action="store_true", help="do not build the toy model")
    p.add_argument("--skip-prompts", action="store_true", help="do not load the prompt queue")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="touch this file when everything is done (for pods that wait on a shared volume)")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run, data = resolve_to(args.source, args.out)
    except ValueError as e:
        log.error("%s", e)
        return 2
    log.info("resolved %s -> %s", args.source, args.out)
    if not args.config_only:
        prepare_cluster(run, data, args.redis_url, model=not args.skip_model, prompts=not args.skip_prompts)
    if args.ready_file is not None:
        args.ready_file.parent.mkdir(parents=True, exist_ok=True)
        args.ready_file.touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
