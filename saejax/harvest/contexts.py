"""Documents -> fixed-length token contexts, the way the model expects them.

Documents are tokenised without special tokens and packed end to end; each
context is the tokenizer's own single-sequence template (e.g. [CLS] ... [SEP]
for BERT, nothing for GPT-2) around `context_length - template` content
tokens. The final partial context is dropped (counted in the ledger). A
position is kept for the store unless it holds a special token (template
tokens and special ids occurring in the text), when exclusion is on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator

import numpy as np

from saejax.errors import ConfigError

DOCS_PER_TOKENIZER_CALL = 64


@dataclasses.dataclass
class Template:
    prefix: list[int]
    suffix: list[int]
    special_ids: list[int]

    @classmethod
    def of(cls, tokenizer) -> "Template":
        """Find the tokens the tokenizer adds around one sequence by encoding a probe."""
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return cls(list(full[:start]), list(full[start + len(bare):]), sorted(set(tokenizer.all_special_ids)))
        raise ConfigError(f"cannot find the special-token template of {type(tokenizer).__name__}: "
                          f"'a' encodes as {bare} alone but {full} with special tokens")

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.suffix)


@dataclasses.dataclass
class Context:
    index: int
    ids: np.ndarray  # int64 (context_length,)
    keep: np.ndarray  # bool (context_length,): positions whose activations are stored


class ContextPacker:
    """Iterates contexts of a text source; hashes the text and the token stream as it goes."""

    def __init__(self, tokenizer, context_length: int, exclude_special_tokens: bool):
        self.tokenizer = tokenizer
        self.template = Template.of(tokenizer)
        self.context_length = int(context_length)
        self.content_length = self.context_length - self.template.size
        if self.content_length < 1:
            raise ConfigError(f"context_length={context_length} leaves no room for text after the tokenizer's "
                              f"{self.template.size} special tokens")
        self.exclude_special_tokens = bool(exclude_special_tokens)
        self.text_digest = hashlib.sha256()
        self.token_digest = hashlib.sha256()
        self.dropped_tail_tokens = 0

    def _token_stream(self, documents: Iterator[str]) -> Iterator[list[int]]:
        group: list[str] = []
        for doc in documents:
            self.text_digest.update(doc.encode("utf-8") + b"\x00")
            group.append(doc)
            if len(group) == DOCS_PER_TOKENIZER_CALL:
                yield from self.tokenizer(group, add_special_tokens=False)["input_ids"]
                group = []
        if group:
            yield from self.tokenizer(group, add_special_tokens=False)["input_ids"]

    def contexts(self, documents: Iterator[str]) -> Iterator[Context]:
        special = np.asarray(self.template.special_ids, np.int64)
        pending: list[int] = []
        used, index = 0, 0  # pending[:used] is already in contexts
        for ids in self._token_stream(documents):
            pending = pending[used:] + list(ids)
            used = 0
            while len(pending) - used >= self.content_length:
                content = pending[used:used + self.content_length]
                used += self.content_length
                full = np.asarray(self.template.prefix + content + self.template.suffix, np.int64)
                keep = np.ones(self.context_length, bool)
                if self.exclude_special_tokens:
                    keep &= ~np.isin(full, special)
                    keep[: len(self.template.prefix)] = False
                    keep[self.context_length - len(self.template.suffix):] = False
                self.token_digest.update(full.astype("<i8").tobytes())
                yield Context(index, full, keep)
                index += 1
        self.dropped_tail_tokens = len(pending) - used

    def excluded_tokens(self) -> dict:
        """What the store leaves out, for the ledger."""
        tokens = self.tokenizer.convert_ids_to_tokens(self.template.special_ids)
        return {
            "special_tokens_excluded": self.exclude_special_tokens,
            "special_tokens": dict(zip(tokens, self.template.special_ids, strict=True)),
            "template_prefix": self.template.prefix,
            "template_suffix": self.template.suffix,
        }


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (fast tokenizers) or its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        # Truncation and padding are call-time state (transformers sets and clears them
        # on each call), not the tokenizer's definition: hashed cleared, as after a call.
        copy = Tokenizer.from_str(backend.to_str())
        copy.no_truncation()
        copy.no_padding()
        text = copy.to_str()
    else:
        text = repr(sorted(tokenizer.get_vocab().items())) + repr(tokenizer.all_special_ids)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
