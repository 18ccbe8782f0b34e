"""Turn a llama-architecture GGUF file into an mlx-lm model folder.

Everything comes from the GGUF itself: the config from `llama.*` metadata, the
weights (dequantized to float32, the fast layout on MLX's CPU backend), and a
`tokenizers` tokenizer with the chat template rebuilt from `tokenizer.ggml.*`.
No torch, no network.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, cast

from exo.nodes.engine.mlxenv import ints, mx
from exo.nodes.store import manifest

log = logging.getLogger(__name__)

# GGUF tensor names -> Hugging Face llama names (per block, then global).
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# GGUF's Q4_0, Q4_1 and Q8_0 all quantize in blocks of 32.
GGUF_GROUP_SIZE = 32
# tokenizer.ggml.token_type: 3 is a control token (special, never split).
TOKEN_TYPE_CONTROL = 3


class GGUFError(ValueError):
    pass


def _scalar(md: dict[str, Any], key: str, default: Any = None) -> Any:
    if key not in md:
        if default is None:
            raise GGUFError(f"GGUF metadata lacks {key}")
        return default
    v = md[key]
    return v.item() if isinstance(v, mx.array) else v


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, kind, leaf = parts[1], parts[2], parts[3]
        if kind not in BLOCK_NAMES:
            raise GGUFError(f"unsupported tensor {gguf_name}")
        return f"model.layers.{layer}.{BLOCK_NAMES[kind]}.{leaf}"
    if parts[0] not in GLOBAL_NAMES:
        raise GGUFError(f"unsupported tensor {gguf_name}")
    return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"


def unpermute_rope(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's reordering of q/k rows (it interleaves the two RoPE halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized_weights(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """Group GGUF arrays by tensor and return float32 weights with GGUF names."""
    out: dict[str, mx.array] = {}
    for name, arr in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        scales = tensors.get(base + ".scales")
        if scales is None:
            out[name] = arr.astype(mx.float32)
            continue
        in_features = scales.shape[-1] * GGUF_GROUP_SIZE
        bits = arr.shape[-1] * 32 // in_features
        biases = tensors.get(base + ".biases")
        out[name] = mx.dequantize(
            arr,
            scales.astype(mx.float32),
            biases.astype(mx.float32) if biases is not None else None,
            group_size=GGUF_GROUP_SIZE,
            bits=bits,
        ).astype(mx.float32)
    return out


def build_config(md: dict[str, Any], has_output: bool) -> dict[str, Any]:
    arch = _scalar(md, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"only llama-architecture GGUF files are supported, not {arch!r}")
    n_head = int(_scalar(md, "llama.attention.head_count"))
    hidden = int(_scalar(md, "llama.embedding_length"))
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = int(_scalar(md, "llama.vocab_size", len(tokens) if tokens else 0))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(md, "llama.block_count")),
        "intermediate_size": int(_scalar(md, "llama.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_scalar(md, "llama.attention.head_count_kv", n_head)),
        "head_dim": int(_scalar(md, "llama.rope.dimension_count", hidden // n_head)),
        "rms_norm_eps": float(_scalar(md, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_scalar(md, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(md, "llama.context_length", 2048)),
        "vocab_size": vocab,
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        if f"tokenizer.ggml.{name}_token_id" in md:
            cfg[key] = int(_scalar(md, f"tokenizer.ggml.{name}_token_id"))
    return cfg


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # These split every digit on its own before the GPT-2 regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default", ""):
        return byte_level
    raise GGUFError(f"unsupported tokenizer.ggml.pre {pre!r} (supported: smollm, gpt2, default)")


def build_tokenizer(md: dict[str, Any], out: Path, context: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = _scalar(md, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, not {kind!r}")
    tokens: list[str] = list(md["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    types = md.get("tokenizer.ggml.token_type")
    types_list = ints(types) if isinstance(types, mx.array) else [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = int(_scalar(md, "tokenizer.ggml.unknown_token_id", 0))
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=False)
    )
    tok.pre_tokenizer = _pre_tokenizer(str(md.get("tokenizer.ggml.pre", "gpt2")))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, ty in zip(tokens, types_list, strict=True) if ty == TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        full = f"tokenizer.ggml.{key}_token_id"
        return tokens[int(_scalar(md, full))] if full in md else None

    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(_scalar(md, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in md:
        tcfg["chat_template"] = md["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    special_map = {k: v for k, v in tcfg.items() if k.endswith("_token") and v}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def import_gguf(gguf: Path, out: Path) -> Path:
    """Write an mlx-lm folder at `out`; written beside as `out.partial` and renamed when whole."""
    loaded = mx.load(str(gguf), return_metadata=True)
    tensors, md = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    weights = dequantized_weights(tensors)
    cfg = build_config(md, has_output="output.weight" in weights)
    hf: dict[str, mx.array] = {}
    for name, w in weights.items():
        if ".attn_q." in name and name.endswith(".weight"):
            w = unpermute_rope(w, cfg["num_attention_heads"])
        elif ".attn_k." in name and name.endswith(".weight"):
            w = unpermute_rope(w, cfg["num_key_value_heads"])
        hf[hf_name(name)] = w
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), hf, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    build_tokenizer(md, tmp, cfg["max_position_embeddings"])
    if out.exists():
        shutil.rmtree(out)
    manifest.write(tmp)
    tmp.rename(out)
    log.info("imported %s -> %s (%d tensors)", gguf.name, out, len(hf))
    return out
