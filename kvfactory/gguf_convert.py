"""Convert an embedded GGUF (see :mod:`kvfactory.embedded`) into a normal Hugging Face checkpoint folder.

transformers 4.44.2 cannot dequantize Q4_1 or Q5_0 and drops facts the GGUF metadata holds, so this does it by hand:

- the ``gguf`` package dequantizes every tensor;
- ``llama``: llama.cpp's permutation of the q/k projections (its RoPE layout) is undone; without ``output.weight`` the
  output head is the tied embedding;
- ``qwen2``: q/k/v biases, an untied ``output.weight`` when present, no permutation (llama.cpp keeps Qwen2's layout);
- the tokenizer is rebuilt from the GGUF vocabulary, merges and pre-tokenizer name, with the chat template the GGUF
  carries (transformers drops it), no BOS token when ``add_bos_token`` is false, and only ``input_ids`` and
  ``attention_mask`` as model inputs, so ``model.generate(**tokenizer(text, return_tensors="pt"))`` works.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 2  # bump when the conversion changes: cached checkpoints are then rebuilt
MARKER = "kvfactory_conversion.json"

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED, _UNUSED = 3, 4, 5
# Qwen2's pre-tokenizer split (its tokenizer.json), then byte-level without the GPT-2 regex.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _Architecture:
    config_class: str
    model_class: str
    permute_qk: bool  # undo llama.cpp's q/k row permutation


_ARCHITECTURES = {
    "llama": _Architecture("LlamaConfig", "LlamaForCausalLM", permute_qk=True),
    "qwen2": _Architecture("Qwen2Config", "Qwen2ForCausalLM", permute_qk=False),
}


def _field(reader: Any, name: str) -> Any:
    return reader.fields[name].contents()


def _optional_field(reader: Any, name: str) -> Any:
    return reader.fields[name].contents() if name in reader.fields else None


def _strings(reader: Any, name: str) -> list[str]:
    field = reader.fields[name]
    return [bytes(field.parts[index]).decode("utf-8") for index in field.data]


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        _, layer, tensor, kind = parts
        return f"model.layers.{layer}.{_LAYER_TENSORS[tensor]}.{kind}"
    return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"


def _state_dict(reader: Any, architecture: _Architecture, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import reverse_permute_weights

    state = {}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type).reshape([int(x) for x in reversed(tensor.shape)])
        name = _hf_name(tensor.name)
        if architecture.permute_qk and name.endswith("q_proj.weight"):
            weights = reverse_permute_weights(weights, heads, heads)
        elif architecture.permute_qk and name.endswith("k_proj.weight"):
            weights = reverse_permute_weights(weights, kv_heads, kv_heads)
        state[name] = torch.from_numpy(np.array(weights, dtype=np.float32))  # a writable copy
    return state


def _pre_tokenizer(name: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if name == "qwen2":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if name == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
    raise ValueError(f"GGUF pre-tokenizer {name!r} is not supported; supported: qwen2, smollm")


def _tokenizer(reader: Any) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = _strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ")) for merge in _strings(reader, "tokenizer.ggml.merges")]
    field = reader.fields["tokenizer.ggml.token_type"]
    types = [int(field.parts[index][0]) for index in field.data]
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind != _UNUSED}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    pre = str(_optional_field(reader, "tokenizer.ggml.pre") or "smollm")
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS
    if _optional_field(reader, "tokenizer.ggml.add_bos_token"):
        raise ValueError("GGUF tokenizers that add a BOS token are not supported by this converter")
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, kind in enumerate(types) if kind == _USER_DEFINED])
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in enumerate(types) if kind == _CONTROL])

    def token(name: str) -> str | None:
        index = _optional_field(reader, f"tokenizer.ggml.{name}")
        return None if index is None else tokens[int(index)]

    architecture = _field(reader, "general.architecture")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"), unk_token=token("unknown_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        model_max_length=int(_field(reader, f"{architecture}.context_length")), padding_side="left",
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"],
    )


def _config(reader: Any, architecture: _Architecture, tokenizer: Any, vocab_size: int, tied: bool) -> Any:
    import transformers

    prefix = _field(reader, "general.architecture")
    heads = int(_field(reader, f"{prefix}.attention.head_count"))
    values: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=int(_field(reader, f"{prefix}.embedding_length")),
        intermediate_size=int(_field(reader, f"{prefix}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{prefix}.block_count")), num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{prefix}.attention.head_count_kv")),
        rope_theta=float(_field(reader, f"{prefix}.rope.freq_base")),
        rms_norm_eps=float(_field(reader, f"{prefix}.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_field(reader, f"{prefix}.context_length")), tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    if prefix == "qwen2":
        values["use_sliding_window"] = False  # Qwen2.5's own config.json
    return getattr(transformers, architecture.config_class)(**values)


def convert(source: Path, target: Path, source_description: dict[str, Any]) -> None:
    """Write the HF checkpoint of the GGUF ``source`` into ``target`` (created atomically). ``source_description``
    is stored in the marker file and later compared by :func:`is_current`."""
    import gguf
    import transformers

    reader = gguf.GGUFReader(str(source))
    name = _field(reader, "general.architecture")
    if name not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {name!r} is not supported; supported: {', '.join(_ARCHITECTURES)}")
    architecture = _ARCHITECTURES[name]
    tokenizer = _tokenizer(reader)
    heads = int(_field(reader, f"{name}.attention.head_count"))
    state = _state_dict(reader, architecture, heads, int(_field(reader, f"{name}.attention.head_count_kv")))
    tied = "lm_head.weight" not in state
    config = _config(reader, architecture, tokenizer, state["model.embed_tokens.weight"].shape[0], tied)
    model = getattr(transformers, architecture.model_class)(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != ({"lm_head.weight"} if tied else set()):
        raise ValueError(f"unexpected GGUF layout: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"converter_version": CONVERTER_VERSION, **source_description}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def is_current(folder: Path, source_description: dict[str, Any]) -> bool:
    """Whether ``folder`` holds this converter's conversion of the source described by ``source_description``."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker == {"converter_version": CONVERTER_VERSION, **source_description}
