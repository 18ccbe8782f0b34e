"""A tiny random-weight llama with its own byte-level BPE tokenizer, for fast tests.

Built deterministically from a seed: the same command gives the same folder.
It loads through mlx-lm's ordinary loading code like any downloaded model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

from exo.nodes.engine.mlxenv import mx
from exo.nodes.store import manifest

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

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


def build_tokenizer(out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
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
        "chat_template": CHATML,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return tok.get_vocab_size()


def make_tiny(
    out: Path,
    seed: int = 0,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    context: int = 1024,
    vocab: int = 1024,
) -> Path:
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab_size = build_tokenizer(tmp, vocab)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": context,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    mx.random.seed(seed)
    args = ModelArgs.from_dict(config)
    model = Model(args)
    # Larger than default init so greedy output varies from token to token.
    params = {
        k: mx.random.normal(v.shape) * (0.08 if v.ndim > 1 else 0.0) + (1.0 if v.ndim == 1 else 0.0)
        for k, v in cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    }
    mx.save_safetensors(str(tmp / "model.safetensors"), params, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        shutil.rmtree(out)
    manifest.write(tmp)
    tmp.rename(out)
    return out
