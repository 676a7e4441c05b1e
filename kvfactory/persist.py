"""Saving a compressed context and loading it back: one compression, many questions, across processes.

``handle.save_cache(path)`` writes ``path`` (safetensors: every layer's store, the decode query windows) and
``path + ".json"`` (the method and its parameters, the model's identity, the cache's lengths).
``handle.load_cache(path)`` rebuilds the :class:`~kvfactory.cache.CompressedCache`, refusing a file saved from
another model (a different config or different weights) or with another method or parameters: the kept tokens would
mean nothing there. Full-precision stores (dense and head-wise) are saved; quantized ones are refused for now.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kvfactory.cache import CompressedCache
from kvfactory.storage.base import store_from_state

FORMAT = 1


def model_identity(model: nn.Module) -> dict[str, str]:
    """The model's class, a hash of its config and a hash of a sample of its weights."""
    config = json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str)
    weights = hashlib.sha256()
    for _, parameter in sorted(model.named_parameters())[:8]:
        weights.update(parameter.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return {"class": type(model).__name__, "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
            "weights_sha256": weights.hexdigest()}


def _metadata_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def save_cache(cache: CompressedCache, path: str | Path, model: nn.Module) -> Path:
    """Write ``cache`` (after a prefill, or later) to ``path`` and its metadata beside it."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    kinds = []
    for layer_idx, store in enumerate(cache.stores):
        if store is None:
            raise ValueError(f"layer {layer_idx} holds nothing: run the context through the model first")
        kinds.append(store.kind)
        tensors.update({f"layer{layer_idx}.{name}": t.detach().cpu() for name, t in store.state().items()})
    for layer_idx, window in enumerate(cache.query_windows):
        if window is not None:
            tensors[f"window{layer_idx}"] = window.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT, "model": model_identity(model), "method": json.loads(json.dumps(cache.method.describe(),
                                                                                         default=str)),
        "kinds": kinds, "seen_tokens": cache.get_seq_length(), "sample_lengths": cache.sample_lengths,
        "prefill_kept": cache.prefill_kept, "compressions": cache.compressions,
        "num_query_heads": cache.num_query_heads,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    _metadata_path(path).write_text(json.dumps(metadata, indent=1))
    return path


def load_cache(path: str | Path, handle: Any) -> CompressedCache:
    """A cache for ``handle`` (a ``PatchHandle``) holding what ``path`` saved; refused unless the model and the
    method (with every parameter) are the ones it was saved with."""
    path = Path(path)
    metadata = json.loads(_metadata_path(path).read_text())
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: cache format {metadata.get('format')!r}, this kvfactory reads {FORMAT}")
    identity = model_identity(handle.model)
    if metadata["model"] != identity:
        differs = ", ".join(k for k in identity if metadata["model"].get(k) != identity[k])
        raise ValueError(f"{path} was saved from another model ({differs} differ): a compressed context only "
                         "answers on the model that computed it")
    method = json.loads(json.dumps(handle.method.describe(), default=str))
    if metadata["method"] != method:
        differs = ", ".join(sorted(k for k in set(method) | set(metadata["method"])
                                   if method.get(k) != metadata["method"].get(k)))
        raise ValueError(f"{path} was saved with another method or parameters ({differs} differ): patch the model "
                         f"with {metadata['method']}")
    tensors = load_file(str(path), device=str(next(handle.model.parameters()).device))
    cache = handle.new_cache()
    for layer_idx, kind in enumerate(metadata["kinds"]):
        prefix = f"layer{layer_idx}."
        cache.stores[layer_idx] = store_from_state(
            kind, {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)})
        cache.query_windows[layer_idx] = tensors.get(f"window{layer_idx}")
    cache._seen_tokens = metadata["seen_tokens"]
    cache.sample_lengths = metadata["sample_lengths"]
    cache.prefill_kept = metadata["prefill_kept"]
    cache.compressions = metadata["compressions"]
    cache.num_query_heads = metadata["num_query_heads"]
    return cache
