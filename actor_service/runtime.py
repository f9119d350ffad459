"""What the actor's HTTP routes serve (actor_service.app): the engine, the sampling loop, metrics and settings.

`ActorRuntime.start()` builds the vLLM engine unless one was given (tests pass a ready engine so that one vLLM start
serves many apps), warms the canary path, and with `settings.run_loop` starts the sampling loop
(actor_service.loop) in background threads; `stop()` (SIGTERM under uvicorn) stops the loop gracefully (no new
prompts, claims given back, deregistered) and closes an engine it built. Health, status and the read-only
`/v1/generate` are answered from here; weight pushes go to actor_service.weight_receiver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from actor_service.metrics import ActorMetrics
from actor_service.schema import (
    ActorHealth,
    ActorStatus,
    GeneratedSample,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
)
from actor_service.settings import ActorSettings
from actor_service.weight_receiver import WeightReceiver

if TYPE_CHECKING:
    from actor_service.engine import ActorEngine
    from actor_service.loop import ActorLoop


class ActorRuntime:
    """Settings, metrics, the engine (set at start), the sampling loop and the weight receiver of one actor."""

    def __init__(self, settings: ActorSettings, engine: ActorEngine | None = None) -> None:
        self.settings = settings
        self.metrics = ActorMetrics()
        self.engine: ActorEngine | None = engine
        self._own_engine = engine is None
        self.loop: ActorLoop | None = None
        self.receiver = WeightReceiver(settings, self.metrics, self.require_engine)

    # ---- lifecycle ----
    async def start(self) -> None:
        if self.engine is None:
            from actor_service.engine import engine_from_settings

            self.engine = await run_in_threadpool(engine_from_settings, self.settings)
        self.metrics.weight_version.set(self.engine.version)
        self.receiver.warm_canary_in_background(self.engine)
        if self.settings.run_loop:
            from actor_service.loop import ActorLoop

            self.loop = ActorLoop(self.settings, self.engine, self.metrics)
            self.loop.start()
        else:
            self.metrics.state = "serving"

    async def stop(self) -> None:
        if self.loop is not None:
            await run_in_threadpool(self.loop.stop)
        if self._own_engine and self.engine is not None:
            self.engine.close()

    def require_engine(self) -> ActorEngine:
        if self.engine is None:
            raise HTTPException(status_code=503, detail="engine is starting")
        return self.engine

    # ---- views ----
    def health(self) -> ActorHealth:
        eng = self.engine
        return ActorHealth(
            status="ok" if eng is not None else "starting",
            actor_id=self.settings.actor_id,
            policy_version=eng.version if eng is not None else None,
            state=self.metrics.state,
        )

    def status(self) -> ActorStatus:
        eng, m = self.require_engine(), self.metrics
        tok_s, traj_s = m.rates()
        return ActorStatus(
            actor_id=self.settings.actor_id,
            policy_version=eng.version,
            model=str(eng.model_dir),
            state=m.state,
            trajectories=m.total_trajectories,
            tokens_generated=m.total_tokens,
            tokens_per_s=tok_s,
            trajectories_per_s=traj_s,
            last_batch_s=m.last_batch_s,
            last_update_s=m.last_update_s,
            weight_updates=m.total_updates,
            pushes_refused=m.total_refused,
            prompts_in_flight=m.prompts_in_flight,
            loop_enabled=self.settings.run_loop,
            last_error=m.last_error,
        )

    # ---- read-only generation ----
    def check_generate(self, req: GenerateRequest) -> None:
        """422 for a request over this actor's generate limits (before any work)."""
        s = self.settings
        if req.max_tokens > s.generate_max_tokens:
            raise HTTPException(
                status_code=422,
                detail=f"max_tokens={req.max_tokens} exceeds this actor's "
                f"generate_max_tokens={s.generate_max_tokens}",
            )
        if len(req.prompts) * req.n > s.generate_max_samples:
            raise HTTPException(
                status_code=422,
                detail=f"{len(req.prompts)} prompts x n={req.n} exceeds this "
                f"actor's generate_max_samples={s.generate_max_samples}",
            )

    def generate(self, req: GenerateRequest) -> GenerateResponse:
        """`/v1/generate` (blocking: the route runs it in a worker thread)."""
        eng = self.require_engine()
        if req.chat:
            ids = [
                eng.chat_token_ids([{"role": "user", "content": p}], self.settings.system_prompt)
                for p in req.prompts
            ]
        else:
            ids = [eng.text_token_ids(p) for p in req.prompts]
        for i, p in enumerate(ids):
            if not p:
                raise HTTPException(status_code=422, detail=f"prompt {i} is empty after tokenization")
            if not eng.fits(p):
                raise HTTPException(
                    status_code=422,
                    detail=f"prompt {i} has {len(p)} tokens; max_model_len is {eng.max_model_len}",
                )
        gen = eng.generate(
            ids,
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_tokens,
            seed=req.seed,
        )
        results = [
            GenerateResult(
                prompt_token_ids=p,
                samples=[
                    GeneratedSample(
                        text=s.text,
                        token_ids=s.token_ids,
                        finish_reason=s.finish_reason,
                        logprobs=s.logprobs if req.logprobs else None,
                    )
                    for s in group
                ],
            )
            for p, group in zip(ids, gen.samples, strict=True)
        ]
        return GenerateResponse(policy_version=gen.version_start, results=results, latency_s=gen.latency_s)
