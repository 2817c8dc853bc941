"""`kda-serve` argument handling: bad flags fail fast with a message naming them, before any model loads."""

from __future__ import annotations

import dataclasses

import pytest

from kda_serving.engine import EngineConfig
from kda_serving.server.cli import ENGINE_FLAGS, build_parser, main


def test_every_engine_flag_is_an_engine_config_field():
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(ENGINE_FLAGS) <= fields
    args = build_parser().parse_args(["--device", "cuda:1", "--max-num-seqs", "8", "--no-prefix-caching"])
    given = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    assert given == {"device": "cuda:1", "max_num_seqs": 8, "enable_prefix_caching": False}
    defaults = build_parser().parse_args([])
    assert (defaults.host, defaults.port, defaults.api_key) == ("127.0.0.1", 8000, None)
    assert defaults.max_concurrent_requests == 0  # no limit
    assert build_parser().parse_args(["--max-concurrent-requests", "8"]).max_concurrent_requests == 8


@pytest.mark.parametrize("argv, names", [
    (["--device", "tpu"], "device"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--prefix-cache-interval", "100"], "prefix_cache_interval"),
    (["--max-request-bytes", "0"], "max_request_bytes"),
    (["--cpu-threads", "0"], "--cpu-threads"),
    (["--port", "eighty"], "--port"),
    (["--num-speculative-tokens", "99"], "num_speculative_tokens"),
    (["--prompt-lookup-min", "5"], "prompt_lookup_min"),
    (["--tool-call-parser", "hermes"], "tool_call_parser"),
    (["--prompt-graph-tokens", "-1"], "prompt_graph_tokens"),
    (["--max-stored-response-bytes", "-1"], "max_stored_response_bytes"),
    (["--fp8-fast-accumulation"], "fp8_fast_accumulation"),
    (["--max-concurrent-requests", "-1"], "max_concurrent_requests"),
], ids=["device", "max-num-seqs", "prefix-cache-interval", "max-request-bytes", "cpu-threads", "port",
        "num-speculative-tokens", "prompt-lookup-min", "tool-call-parser", "prompt-graph-tokens",
        "max-stored-response-bytes", "fp8-fast-accumulation-without-fp8", "max-concurrent-requests"])
def test_bad_flags_exit_2_naming_the_flag(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert names in capsys.readouterr().err


def test_a_model_directory_without_a_usable_config_exits_2(tmp_path, capsys):
    """A wrong --model directory, or a config.json the model refuses, ends kda-serve with the message before
    anything loads (not a traceback from the server's start-up)."""
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path)])
    assert exc.value.code == 2 and "config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path)])
    assert exc.value.code == 2 and "kimi_linear" in capsys.readouterr().err
