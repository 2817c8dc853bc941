"""The engine's CUDA-graph decode steps (engine/cuda_graphs.py): the bucket arithmetic (plain Python, on the
CPU) and, on the GPU, an engine serving through its graphs. Graph steps against the same steps run eagerly:
tests/model/test_decode_graphs.py.
"""

from __future__ import annotations

import pytest
import torch

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams
from kda_serving.engine.cuda_graphs import MIN_KV_BUCKET, batch_bucket, kv_bucket


def test_batch_bucket_is_the_next_power_of_two_capped():
    assert [batch_bucket(n, 48) for n in (1, 2, 3, 4, 5, 17, 32, 33, 48)] == [1, 2, 4, 4, 8, 32, 32, 48, 48]
    for bad in (0, 49):
        with pytest.raises(ValueError):
            batch_bucket(bad, 48)


def test_kv_bucket_covers_the_longest_sequence():
    assert kv_bucket(1, 16, 1 << 20) == MIN_KV_BUCKET
    assert kv_bucket(513, 16, 1 << 20) == 640  # quarter-octave steps: 512, 640, 768, 896, 1024, 1280, ...
    assert kv_bucket(4096, 16, 1 << 20) == 4096
    assert kv_bucket(16448, 16, 1 << 20) == 20480
    assert kv_bucket(7000, 16, 6000) == 6000  # capped at the model length in whole blocks
    for n in range(1, 70000, 37):
        b = kv_bucket(n, 16, 1 << 20)
        assert n <= b <= max(MIN_KV_BUCKET, 5 * n / 4 + 16) and b % 16 == 0


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_engine_decodes_through_graphs(state_dtype):
    """The engine replays graphs for its decode steps and produces the requested tokens (fp32 or bf16 KDA
    states: the bf16 pools take the decode kernel's bf16 fast path inside the graph)."""
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=8, num_state_slots=16, num_kv_blocks=64,
                                    kda_state_dtype=state_dtype))
    assert engine.runner.caches.recurrent[0].dtype == getattr(torch, state_dtype)
    graphs = engine.runner.graphs
    assert graphs is not None and set(graphs.graphs) == {(nb, 1, MIN_KV_BUCKET) for nb in (1, 2, 4, 8)}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, n in enumerate((9, 30, 4)):
        engine.add_request(str(i), list(range(5, 5 + n)), params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert sorted(finished) == ["0", "1", "2"]
    assert all(len(o.output_token_ids) == 12 for o in finished.values())
    assert len(graphs.graphs) == 4  # every step fit a graph captured at start-up


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_engine_verifies_drafts_through_graphs(state_dtype):
    """With speculation, every width's graphs are captured at start-up and verifying steps replay them: a
    run whose drafts are its own earlier outputs accepts drafts and captures nothing more."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_testing import OracleDrafter

    config = dict(device="cuda", max_num_seqs=8, num_state_slots=64, num_kv_blocks=64, kda_state_dtype=state_dtype)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = {str(i): list(range(5, 5 + n)) for i, n in enumerate((9, 30, 4))}
    plain = LLMEngine(EngineConfig(**config))
    expected = {}
    for request_id, prompt in prompts.items():
        plain.add_request(request_id, prompt, params)
    while plain.has_unfinished_requests():
        for output in plain.step():
            expected.setdefault(output.request_id, []).extend(output.new_token_ids)
    engine = LLMEngine(EngineConfig(num_speculative_tokens=3, **config))
    graphs = engine.runner.graphs
    assert set(graphs.graphs) == {(nb, w, MIN_KV_BUCKET) for nb in (1, 2, 4, 8) for w in (1, 2, 3, 4)}
    OracleDrafter(engine, expected, p_wrong=0.0)
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.new_token_ids)
    assert all(len(o) == 16 for o in outputs.values())
    assert engine.stats().spec_accepted_tokens_total > 0 and len(graphs.graphs) == 16


@pytest.mark.gpu
def test_predicted_outputs_draft_through_graphs():
    """Predicted outputs (SamplingParams.prediction) on CUDA: the prediction's drafts go through the verifying
    graphs captured at start-up; a run predicted by its own plain output accepts most of them."""
    config = dict(device="cuda", max_num_seqs=8, num_state_slots=64, num_kv_blocks=64)
    prompts = {str(i): list(range(5, 5 + n)) for i, n in enumerate((9, 30, 4))}
    plain = LLMEngine(EngineConfig(**config))
    expected = {}
    for request_id, prompt in prompts.items():
        plain.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    while plain.has_unfinished_requests():
        for output in plain.step():
            expected.setdefault(output.request_id, []).extend(output.new_token_ids)
    engine = LLMEngine(EngineConfig(num_speculative_tokens=3, **config))
    captured = len(engine.runner.graphs.graphs)
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                              prediction=expected[request_id]))
    final = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    assert all(len(o.output_token_ids) == 16 for o in final.values())
    accepted = sum(o.accepted_prediction_tokens for o in final.values())
    assert accepted >= 24, accepted  # of at most 15 a request, most held
    assert len(engine.runner.graphs.graphs) == captured


@pytest.mark.gpu
def test_engine_on_the_paged_kernel_captures_nothing_after_start_up():
    """With MLA on the paged kernel, the graphs captured at start-up (every batch bucket and width, at the
    model's length) serve the whole run: decode and verifying steps of sequences that grow from 40 to 1,300
    keys past what were key-length buckets, with drafts right and wrong (each verifying token its own key
    count over its sequence's block-table row). The tokens themselves are held to the decode steps' in
    tests/model/test_spec_verify.py (here bf16 rounding may flip a near-tie between the two step shapes)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_testing import OracleDrafter

    from model.kimi_testing import paged_kernel_model

    model = paged_kernel_model(seed=5)
    config = dict(device="cuda", max_num_seqs=4, num_state_slots=32, num_kv_blocks=400, max_num_batched_tokens=2048)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    prompts = {str(i): torch.randint(3, 256, (n,), generator=gen).tolist() for i, n in enumerate((40, 700, 1290))}
    plain = LLMEngine(EngineConfig(**config), model=model)
    requests = [(request_id, prompt, params) for request_id, prompt in prompts.items()]
    expected = {request_id: tokens for request_id, (tokens, _) in _greedy_run(plain, requests).items()}
    engine = LLMEngine(EngineConfig(num_speculative_tokens=2, **config), model=model)
    graphs = engine.runner.graphs
    captured = {(nb, w, graphs.kv_limit) for nb in (1, 2, 4) for w in (1, 2, 3)}
    assert graphs.any_length and set(graphs.graphs) == captured
    assert set(plain.runner.graphs.graphs) == {(nb, 1, graphs.kv_limit) for nb in (1, 2, 4)}
    OracleDrafter(engine, expected, p_wrong=0.3)
    outputs = {request_id: tokens for request_id, (tokens, _) in _greedy_run(engine, requests).items()}
    assert engine.stats().spec_accepted_tokens_total > 0
    assert set(graphs.graphs) == captured  # no capture after start-up
    assert sorted(outputs) == sorted(prompts) and all(len(o) == 24 for o in outputs.values())


def _greedy_run(engine, requests, deferred: list | None = None):
    """Runs (id, prompt, params) to the end on `engine`; {id: (tokens, logprobs)}. deferred collects, per
    step, whether its tokens were left on the device."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens, logprobs = out.setdefault(o.request_id, ([], []))
            tokens += o.new_token_ids
            logprobs += o.logprobs or []
        if deferred is not None:
            deferred.append(engine._in_flight is not None)
    return out


@pytest.mark.gpu
def test_async_scheduling_through_graphs_matches_synchronous_steps():
    """With asynchronous scheduling on CUDA each decode graph is replayed while the previous step's tokens
    are still on the device (fed by an index copy into the graph's input buffer). With the same batches as
    the synchronous engine (length limits only: no decode is queued after a request's last token) every token
    and logprob is the same; a request ending on a stop token, whose decode after the stop is queued and
    thrown away, ends where the synchronous one does."""
    config = dict(device="cuda", max_num_seqs=8, num_state_slots=32, num_kv_blocks=64)
    greedy = lambda n, **kw: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)  # noqa: E731
    requests = [("a", list(range(5, 14)), greedy(12)), ("b", list(range(7, 37)), greedy(7, logprobs=2)),
                ("c", list(range(9, 13)), greedy(20)), ("d", [3], greedy(1)),
                # penalised: its pending token joins the penalty counts on the device
                ("e", list(range(11, 20)), greedy(14, frequency_penalty=1.0, logit_bias=((50, 6.0),)))]
    sync = _greedy_run(LLMEngine(EngineConfig(async_scheduling=False, **config)), requests)
    engine = LLMEngine(EngineConfig(**config))
    assert engine.config.async_scheduling and engine.runner.graphs is not None
    deferred = []
    out = _greedy_run(engine, requests, deferred)
    assert sum(deferred) >= 15  # decode steps left their tokens on the device
    assert 1 < sync["e"][0].count(50) < 14  # the penalty steered the biased choice
    for request_id, (tokens, logprobs) in sync.items():
        assert out[request_id][0] == tokens, request_id
        assert out[request_id][1] == pytest.approx(logprobs, abs=1e-4), request_id
    stop = sync["c"][0][8]
    stopping = [("s", list(range(9, 13)), greedy(20, stop_token_ids=[stop]))]
    first = sync["c"][0].index(stop)
    assert _greedy_run(engine, stopping)["s"][0] == sync["c"][0][: first + 1]
    stats = engine.stats()
    assert stats.state_slots_used == 0 and stats.kv_blocks_used == 0 and stats.num_running == 0


@pytest.mark.gpu
def test_engine_runs_prompt_steps_through_piecewise_graphs():
    """Steps with prompt tokens replay piecewise graphs (engine/prompt_graphs.py), all captured at start-up:
    fresh prompts, a prompt arriving among running decodes (asynchronous scheduling patches the decodes' input
    tokens into the graphs' buffer) and a second turn restored from the prefix cache give the tokens an engine
    running those steps eagerly gives (the same kernels on the same rows: bit-equal on the GPU, as
    tests/model/test_prompt_graphs.py measures), and a step over prompt_graph_tokens runs eagerly."""
    from kda_serving.model import load_model

    model = load_model(None, device="cuda", dtype=torch.bfloat16, progress=False)
    outputs, counts = [], []
    for tokens in (256, 0):
        engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=8, num_state_slots=32, num_kv_blocks=256,
                                        max_num_batched_tokens=512, prompt_graph_tokens=tokens), model=model)
        graphs = engine.runner.prompt_graphs
        assert (graphs is None) == (tokens == 0)
        runs = []
        if graphs is not None:
            assert sorted(graphs.captured) == graphs.buckets and graphs.buckets[-1] == 256
            run = graphs.run
            graphs.run = lambda batch, *a, **kw: runs.append(batch.num_tokens) or run(batch, *a, **kw)
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        done = {}

        def step():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.output_token_ids

        engine.add_request("a", list(range(5, 45)), params)
        step()
        step()  # a decodes
        engine.add_request("b", list(range(100, 119)), params)  # joins a's decodes
        engine.add_request("c", list(range(7, 400)), params)  # 393 tokens: over 256, eager
        while engine.has_unfinished_requests():
            step()
        first_turn = list(range(5, 45)) + done["a"]
        engine.add_request("a2", first_turn + list(range(60, 80)), params)  # a second turn: restored prefix
        while engine.has_unfinished_requests():
            step()
        outputs.append(done)
        counts.append(runs)
    assert outputs[0] == outputs[1]
    assert counts[0] and max(counts[0]) <= 256 and min(counts[0]) < 40  # b among a's decodes, a's second turn


@pytest.mark.gpu
def test_prompt_logprobs_through_piecewise_graphs():
    """A prompt-logprobs request's extra logits rows (every prompt position) come out of a step replayed from
    prompt graphs as out of the eager step: equal, finite, the first None; beside a request without them."""
    from kda_serving.model import load_model

    model = load_model(None, device="cuda", dtype=torch.bfloat16, progress=False)
    results = []
    for tokens in (256, 0):
        engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=4, num_state_slots=16, num_kv_blocks=128,
                                        max_num_batched_tokens=256, prompt_graph_tokens=tokens), model=model)
        engine.add_request("p", list(range(5, 80)), SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))
        engine.add_request("q", list(range(9, 30)), SamplingParams(temperature=0, max_tokens=2))
        first = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                first.setdefault(out.request_id, out)
        results.append((first["p"].prompt_logprobs, first["p"].prompt_top_logprobs))
        assert first["q"].prompt_logprobs is None
    (lp, top), (lp_eager, top_eager) = results
    assert lp == lp_eager and top == top_eager and lp[0] is None and len(lp) == 75
    assert all(v is not None and v <= 0 for v in lp[1:]) and all(len(t) == 2 for t in top[1:])
