"""The engine for the server: the step loop runs in a background thread, results flow to asyncio streams.

    engine = AsyncLLMEngine(EngineConfig(model=None, device="cpu"))
    await engine.start()
    async for out in engine.generate("req-1", prompt_token_ids, SamplingParams(max_tokens=32)):
        print(out.delta_text, end="")
    await engine.shutdown()

The forward is blocking torch code, so one thread owns the LLMEngine and runs steps while there is work;
new requests and aborts reach it through a locked inbox, outputs go back to each request's asyncio.Queue via
loop.call_soon_threadsafe. An abort (or a consumer that stops iterating, e.g. a disconnected client) frees
the request's slot and blocks before the next step starts.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from .config import EngineConfig
from .llm_engine import LLMEngine, check_priority
from .outputs import EngineStats, RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop failed; the request cannot complete."""


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, model=None, tokenizer=None):
        self.config = config if config is not None else EngineConfig()
        if not isinstance(self.config, EngineConfig):
            raise TypeError(f"AsyncLLMEngine: 'config' must be an EngineConfig, got {type(self.config).__name__}")
        self._model, self._tokenizer = model, tokenizer
        self.engine: LLMEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Condition()
        self._inbox: list[tuple] = []  # ("add", id, tokens, params, priority) | ("abort", id)
        self._streams: dict[str, asyncio.Queue] = {}
        self._stats = EngineStats()
        self._stopping = False

    # ---- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads the model (in a worker thread, so the event loop stays responsive) and starts stepping."""
        if self.engine is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.engine = await asyncio.to_thread(LLMEngine, self.config, self._model, self._tokenizer)
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="kda-engine-step", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stops the step loop; unfinished requests end with finish_reason "abort"."""
        if self._thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        await asyncio.sleep(0)  # let the final outputs the thread scheduled reach their queues

    @property
    def tokenizer(self):
        return self._require().tokenizer

    @property
    def model_name(self) -> str:
        return self._require().model_name

    @property
    def max_model_len(self) -> int:
        return self._require().max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _require(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("AsyncLLMEngine: call 'await engine.start()' first")
        return self.engine

    # ---- requests -----------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids, params: SamplingParams | None = None,
                       priority: int = 0):
        """Streams RequestOutputs of one request until it finishes. Bad arguments raise TypeError/ValueError
        before anything is queued. Stopping the iteration early aborts the request. priority: as in
        LLMEngine.add_request."""
        engine = self._require()
        if not self.is_running:
            raise EngineDeadError("AsyncLLMEngine: the engine is not running")
        params = SamplingParams() if params is None else params
        _check_request(engine, request_id, prompt_token_ids, params)
        check_priority(priority, engine.config.scheduling_policy, "generate")
        if request_id in self._streams:
            raise ValueError(f"generate: 'request_id' {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            if self._stopping:
                raise EngineDeadError("AsyncLLMEngine: the engine is shutting down")
            self._streams[request_id] = queue
            self._inbox.append(("add", request_id, list(prompt_token_ids), params, priority))
            self._wake.notify()
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))

    def abort(self, request_id: str) -> None:
        """Aborts a request (thread-safe). Its stream ends with finish_reason "abort"; its slot and blocks are
        free before the next step."""
        self._post(("abort", request_id))

    def stats(self) -> EngineStats:
        """The latest snapshot (taken after every step and every batch of adds/aborts)."""
        return self._stats

    def _post(self, message: tuple) -> None:
        with self._wake:
            self._inbox.append(message)
            self._wake.notify()

    # ---- the step thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not self._inbox and not engine.has_unfinished_requests() and not self._stopping:
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
            if self._stopping:
                for message in inbox:  # requests that arrived too late to start
                    if message[0] == "add":
                        self._deliver(message[1], RequestOutput(message[1], message[2], [], [], "", "", True, "abort"))
                for out in engine.abort_all():
                    self._deliver(out.request_id, out)
                self._stats = engine.stats()
                return
            for message in inbox:
                self._handle(engine, message)
            if inbox:
                self._stats = engine.stats()
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a failed step must not leave requests hanging
                log.exception("engine step failed; aborting the running requests")
                self._fail_all(engine, exc)
                continue
            self._stats = engine.stats()
            for out in outputs:
                self._deliver(out.request_id, out)

    def _handle(self, engine: LLMEngine, message: tuple) -> None:
        if message[0] == "add":
            _, request_id, tokens, params, priority = message
            try:
                engine.add_request(request_id, tokens, params, priority)
            except (TypeError, ValueError) as exc:
                self._deliver(request_id, exc)
        else:
            out = engine.abort_request(message[1])
            if out is not None:
                self._deliver(message[1], out)

    def _fail_all(self, engine: LLMEngine, exc: Exception) -> None:
        for out in engine.abort_all():
            self._deliver(out.request_id, EngineDeadError(f"engine step failed: {exc!r}"))
        self._stats = engine.stats()

    def _deliver(self, request_id: str, item) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            self._loop.call_soon_threadsafe(queue.put_nowait, item)


def _check_request(engine: LLMEngine, request_id, prompt_token_ids, params) -> None:
    """The checks add_request makes, run in the caller's thread so errors surface at the call."""
    if not isinstance(request_id, str):
        raise TypeError(f"generate: 'request_id' must be a str, got {type(request_id).__name__}")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"generate: 'params' must be SamplingParams, got {type(params).__name__}")
    if not isinstance(prompt_token_ids, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids
    ):
        raise TypeError("generate: 'prompt_token_ids' must be a list of ints")
    if not prompt_token_ids:
        raise ValueError("generate: 'prompt_token_ids' must not be empty")
    if any(not 0 <= t < engine.vocab_size for t in prompt_token_ids):
        raise ValueError(f"generate: 'prompt_token_ids' must lie in the vocabulary [0, {engine.vocab_size})")
    if len(prompt_token_ids) >= engine.max_model_len:
        raise ValueError(
            f"generate: the prompt has {len(prompt_token_ids)} tokens; the limit is {engine.max_model_len - 1}"
        )
