"""Helpers of the actor tests (imported by conftest and test modules): uvicorn in a thread, transformers
references for greedy decoding and log-probs."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving an actor app in a daemon thread on a free loopback port, configured as `python -m
    actor_service` does (actor_service.app.server_config); `stop()` shuts it down."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        from actor_service.app import server_config

        self.port = port or free_port()
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, "warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(120)


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations by transformers `generate` (fp32, no sampling), stopping at eos like vLLM."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=model.config.pad_token_id)[0, len(ids):].tolist()
            eos_ids = eos if isinstance(eos, list) else [eos]
            for i, t in enumerate(seq):
                if t in eos_ids:
                    seq = seq[: i + 1]
                    break
            out.append(seq)
    return out


def hf_logprobs(model_dir: Path, prompt: list[int], response: list[int]) -> list[float]:
    """log pi(a_h | s_h) of each response token by one transformers forward pass (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lp.gather(1, torch.tensor(response)[:, None])[:, 0].tolist()


class FileWrites:
    """Audit-hook watch of file writes (open for writing, rename, mkdir, remove, copy, link) while `watching()`:
    shows that a push writes nothing to disk. One per test module (an audit hook cannot be removed)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._on = threading.Event()
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple) -> None:
        if not self._on.is_set():
            return
        if event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
            self.seen.append(f"open {args[0]} {args[1]}")
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.copyfile", "os.link"):
            self.seen.append(f"{event} {args[0]}")

    @contextlib.contextmanager
    def watching(self) -> Iterator[list[str]]:
        self.seen.clear()
        self._on.set()
        try:
            yield self.seen
        finally:
            self._on.clear()
