"""The embedded default model: a tiny Kimi-Linear checkpoint with random weights and a real tokenizer.

Used when no model is named. Architecture as published, scaled down: 4 layers, KDA:MLA = 3:1 (1-based
kda_layers [1, 2, 3], full_attn_layers [4]), hidden 256, 2 KDA heads of head_dim 128 (the size the CUDA
kernels take, so the same model serves on the GPU), NoPE MLA without q_lora_rank, a dense first layer then
MoE (8 routed experts, top-2, one shared expert, sigmoid router with a correction bias). About 5.8 M
parameters, stored in bf16 (~11.6 MB).

The tokenizer (byte-level BPE, ~2.5k tokens, ChatML chat template, eos <|im_end|>) is trained
deterministically on kda_serving/model/default/corpus.txt; its files and config.json are committed in that
folder. The weights are not committed: they are generated from a fixed seed on first use into a cache
directory ($KDA_SERVING_CACHE, default ~/.cache/kda_serving). Regenerate everything with

    python -m kda_serving.model.default_model --out DIR

which reproduces the committed files byte for byte (tests/model/test_default_model.py checks it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile

import torch

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")
CORPUS = "corpus.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHTS = "model.safetensors"
SEED = 20251126
MAX_MODEL_LEN = 4096

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def train_tokenizer(corpus_path: str):
    """Byte-level BPE trained on the corpus; deterministic for a given `tokenizers` version."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train([corpus_path], trainer)
    return tok


def tokenizer_files(corpus_path: str) -> dict[str, bytes]:
    """The tokenizer files' contents: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    tok = train_tokenizer(corpus_path)
    special = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": MAX_MODEL_LEN,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        **special,
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True).encode("utf-8") + b"\n",
        "tokenizer_config.json": _json_bytes(tokenizer_config),
        "special_tokens_map.json": _json_bytes(special),
    }


def model_config(vocab: dict[str, int]) -> dict:
    """config.json in the published Moonshot/transformers format (1-based layer lists)."""
    return {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        "dtype": "bfloat16",
        "vocab_size": len(vocab),
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "model_max_length": MAX_MODEL_LEN,
        "bos_token_id": None,
        "eos_token_id": vocab[EOS_TOKEN],
        "pad_token_id": vocab[PAD_TOKEN],
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "moe_intermediate_size": 128,
        "moe_renormalize": True,
        "moe_router_activation_func": "sigmoid",
        "num_experts": 8,
        "num_experts_per_token": 2,
        "num_shared_experts": 1,
        "routed_scaling_factor": 2.446,
        "use_grouped_topk": True,
        "num_expert_group": 1,
        "topk_group": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "mla_use_nope": True,
        "num_nextn_predict_layers": 0,
        "linear_attn_config": {
            "kda_layers": [1, 2, 3],
            "full_attn_layers": [4],
            "num_heads": 2,
            "head_dim": 128,
            "short_conv_kernel_size": 4,
        },
    }


def config_files(vocab: dict[str, int]) -> dict[str, bytes]:
    generation = {"eos_token_id": [vocab[EOS_TOKEN], vocab[PAD_TOKEN]], "pad_token_id": vocab[PAD_TOKEN]}
    return {"config.json": _json_bytes(model_config(vocab)), "generation_config.json": _json_bytes(generation)}


def random_weights(config: dict, seed: int = SEED) -> dict[str, torch.Tensor]:
    """bf16 weights under transformers' names, each drawn from its own generator seeded by (seed, name)."""
    from .config import MOE, ModelConfig

    cfg = ModelConfig.from_dict(config)
    hidden, H, K, D = cfg.hidden_size, cfg.linear_num_heads, cfg.linear_head_dim, cfg.kda_dim
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((cfg.vocab_size, hidden), "normal:0.02"),
        "model.norm.weight": ((hidden,), "ones"),
        "lm_head.weight": ((cfg.vocab_size, hidden), "normal:0.06"),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = ((hidden,), "ones")
        shapes[p + "post_attention_layernorm.weight"] = ((hidden,), "ones")
        a = p + "self_attn."
        if i in cfg.kda_layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                shapes[a + name + ".weight"] = ((D, hidden), "normal:0.02")
            shapes[a + "conv1d.weight"] = ((3 * D, 1, cfg.conv_kernel_size), "uniform:0.5")
            shapes[a + "forget_gate.f_a_proj.weight"] = ((K, hidden), "normal:0.02")
            shapes[a + "forget_gate.f_b_proj.weight"] = ((D, K), "normal:0.02")
            shapes[a + "forget_gate.A_log"] = ((1, 1, H, 1), "a_log")
            shapes[a + "forget_gate.dt_bias"] = ((D,), "dt_bias")
            shapes[a + "b_proj.weight"] = ((H, hidden), "normal:0.02")
            shapes[a + "g_a_proj.weight"] = ((K, hidden), "normal:0.02")
            shapes[a + "g_b_proj.weight"] = ((D, K), "normal:0.02")
            shapes[a + "o_norm.weight"] = ((K,), "ones")
            shapes[a + "o_proj.weight"] = ((hidden, D), "normal:0.02")
        else:
            nh = cfg.num_attention_heads
            shapes[a + "q_proj.weight"] = ((nh * cfg.qk_head_dim, hidden), "normal:0.02")
            shapes[a + "kv_a_proj_with_mqa.weight"] = ((cfg.latent_dim, hidden), "normal:0.02")
            shapes[a + "kv_a_layernorm.weight"] = ((cfg.kv_lora_rank,), "ones")
            shapes[a + "kv_b_proj.weight"] = ((nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
                                              "normal:0.02")
            shapes[a + "o_proj.weight"] = ((hidden, nh * cfg.v_head_dim), "normal:0.02")
        m = p + "mlp."
        if cfg.mlp_types[i] == MOE:
            E, I = cfg.num_experts, cfg.moe_intermediate_size
            shapes[m + "gate.weight"] = ((E, hidden), "normal:0.1")
            shapes[m + "gate.e_score_correction_bias"] = ((E,), "normal:0.01")
            shapes[m + "experts.gate_up_proj"] = ((E, 2 * I, hidden), "normal:0.02")
            shapes[m + "experts.down_proj"] = ((E, hidden, I), "normal:0.02")
            m, inter = m + "shared_experts.", I * cfg.num_shared_experts
        else:
            inter = cfg.intermediate_size
        shapes[m + "gate_proj.weight"] = ((inter, hidden), "normal:0.02")
        shapes[m + "up_proj.weight"] = ((inter, hidden), "normal:0.02")
        shapes[m + "down_proj.weight"] = ((hidden, inter), "normal:0.02")
    return {name: _draw(name, shape, kind, seed) for name, (shape, kind) in sorted(shapes.items())}


def _draw(name: str, shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    if kind == "ones":
        x = torch.ones(shape)
    elif kind.startswith("normal:"):
        x = torch.randn(shape, generator=gen) * float(kind.split(":")[1])
    elif kind.startswith("uniform:"):
        bound = float(kind.split(":")[1])
        x = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    elif kind == "a_log":  # decay rates exp(A_log) in [1, 16], as the FLA initialisation
        x = (1 + 15 * torch.rand(shape, generator=gen)).log()
    elif kind == "dt_bias":  # inverse softplus of dt in [1e-3, 1e-1], log-uniform
        dt = torch.exp(math.log(1e-3) + (math.log(1e-1) - math.log(1e-3)) * torch.rand(shape, generator=gen))
        x = dt + torch.log(-torch.expm1(-dt))
    else:
        raise ValueError(f"unknown initialiser {kind!r} for {name}")
    return x.to(torch.bfloat16).contiguous()


def write_default_model(out_dir: str, retrain_tokenizer: bool = False) -> None:
    """Writes the full checkpoint (tokenizer, config, weights) to out_dir. With retrain_tokenizer the tokenizer
    files are trained from the corpus instead of copied from the package (that is how they were made)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    if retrain_tokenizer:
        files = tokenizer_files(os.path.join(PACKAGE_DIR, CORPUS))
    else:
        files = {}
        for name in TOKENIZER_FILES:
            with open(os.path.join(PACKAGE_DIR, name), "rb") as f:
                files[name] = f.read()
    vocab = json.loads(files["tokenizer.json"])["model"]["vocab"]
    files.update(config_files(vocab))
    for name, data in files.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    weights = random_weights(json.loads(files["config.json"]))
    save_file(weights, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})


def _fingerprint() -> str:
    """Changes whenever the committed files or this generator change, so a stale cache is never used."""
    h = hashlib.sha256()
    for name in (*TOKENIZER_FILES, *CONFIG_FILES):
        with open(os.path.join(PACKAGE_DIR, name), "rb") as f:
            h.update(f.read())
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    h.update(torch.__version__.split("+")[0].encode())
    return h.hexdigest()[:16]


def default_model_path() -> str:
    """Directory of the embedded default model, generating its weights on first use (a few seconds)."""
    cache = os.environ.get("KDA_SERVING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kda_serving")
    target = os.path.join(cache, f"default-model-{_fingerprint()}")
    if os.path.isfile(os.path.join(target, WEIGHTS)):
        return target
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".default-model-", dir=cache)
    try:
        write_default_model(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other
        try:
            os.replace(tmp, target)  # atomic: concurrent first uses race harmlessly
        except OSError:
            if not os.path.isfile(os.path.join(target, WEIGHTS)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--update-package", action="store_true",
                        help="also rewrite the committed tokenizer/config files in kda_serving/model/default/")
    args = parser.parse_args(argv)
    write_default_model(args.out, retrain_tokenizer=True)
    if args.update_package:
        for name in (*TOKENIZER_FILES, *CONFIG_FILES):
            shutil.copyfile(os.path.join(args.out, name), os.path.join(PACKAGE_DIR, name))
    print(f"wrote the default model to {args.out}")


if __name__ == "__main__":
    main()
