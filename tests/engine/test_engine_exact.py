"""The engine's greedy generations equal transformers' KimiLinearForCausalLM on the same tiny weights (CPU,
fp32), for single requests, many concurrent requests of different lengths packed into ragged steps, prompts
longer than the prefill chunk, queueing, preemption and prefix-cache reuse."""

import pytest
import torch

from kda_serving.engine import LLM, SamplingParams

from engine_testing import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def engine(model, **config):
    config.setdefault("max_num_seqs", 16)
    config.setdefault("num_state_slots", 32)
    config.setdefault("num_kv_blocks", 256)
    config.setdefault("prefix_cache_interval", 64)
    return LLM(model_obj=model, **config)


def check_greedy_against_hf(hf_model, prompt, output):
    """Teacher forcing: one transformers forward over prompt + output; every output token must be the argmax
    of the logits before it. This is exactly transformers' greedy generation, checked in one forward."""
    ids = torch.tensor([prompt + output[:-1]])
    with torch.no_grad():
        logits = hf_model(ids, use_cache=False).logits[0, len(prompt) - 1 :].double()
    expected = logits.argmax(-1).tolist()
    top2 = logits.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    assert output == expected, (
        f"prompt of {len(prompt)}: engine {output} != transformers {expected} (top-2 logit margin {margin:.2e})"
    )


def test_single_request_equals_transformers_generate(tiny_model, hf_model):
    prompt = random_prompts([70], 211, seed=1)[0]  # longer than the 32-token prefill chunk
    out = engine(tiny_model, max_num_batched_tokens=32).generate([prompt], SamplingParams(temperature=0, max_tokens=6))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
    assert out[0].output_token_ids == ref.tolist()


def test_concurrent_ragged_requests_equal_transformers(tiny_model, hf_model):
    lengths = [1, 2, 15, 17, 64, 113, 150, 5]
    prompts = random_prompts(lengths, 211, seed=2)
    llm = engine(tiny_model, max_num_batched_tokens=48, max_num_seqs=5)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.stats().num_steps_total < sum(lengths) // 48 + 6 * len(lengths)  # steps were shared
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length" and len(out.output_token_ids) == 6
        check_greedy_against_hf(hf_model, prompt, out.output_token_ids)


def test_queueing_and_preemption_do_not_change_results(tiny_model):
    prompts = random_prompts([40, 9, 77, 3], 211, seed=3)
    free = engine(tiny_model).generate(prompts, GREEDY)
    few_slots = engine(tiny_model, num_state_slots=2, enable_prefix_caching=False)
    assert [o.output_token_ids for o in few_slots.generate(prompts, GREEDY)] == [o.output_token_ids for o in free]
    few_blocks = engine(tiny_model, num_kv_blocks=9, block_size=16, enable_prefix_caching=False)
    assert [o.output_token_ids for o in few_blocks.generate(prompts, GREEDY)] == [o.output_token_ids for o in free]
    assert few_blocks.engine.stats().num_preemptions_total > 0


def test_multi_turn_reuse_equals_recompute(tiny_model, hf_model):
    """Conversations of growing turns, interleaved and branching: cache on == cache off, token for token."""
    on = engine(tiny_model, max_num_batched_tokens=64, block_size=16)
    off = engine(tiny_model, max_num_batched_tokens=64, block_size=16, enable_prefix_caching=False)
    users = random_prompts([50, 20, 90, 7, 33, 130, 12, 66], 211, seed=4)
    convs = [[], []]
    for turn in range(3):
        prompts = [conv + users[2 * turn + i] for i, conv in enumerate(convs)]
        branch = prompts[0][: len(prompts[0]) - 3] + [5, 6]  # a sibling of conversation 0's latest turn
        outs_on = on.generate(prompts + [branch], GREEDY)
        outs_off = off.generate(prompts + [branch], GREEDY)
        for a, b in zip(outs_on, outs_off):
            assert a.output_token_ids == b.output_token_ids
        if turn:
            for i in range(2):
                # everything before this turn's new user tokens was computed in the previous turn
                assert outs_on[i].num_cached_tokens == len(convs[i]) - 1
        convs = [p + o.output_token_ids for p, o in zip(prompts, outs_on)]
    check_greedy_against_hf(hf_model, prompts[1], outs_on[1].output_token_ids)
    stats = on.engine.stats()
    assert stats.prefix_cache_hit_tokens > 0 and stats.state_slots_used == 0 and stats.kv_blocks_used == 0
    assert stats.state_slots_cached == stats.prefix_cache_entries > 0 and stats.kv_blocks_cached > 0


def test_follow_up_with_retokenized_reply_reuses_the_prompt(tiny_model, hf_model):
    """A chat follow-up repeats the previous prompt verbatim but carries the reply re-tokenized (other ids than
    were generated): the state saved at the end of the prompt still serves it, and results match transformers."""
    llm = engine(tiny_model, max_num_batched_tokens=64, block_size=16)
    first = random_prompts([150], 211, seed=9)[0]
    reply = llm.generate([first], GREEDY)[0].output_token_ids
    retokenized = [(t + 1) % 211 for t in reply]  # the same text, other ids
    follow = first + retokenized + random_prompts([20], 211, seed=10)[0]
    out = llm.generate([follow], GREEDY)[0]
    assert out.num_cached_tokens == len(first)
    check_greedy_against_hf(hf_model, follow, out.output_token_ids)


def test_concurrent_identical_prefixes_share_and_match(tiny_model):
    shared = random_prompts([200], 211, seed=5)[0]
    tails = random_prompts([3, 4, 5], 211, seed=6)
    prompts = [shared + t for t in tails]
    on = engine(tiny_model, max_num_batched_tokens=64)
    outs = on.generate(prompts, GREEDY)
    ref = engine(tiny_model, enable_prefix_caching=False).generate(prompts, GREEDY)
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in ref]
    assert outs[0].num_cached_tokens == 0 and all(o.num_cached_tokens == 192 for o in outs[1:])


OTHER_SHAPES = {  # transformers config overrides: MLA first + dense MLPs + q_lora; grouped top-k MoE, conv 3
    "dense-qlora-mla-first": dict(
        num_hidden_layers=5, q_lora_rank=16, first_k_dense_replace=5,
        linear_attn_config={"kda_layers": [2, 3, 5], "full_attn_layers": [1, 4], "num_heads": 2, "head_dim": 16,
                            "short_conv_kernel_size": 4},
    ),
    "grouped-topk-conv3": dict(
        q_lora_rank=12, num_expert_group=4, topk_group=2, num_experts_per_token=3, first_k_dense_replace=0,
        linear_attn_config={"kda_layers": [1, 3, 4], "full_attn_layers": [2], "num_heads": 3, "head_dim": 32,
                            "short_conv_kernel_size": 3},
    ),
    "all-kda-no-mla": dict(  # no MLA layer: KV blocks cost nothing and the budget goes to state slots
        num_hidden_layers=3, first_k_dense_replace=3,
        linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [], "num_heads": 2, "head_dim": 32,
                            "short_conv_kernel_size": 4},
    ),
}


@pytest.mark.parametrize("shape", list(OTHER_SHAPES))
def test_other_shapes_greedy_and_reuse(shape, tmp_path):
    from model.kimi_testing import make_hf_model, save_hf_checkpoint

    from kda_serving.model import load_model

    hf, cfg = make_hf_model(seed=3, **OTHER_SHAPES[shape])
    model = load_model(save_hf_checkpoint(hf, str(tmp_path)), progress=False)
    prompts = random_prompts([3, 40, 90], cfg.vocab_size, seed=8)
    llm = engine(model, max_num_batched_tokens=32)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        check_greedy_against_hf(hf, prompt, out.output_token_ids)
    follow = prompts[2] + outs[2].output_token_ids + prompts[0]  # turn 2 of the third conversation
    again = llm.generate([follow], GREEDY)[0]
    assert again.num_cached_tokens == len(prompts[2]) + len(outs[2].output_token_ids) - 1
    check_greedy_against_hf(hf, follow, again.output_token_ids)


def test_stale_cache_contents_never_leak_into_results(tiny_model, hf_model):
    """Every state slot and KV block starts full of garbage (as memory freed by earlier requests would be):
    fresh requests must ignore it (has_initial_state False, attention only over their own positions)."""
    prompts = random_prompts([5, 70, 33], 211, seed=9)
    llm = engine(tiny_model, max_num_batched_tokens=32)
    gen = torch.Generator().manual_seed(0)
    caches = llm.engine.runner.caches
    for pool in (*caches.recurrent, *caches.conv, *caches.kv):
        pool.copy_(100 * torch.randn(pool.shape, generator=gen, dtype=pool.dtype))
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        check_greedy_against_hf(hf_model, prompt, out.output_token_ids)
    follow = prompts[1] + outs[1].output_token_ids + prompts[0]
    again = llm.generate([follow], GREEDY)[0]
    assert again.num_cached_tokens > 0
    check_greedy_against_hf(hf_model, follow, again.output_token_ids)
