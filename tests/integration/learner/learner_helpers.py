"""Helpers of the learner tests: real toy trajectories and a minimal real HTTP weight receiver.

The receiver stands in for an actor's `POST /v1/weights` on the learner side (the actor engineer tests the real
actor): it checks the bearer token, the version and the sha256 of the streamed body, and keeps what it got.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request

from actor_service.schema import SHA256_HEADER, VERSION_HEADER
from buffer.schema import Trajectory


def toy_trajectories(
    model_dir: Path, n: int, *, seed: int = 0, policy_version: int = 0, group_size: int = 2
) -> list[Trajectory]:
    """`n` graded trajectories of the toy arithmetic task: prompts tokenized with the model's chat template,
    responses `a+b=c. \\boxed{c}<|im_end|>`, right or wrong at random; reward 1 iff the boxed answer is the gold."""
    from transformers import AutoTokenizer

    from actor_service.schema import DEFAULT_SYSTEM_PROMPT
    from problems.toy import make_toy_task

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    rng = random.Random(seed)
    prompts = make_toy_task((n + group_size - 1) // group_size, seed=seed)
    out = []
    for i in range(n):
        p = prompts[i // group_size]
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *p.messages]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=False)
        expr = p.messages[0]["content"].removeprefix("What is ").removesuffix("?")
        right = rng.random() < 0.5
        answer = p.gold if right else str(int(p.gold) + rng.choice([-10, -1, 1, 10]))
        response = f"{expr}={answer}. \\boxed{{{answer}}}"
        resp_ids = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
        out.append(Trajectory(
            prompt_id=p.prompt_id, group_id=f"{p.prompt_id}-g", prompt_token_ids=prompt_ids,
            response_token_ids=resp_ids, behaviour_logprobs=[-1.0] * len(resp_ids), prompt_text=text,
            response_text=response, reward=1.0 if right else 0.0,
            grade_status="correct" if right else "incorrect", extracted=answer, gold=p.gold,
            data_source=p.data_source, policy_version=policy_version,
        ))
    return out


class WeightReceiver:
    """A real uvicorn server with `POST /v1/weights` that verifies token, version and sha256 like an actor."""

    def __init__(self, port: int, token: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.received: list[dict[str, Any]] = []
        self.version = 0
        app = FastAPI()

        @app.post("/v1/weights")
        async def weights(request: Request) -> dict[str, Any]:
            if request.headers.get("authorization") != f"Bearer {token}":
                raise HTTPException(401, "bad token")
            version = int(request.headers[VERSION_HEADER])
            if version <= self.version:
                raise HTTPException(409, f"version {version} not newer than the current version {self.version}")
            h = hashlib.sha256()
            body = bytearray()
            async for chunk in request.stream():
                h.update(chunk)
                body += chunk
            if h.hexdigest() != request.headers[SHA256_HEADER]:
                raise HTTPException(400, "sha256 mismatch")
            self.version = version
            self.received.append({"version": version, "sha256": h.hexdigest(), "body": bytes(body)})
            return {"policy_version": version, "sha256": h.hexdigest(), "nbytes": len(body), "receive_s": 0.0,
                    "load_s": 0.0}

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("weight receiver did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
