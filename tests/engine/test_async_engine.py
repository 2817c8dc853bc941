"""AsyncLLMEngine: streaming, many concurrent requests through few slots, aborts, disconnects, shutdown."""

import asyncio
import time

import pytest

from kda_serving.engine import AsyncLLMEngine, EngineConfig, SamplingParams

from engine_testing import random_prompts


SCHEDULING = {}


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async-scheduling"])
def scheduling(request, monkeypatch):
    """Every test twice: with steps read back at once, and with asynchronous scheduling (deferred tokens)."""
    monkeypatch.setitem(SCHEDULING, "async_scheduling", request.param)


def config(**kw):
    kw.update(SCHEDULING)
    kw.setdefault("max_num_seqs", 16)
    kw.setdefault("num_state_slots", 4)
    kw.setdefault("num_kv_blocks", 96)
    kw.setdefault("prefix_cache_interval", 64)
    return EngineConfig(**kw)


async def collect(engine, request_id, prompt, params):
    return [out async for out in engine.generate(request_id, prompt, params)]


async def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_streaming_outputs_add_up(tiny_model):
    async def main():
        engine = AsyncLLMEngine(config(), model=tiny_model)
        await engine.start()
        outs = await collect(engine, "a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5, logprobs=1))
        await engine.shutdown()
        return engine, outs

    engine, outs = asyncio.run(main())
    final = outs[-1]
    assert final.finished and final.finish_reason in ("length", "stop") and not any(o.finished for o in outs[:-1])
    assert [t for o in outs for t in o.new_token_ids] == final.output_token_ids
    assert all(len(o.logprobs) == len(o.new_token_ids) for o in outs)
    assert engine.max_model_len == 96 * 16 and engine.model_name == "kda-serving-tiny"


def test_many_concurrent_requests_queue_and_all_complete(tiny_model):
    prompts = random_prompts([1 + (i * 37) % 90 for i in range(24)], 211, seed=20)

    async def main():
        engine = AsyncLLMEngine(config(max_num_batched_tokens=64), model=tiny_model)
        await engine.start()
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        results = await asyncio.gather(*(collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts)))
        await wait_for(lambda: engine.stats().num_running == 0)
        stats = engine.stats()
        await engine.shutdown()
        return results, stats

    results, stats = asyncio.run(main())
    assert all(r[-1].finished and len(r[-1].output_token_ids) == 4 for r in results)
    assert stats.state_slots_used == 0 and stats.kv_blocks_used == 0 and stats.num_waiting == 0
    assert stats.requests_finished_total == 24 and stats.generation_tokens_total == 96


def test_abort_and_disconnect_free_the_request(tiny_model):
    async def main():
        engine = AsyncLLMEngine(config(enable_prefix_caching=False), model=tiny_model)
        await engine.start()
        long = SamplingParams(max_tokens=10_000, ignore_eos=True)
        # explicit abort: the stream ends with finish_reason "abort"
        stream = engine.generate("a", [3, 4, 5], long)
        first = await stream.__anext__()
        engine.abort("a")
        rest = [o async for o in stream]
        assert not first.finished and rest[-1].finish_reason == "abort"
        # a consumer that goes away (closing the stream) aborts too
        stream = engine.generate("b", [3, 4, 5], long)
        await stream.__anext__()
        await stream.aclose()
        await wait_for(lambda: engine.stats().state_slots_used == 0 and engine.stats().num_running == 0)
        # a cancelled consumer task (a disconnected HTTP client) as well
        task = asyncio.create_task(collect(engine, "c", [3, 4, 5], long))
        await wait_for(lambda: engine.stats().num_running == 1)
        task.cancel()
        await wait_for(lambda: engine.stats().num_running == 0)
        stats = engine.stats()
        await engine.shutdown()
        return stats

    stats = asyncio.run(main())
    assert stats.requests_aborted_total == 3 and stats.kv_blocks_used == 0 and stats.state_slots_used == 0


def test_bad_requests_raise_and_engine_keeps_serving(tiny_model):
    async def main():
        engine = AsyncLLMEngine(config(), model=tiny_model)
        with pytest.raises(RuntimeError, match="start"):
            await collect(engine, "x", [3], SamplingParams())
        await engine.start()
        with pytest.raises(ValueError, match="empty"):
            await collect(engine, "x", [], SamplingParams())
        with pytest.raises(ValueError, match="limit"):
            await collect(engine, "x", [3] * 5000, SamplingParams())
        with pytest.raises(TypeError, match="params"):
            await collect(engine, "x", [3], {"max_tokens": 3})
        with pytest.raises(ValueError, match="scheduling_policy"):  # a priority on a first-come engine
            _ = [out async for out in engine.generate("x", [3], SamplingParams(), priority=2)]
        outs = await collect(engine, "ok", [3, 4], SamplingParams(max_tokens=2, ignore_eos=True))
        await engine.shutdown()
        return outs

    assert asyncio.run(main())[-1].finished


def test_shutdown_ends_open_streams(tiny_model):
    async def main():
        engine = AsyncLLMEngine(config(), model=tiny_model)
        await engine.start()
        stream = engine.generate("a", [3, 4], SamplingParams(max_tokens=10_000, ignore_eos=True))
        await stream.__anext__()
        await engine.shutdown()
        return [o async for o in stream]

    rest = asyncio.run(main())
    assert rest[-1].finished and rest[-1].finish_reason == "abort"


def test_priority_requests_through_the_async_engine(tiny_model):
    """One slot, a long low-priority stream running: a high-priority request queued behind it preempts it,
    and both streams still end with their full output."""
    async def main():
        engine = AsyncLLMEngine(config(num_state_slots=1, max_num_seqs=1, enable_prefix_caching=False,
                                       scheduling_policy="priority"), model=tiny_model)
        await engine.start()
        long = asyncio.create_task(collect_priority(engine, "low", [5, 6, 7], 40, priority=3))
        await wait_for(lambda: engine.stats().num_running == 1)
        urgent = await collect_priority(engine, "urgent", [8, 9], 3, priority=0)
        low = await long
        await engine.shutdown()
        return urgent, low, engine.stats()

    urgent, low, stats = asyncio.run(main())
    assert len(urgent[-1].output_token_ids) == 3 and len(low[-1].output_token_ids) == 40
    assert stats.num_preemptions_total >= 1


async def collect_priority(engine, request_id, prompt, max_tokens, priority):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [out async for out in engine.generate(request_id, prompt, params, priority=priority)]
