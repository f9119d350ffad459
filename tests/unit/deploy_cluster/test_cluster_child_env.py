"""What the processes of a local run inherit from the shell that started `tbrm up`."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from deploy.local_services import DIST_LAUNCHER_ENV, base_env
from learner.engine import ensure_single_process_env


def test_torch_distributed_launcher_variables_are_not_inherited(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    # The calling process holds a rendezvous port (as a notebook or test process with a live process group does):
    # a learner that inherited MASTER_PORT would fail to bind it on every restart.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        monkeypatch.setenv("MASTER_PORT", str(held.getsockname()[1]))
        for k, v in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2",
                     "MASTER_ADDR": "10.0.0.1"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("TBRM_SOME_SETTING", "kept")
        env = base_env("token", {}, tmp_path)
    assert not set(DIST_LAUNCHER_ENV) & set(env)
    assert env["TBRM_SOME_SETTING"] == "kept"
    assert env["DS_ACCELERATOR"] and env["TORCH_EXTENSIONS_DIR"]  # the rest of the base environment is there


def test_the_learner_picks_its_own_rendezvous_port_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in DIST_LAUNCHER_ENV:  # set, then removed: the undo then also removes what the learner sets
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    ensure_single_process_env()
    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as s:  # free: the learner can listen there
        s.bind(("127.0.0.1", port))
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
