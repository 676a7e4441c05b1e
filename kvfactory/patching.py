"""``kvfactory.patch(model, method, **params)``: run a compression method inside one loaded model instance.

Patching is per instance, never per class: every attention module of *this* model gets kvfactory's forward (bound to
the architecture adapter and this handle), and the decoder stack's forward is wrapped so that each call runs with a
:class:`~kvfactory.cache.CompressedCache` (created when ``past_key_values`` is None or an empty ``DynamicCache``, as
``generate()`` passes) and with the validity of the new tokens taken from the 2-D attention mask. Two models in one
process can run different methods; ``handle.remove()`` (or leaving the ``with`` block) restores the model exactly.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from kvfactory import methods as method_registry
from kvfactory.architectures import adapter_for
from kvfactory.architectures.base import ArchitectureAdapter
from kvfactory.attention import ATTENTION_IMPLEMENTATIONS, AttentionSpec, attend, require_flash_attn
from kvfactory.cache import CompressedCache
from kvfactory.methods.base import Compressor
from kvfactory.models import ATTENTION_REQUEST
from kvfactory.quant import kv_shape
from kvfactory.storage.base import ModelContext, StorageFactory, default_storage

logger = logging.getLogger(__name__)

HANDLE_ATTRIBUTE = "_kvfactory_handle"


def attention_implementation(model: nn.Module) -> str:
    """The attention kvfactory runs for ``model``: its own ``attn_implementation``, or the sdpa asked of
    ``kvfactory.models.load`` for a class transformers builds only with eager (Phi-3 in 4.44.2)."""
    return getattr(model, ATTENTION_REQUEST, None) or model.config._attn_implementation


def _check_flash_ready(model: nn.Module) -> None:
    """flash_attention_2 needs flash-attn, and its CUDA kernels take fp16/bf16 only: say so before the first forward
    rather than fail inside a kernel."""
    require_flash_attn()
    weights = next(model.parameters(), None)
    if weights is not None and weights.device.type == "cuda" and weights.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attn_implementation='flash_attention_2' runs float16 or bfloat16 on CUDA; this model is "
                         f"{weights.dtype}. Load it with dtype='bfloat16' (or 'float16'), or use 'sdpa' or 'eager'")


@dataclass
class _Step:
    cache: CompressedCache | None
    valid: torch.Tensor | None
    new_tokens: int = 0


def _replace_forward(module: nn.Module, make_forward: Callable[[Callable[..., Any]], Callable[..., Any]]
                     ) -> Callable[[], None]:
    """Install ``make_forward(current_forward)`` on this module instance, under accelerate's hook when there is one
    (its ``_old_forward``, so inputs still move to the module's device); returns the undo."""
    attribute = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    previous = module.__dict__.get(attribute)
    setattr(module, attribute, make_forward(getattr(module, attribute)))

    def undo() -> None:
        if previous is None:
            delattr(module, attribute)
        else:
            setattr(module, attribute, previous)

    return undo


class PatchHandle:
    """A model running a compression method. ``remove()`` restores it; usable as a context manager.

    Attributes
    ----------
    method: the compressor. last_cache: the cache of the most recent forward (handy after ``generate()``).
    """

    def __init__(self, model: nn.Module, method: Compressor, adapter: ArchitectureAdapter) -> None:
        self.model = model
        self.method = method
        self.adapter = adapter
        config = model.config
        self.attention_modules = adapter.attention_modules(model)
        self.num_layers = len(self.attention_modules)
        self.spec = AttentionSpec(attention_implementation(model), adapter.sliding_window(config))
        self.storage: StorageFactory = default_storage()
        self.last_cache: CompressedCache | None = None
        self._step: _Step | None = None
        self._undo: list[Callable[[], None]] = []
        self._removed = False
        self._observer: Callable[[int, torch.Tensor, CompressedCache], None] | None = None
        self._reconstructing = False

    # -- used by the adapters' forwards -------------------------------------------------------------------------
    @property
    def active_cache(self) -> CompressedCache | None:
        return None if self._step is None else self._step.cache

    def position_limit(self) -> int | None:
        """A host-side bound (exclusive) on every position of the forward in flight: the tokens the cache has seen
        plus this forward's (positions made by transformers, or from an attention mask, never exceed it). Read
        instead of the positions' maximum, so that RoPE tables need no device sync per layer."""
        if self._step is None:
            return None
        seen = self._step.cache.get_seq_length() if self._step.cache is not None else 0
        return seen + self._step.new_tokens

    def attend_layer(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     position_ids: torch.Tensor | None) -> torch.Tensor:
        """Attention of one layer's new tokens (post-RoPE, KV heads), through the cache when there is one."""
        batch, n = keys.shape[0], keys.shape[-2]
        cache = self.active_cache
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(seen, seen + n, device=keys.device)[None]
        positions = position_ids.to(keys.device).expand(batch, n)
        if cache is not None:
            output = cache.forward_layer(layer_idx, queries, keys, values, positions)
            if self._observer is not None:  # a context-reconstruction pass (KVzip) watches its queries
                self._observer(layer_idx, queries, cache)
            return output
        valid = None if self._step is None or self._step.valid is None else self._step.valid.to(keys.device)
        spec = self.spec
        if spec.sliding_window is not None and n <= spec.sliding_window:  # no cache: positions below n
            spec = dataclasses.replace(spec, sliding_window=None)
        output, _ = attend(queries, keys, values, spec, key_valid=valid, query_valid=valid,
                           query_positions=positions, key_positions=positions[:, None].expand(-1, keys.shape[1], -1))
        return output

    # -- caches ------------------------------------------------------------------------------------------------
    def new_cache(self) -> CompressedCache:
        """An empty cache for this model and method (pass it as ``past_key_values`` to reuse it across calls)."""
        rotary = self.rotate if self.method.position_shift else None
        return CompressedCache(self.method, self.num_layers, self.spec, self.storage, rotary)

    def save_cache(self, path: str, cache: CompressedCache | None = None) -> None:
        """Save ``cache`` (default: the last one) to ``path`` (safetensors) and ``path + ".json"`` (method, model)."""
        from kvfactory.persist import save_cache

        cache = cache or self.last_cache
        if cache is None:
            raise ValueError("no cache to save: run the context through the patched model first")
        save_cache(cache, path, self.model)

    def load_cache(self, path: str) -> CompressedCache:
        """A cache holding what :meth:`save_cache` wrote, for this model and method only (else a ValueError); pass it
        as ``past_key_values``."""
        from kvfactory.persist import load_cache

        return load_cache(path, self)

    def rotate(self, layer_idx: int, states: torch.Tensor, positions: torch.Tensor, inverse: bool = False
               ) -> torch.Tensor:
        """Apply (or undo) layer ``layer_idx``'s RoPE at ``positions`` (for storage that keeps pre-RoPE keys)."""
        return self.adapter.rotate(self.attention_modules[layer_idx], states, positions, inverse, self.position_limit())

    def _resolve_cache(self, past: Any) -> CompressedCache:
        if isinstance(past, CompressedCache):
            if past.num_layers != self.num_layers:
                raise ValueError(f"this cache has {past.num_layers} layers; the model has {self.num_layers}")
            return past
        if past is None or (isinstance(past, DynamicCache) and past.get_seq_length() == 0):
            return self.new_cache()
        raise ValueError(
            "a patched model needs past_key_values=None, an empty DynamicCache or a kvfactory CompressedCache "
            f"(from handle.new_cache()); got {type(past).__name__}"
            + (" holding tokens" if isinstance(past, DynamicCache) else "")
        )

    @contextmanager
    def _running(self, cache: CompressedCache | None, valid: torch.Tensor | None, batch_size: int,
                 new_tokens: int, token_ids: torch.Tensor | None = None) -> Iterator[None]:
        outer = self._step
        self._step = _Step(cache, valid, new_tokens)
        if cache is not None:
            cache.begin_step(batch_size, new_tokens, valid, token_ids)
        committed = False
        try:
            yield
            committed = True
            if cache is not None:
                self.last_cache = cache
        finally:
            self._step = outer
            if cache is not None:
                cache.end_step(committed)

    # -- the decoder stack's forward ---------------------------------------------------------------------------
    def _wrap_base_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def forward(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs).arguments
            extra = arguments.pop("kwargs", {})
            inputs = arguments.get("input_ids")
            if inputs is None:
                inputs = arguments.get("inputs_embeds")
            if inputs is None or inputs.shape[1] == 0:
                raise ValueError("the prompt is empty: a patched model needs at least one input token")
            new_tokens = inputs.shape[1]
            use_cache = arguments.get("use_cache")
            if use_cache is None:
                use_cache = self.model.config.use_cache
            cache = self._resolve_cache(arguments.get("past_key_values")) if use_cache else None
            if cache is not None:
                arguments["past_key_values"] = cache
            valid = self._new_token_validity(arguments.get("attention_mask"), new_tokens)
            chunk = self.method.prefill_chunk_size
            if (cache is not None and cache.get_seq_length() == 0 and self.method.reconstructs_context
                    and not self._reconstructing):
                # one unpadded sample, prefilled whole: the scratch prefill is this prefill (same forward, same
                # keys, values and output); its cache is compressed instead of prefilling a second time
                reuse = chunk is None and valid is None and inputs.shape[0] == 1
                reused = self._reconstruct(forward, arguments.get("input_ids"), valid,
                                           (arguments, extra) if reuse else None)
                if reused is not None:
                    output, scratch = reused
                    with self._running(cache, None, 1, new_tokens, arguments.get("input_ids")):
                        cache.adopt_prefill(scratch)
                    if isinstance(output, tuple):
                        return (output[0], cache, *output[2:])
                    output.past_key_values = cache
                    return output
            if chunk is not None and cache is not None and cache.get_seq_length() == 0 and new_tokens > chunk:
                return self._prefill_in_chunks(forward, arguments, extra, cache, valid, chunk)
            with self._running(cache, valid, inputs.shape[0], new_tokens, arguments.get("input_ids")):
                self.adapter.prepare_base_call(arguments, self, new_tokens)
                output = original(**arguments, **extra)
            if cache is not None:
                if isinstance(output, tuple):
                    output = (output[0], cache, *output[2:])
                else:
                    output.past_key_values = cache
            return output

        return forward

    def _reconstruct(self, forward: Callable[..., Any], input_ids: torch.Tensor | None, valid: torch.Tensor | None,
                     call: tuple[dict[str, Any], dict[str, Any]] | None = None) -> tuple[Any, CompressedCache] | None:
        """Score each sample's context by reconstruction before its prefill (methods with ``reconstructs_context``,
        KVzip): the context into a scratch full cache, then each repeat pass over it, its queries handed to the
        method's ``observe``. With ``call`` (the prefill's own arguments and extra keywords, one unpadded sample),
        the scratch prefill is that call: its output and the scratch cache (rolled back to the context) are returned
        for the caller to compress instead of prefilling again; otherwise the scratch cache is dropped (None)."""
        if input_ids is None:
            raise ValueError(f"{self.method.name} reconstructs the context from its token ids: pass input_ids")
        method = self.method
        heads = kv_shape(self.model.config)[0]
        self._reconstructing = True
        try:
            for b in range(input_ids.shape[0]):
                row = input_ids[b] if valid is None else input_ids[b][valid[b].to(input_ids.device)]
                scratch = CompressedCache(method_registry.get("fullkv"), self.num_layers, self.spec)
                method.begin_sample(self.num_layers, heads, row.shape[0], row.device)
                if call is None:
                    with torch.no_grad():
                        forward(input_ids=row[None], past_key_values=scratch, use_cache=True)
                else:  # the prefill itself, under the caller's grad mode
                    arguments, extra = call
                    output = forward(**{**arguments, "past_key_values": scratch, "use_cache": True}, **extra)
                with torch.no_grad():
                    mark = scratch.mark()
                    for start, end, repeat in method.reconstruction_passes(row):
                        self._observer = lambda layer, queries, cache, start=start, end=end: method.observe(
                            layer, queries, cache[layer][0], start, end)
                        forward(input_ids=repeat[None], past_key_values=scratch, use_cache=True)
                        self._observer = None
                        scratch.rollback(mark)
                method.end_sample(method.capacity(0, self.num_layers, row.shape[0]))
        finally:
            self._observer = None
            self._reconstructing = False
        return None if call is None else (output, scratch)

    @staticmethod
    def _prefill_in_chunks(forward: Callable[..., Any], arguments: dict[str, Any], extra: dict[str, Any],
                           cache: CompressedCache, valid: torch.Tensor | None, chunk: int) -> Any:
        """Run a fresh cache's prompt through ``forward`` ``chunk`` tokens at a time; after the first chunk the cache
        compresses to the prefill capacity after each chunk (``compressing_chunks``). The output is the last chunk's,
        with the hidden states of every chunk concatenated."""
        if valid is not None:
            raise ValueError("prefill_chunk_size needs an unpadded batch (left padding would leave chunks without real "
                             "tokens); run padded prompts one at a time")
        if arguments.get("output_attentions") or arguments.get("output_hidden_states"):
            raise ValueError("prefill_chunk_size does not return per-layer attentions or hidden states")
        key = "input_ids" if arguments.get("input_ids") is not None else "inputs_embeds"
        total = arguments[key].shape[1]
        hidden, output = [], None
        for start in range(0, total, chunk):
            stop = min(total, start + chunk)
            part = dict(arguments, past_key_values=cache, use_cache=True)
            part[key] = arguments[key][:, start:stop]
            if arguments.get("attention_mask") is not None:
                part["attention_mask"] = arguments["attention_mask"][:, :stop]
            for name in ("position_ids", "cache_position"):
                if arguments.get(name) is not None:
                    part[name] = arguments[name][..., start:stop]
            cache.compressing_chunks = start > 0
            try:
                output = forward(**part, **extra)
            finally:
                cache.compressing_chunks = False
            hidden.append(output[0])
        assert output is not None
        states = torch.cat(hidden, dim=1)
        if isinstance(output, tuple):
            return (states, *output[1:])
        output.last_hidden_state = states
        return output

    @staticmethod
    def _new_token_validity(attention_mask: torch.Tensor | None, new_tokens: int) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError("a patched model takes a 2-D attention_mask (batch, tokens); custom 4-D masks are not supported")
        valid = attention_mask[:, -new_tokens:].bool()
        return None if bool(valid.all()) else valid

    # -- install / remove --------------------------------------------------------------------------------------
    def _install(self) -> None:
        for layer_idx, module in enumerate(self.attention_modules):
            forward = self.adapter.make_attention_forward(self, module, layer_idx)
            self._undo.append(_replace_forward(module, lambda _original, forward=forward: forward))
        self._undo.append(_replace_forward(self.adapter.base_model(self.model), self._wrap_base_forward))
        self._undo.extend(self.adapter.install(self.model, self))
        setattr(self.model, HANDLE_ATTRIBUTE, self)
        self._undo.append(lambda: delattr(self.model, HANDLE_ATTRIBUTE))

    def remove(self) -> None:
        """Restore the model's own forwards (idempotent)."""
        if self._removed:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._removed = True

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"PatchHandle({type(self.model).__name__}, {self.method!r}, {state})"


def patch(model: nn.Module, method: str | Compressor = "fullkv", **params: Any) -> PatchHandle:
    """Patch ``model`` (this instance only) to run ``method`` with ``params``.

    Parameters
    ----------
    model:
        A model of a class in ``kvfactory.architectures.supported_architectures()`` (Llama, Mistral, Mixtral,
        Qwen2, Phi-3, GPT-NeoX) loaded with ``attn_implementation``
        eager, sdpa or flash_attention_2 (the latter needs the flash-attn package).
    method:
        A name from ``kvfactory.methods.names()`` or a compressor instance.
    params:
        The method's parameters (``kvfactory.methods.parameters(name)``) and the composition keywords of
        ``kvfactory.methods.get`` (``scorer``, per-layer ``max_capacity_prompt`` lists, ``decode_method``,
        ``prefill_chunk_size``, and ``quant_method``/``nbits``/... to quantize what the method keeps); unknown ones
        are an error. With a compressor instance only the quantization parameters may be added.
    """
    adapter = adapter_for(model)
    implementation = attention_implementation(model)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {implementation!r} is not supported; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if implementation == "flash_attention_2":
        _check_flash_ready(model)
    if getattr(model, HANDLE_ATTRIBUTE, None) is not None:
        raise ValueError("this model is already patched; call remove() on its handle first")
    compressor = method_registry.wrap(method, **params) if isinstance(method, Compressor) else (
        method_registry.get(method, **params))
    handle = PatchHandle(model, compressor, adapter)
    compressor.attach(handle)
    heads, head_dim = kv_shape(model.config)
    handle.storage = compressor.make_storage(ModelContext(
        handle.num_layers, heads, head_dim, next(model.parameters()).dtype, handle.rotate))
    handle._install()
    logger.info("patched %s with %s", type(model).__name__, compressor)
    return handle
