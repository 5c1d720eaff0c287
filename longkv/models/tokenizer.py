"""The tokenizer: a thin wrapper over `transformers.AutoTokenizer` (tokenization itself is not
reimplemented), plus the few facts the engine needs (stop ids, chat template) and `StreamDecoder`, which
turns generated ids into printable text one token at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

# Tokens that end a chat turn in the common templates (ChatML, Gemma, Llama 3, Phi). A chat model
# that emits one is done even if the tokenizer's eos is another token.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
_REPLACEMENT = "\ufffd"     # what a decoder prints for an incomplete UTF-8 sequence


class Tokenizer:
    """`Tokenizer(folder)` for a folder that `AutoTokenizer.from_pretrained` reads (see fetch.resolve)."""

    def __init__(self, folder: str | Path, *, name: str | None = None):
        from transformers import AutoTokenizer

        folder = Path(folder)
        self.hf = AutoTokenizer.from_pretrained(str(folder))
        self.name = name or folder.name
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))
        self.bos_id: int | None = self.hf.bos_token_id
        self.eos_id: int | None = self.hf.eos_token_id
        self.vocab_size = len(self.hf)      # with added tokens; the model's embedding may be larger
        self.stop_ids: set[int] = self._stop_ids(folder)

    def _stop_ids(self, folder: Path) -> set[int]:
        ids = set()
        # config.json / generation_config.json may list several eos ids (e.g. Llama 3's <|eot_id|>).
        for f in ("config.json", "generation_config.json"):
            try:
                eos = json.loads((folder / f).read_text()).get("eos_token_id")
            except (OSError, ValueError):
                continue
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        if self.eos_id is not None:
            ids.add(self.eos_id)
        if self.has_chat_template:
            vocab = self.hf.get_vocab()
            ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
        return ids

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def chat(self, user_text: str, *, system: str | None = None) -> list[int]:
        """The prompt ids for one user turn, ready for the model's answer. Without a chat template
        (base models) the text is encoded as it is, after the system text and a blank line if given."""
        if not self.has_chat_template:
            return self.encode(user_text if system is None else f"{system}\n\n{user_text}")
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": user_text})
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already wrote any bos it wants; adding special tokens again would double it.
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab={self.vocab_size}, chat={self.has_chat_template})"


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text that became printable with that token.

    Decodes a short window of recent ids (from the last point where text was emitted) rather than the
    whole list, and emits what the new token added to it; decoding from the same start both times keeps
    byte-level and SentencePiece quirks (leading spaces) consistent. A trailing U+FFFD means a
    multi-byte character is still incomplete, so it is held back until its last byte arrives.
    The concatenation of everything returned (including `flush()`) equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0    # window start: ids[_prefix:_read] decode to text already emitted
        self._read = 0

    def _text(self, start: int, end: int | None = None) -> str:
        return self.tok.decode(self.ids[start:end], skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._text(self._prefix, self._read)
        text = self._text(self._prefix)
        if len(text) <= len(done) or text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD, as decode() would)."""
        done = self._text(self._prefix, self._read)
        text = self._text(self._prefix)
        self._prefix = self._read = len(self.ids)
        return text[len(done):]
