"""A tiny random-weight llama with its own byte-level BPE tokenizer, for fast tests.

Built deterministically from a seed: the same command gives the same folder.
It loads through mlx-lm's ordinary loading code like any downloaded model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

from exo.nodes.engine.mlxenv import mx, nn
from exo.nodes.store import manifest

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# With tools: Qwen 2.5's way (tools listed in the system turn, calls as
# <tool_call>{"name", "arguments"}</tool_call>), so mlx-lm picks its JSON parser.
TOOLS_CHATML = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}"
    "{{ messages[0].content }}\n\n{% endif %}# Tools\n<tools>{% for tool in tools %}\n"
    "{{ tool | tojson }}{% endfor %}\n</tools>\nCall one as <tool_call>\n"
    '{"name": <name>, "arguments": <object>}\n</tool_call><|im_end|>\n'
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{{ message.content or '' }}{% for tool_call in message.tool_calls %}"
    "{% set f = tool_call.function if tool_call.function is defined else tool_call %}"
    '\n<tool_call>\n{"name": "{{ tool_call.name if tool_call.name is defined else f.name }}", '
    '"arguments": {{ f.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n'
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# A thinking model's: the generation prompt opens a <think> block unless the
# request turns thinking off (Qwen 3's `enable_thinking`).
THINK_CHATML = CHATML.replace(
    "{{ '<|im_start|>assistant\\n' }}",
    "{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is not defined or enable_thinking %}"
    "{{ '<think>\\n' }}{% endif %}",
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINKS = ["<think>", "</think>"]

# A small corpus so the BPE learns ordinary English merges.
CORPUS = (
    """
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the
capital of France. A cluster of ordinary machines can serve one large language model.
Each node runs a stage of the model and sends its activations to the next node over the
network. The broker routes every request to a node that holds the model, and tokens flow
back to the client that asked. Once upon a time there was a small computer that wanted to
think. It read every book in the library, one token at a time, and wrote new stories.
Numbers such as 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in text, and so do symbols: + - * / =.
"""
    * 4
)


def build_tokenizer(
    out: Path, vocab_size: int, template: str = CHATML, thinking: bool = False
) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS + (THINKS if thinking else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return tok.get_vocab_size()


# Per architecture, what its config adds to the common one (make_tiny): small
# enough that every architecture builds in a second, big enough that 3 stages
# and sliding windows shorter than a test prompt are exercised.
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {  # a sliding window on 2 layers of 3: llama.py's hybrid
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
    },
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {},
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 64,
        "norm_topk_prob": True,
    },
    "gemma2": {"query_pre_attn_scalar": 32, "final_logit_softcapping": 30.0},
    "gemma3_text": {  # tied by leaving lm_head out of the checkpoint
        "sliding_window": 8,
        "sliding_window_pattern": 3,
        "query_pre_attn_scalar": 32,
        "rope_local_base_freq": 10000.0,
    },
    "phi3": {},
    "olmo2": {},
    "granite": {
        "logits_scaling": 4.0,
        "attention_multiplier": 0.2,
        "embedding_multiplier": 4.0,
        "residual_multiplier": 0.5,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "qk_nope_head_dim": 16,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "num_key_value_heads": 4,
    },
}


def randomize(model: nn.Module) -> None:
    """Weights larger than the default init, so greedy output varies from token to
    token; norm weights 1 (gemma's norms add 1 themselves), biases small."""
    from mlx.utils import tree_flatten

    params = {
        k: (
            mx.random.normal(v.shape) * 0.08
            if v.ndim > 1
            else mx.random.normal(v.shape) * 0.02
            if k.endswith("bias")
            else mx.ones(v.shape)
        )
        for k, v in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    }
    model.load_weights(list(params.items()))


def make_tiny(
    out: Path,
    seed: int = 0,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    context: int = 1024,
    vocab: int = 1024,
    arch: str = "llama",
    bits: int | None = None,
    group_size: int = 32,
    tools: bool = False,
    thinking: bool = False,
) -> Path:
    """A random-weight model of mlx-lm's `arch` class, quantized to `bits` (with
    its embedding, as mlx-community ships them) when given."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    if arch not in ARCHS:
        raise ValueError(f"no tiny {arch}: one of {', '.join(sorted(ARCHS))}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    template = TOOLS_CHATML if tools else THINK_CHATML if thinking else CHATML
    vocab_size = build_tokenizer(tmp, vocab, template, thinking)
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": context,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        **ARCHS[arch],
    }
    if "layer_types" in config:
        config["layer_types"] = (config["layer_types"] * layers)[:layers]
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    randomize(model)
    if bits is not None:
        model, config = quantize_model(model, config, group_size, bits)
    weights = dict(cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())))
    if arch == "gemma3_text":
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        shutil.rmtree(out)
    manifest.write(tmp)
    tmp.rename(out)
    return out
