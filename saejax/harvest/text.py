"""Where harvest text comes from: documents, in a fixed order.

  builtin:pydoc_topics        Python's help topics (pydoc_data.topics), ~0.5 MB of English
  builtin:stdlib_docstrings   docstrings of the standard library's .py files (parsed, not imported)
  builtin:python_docs         both of the above
  PATH.txt                    one document per file
  PATH.jsonl                  one document per line, from the field `text.field`
  DIRECTORY                   every .txt and .jsonl below it, in sorted path order
  hf:NAME                     a Hugging Face `datasets` dataset (streamed), field `text.field`
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import sysconfig
from typing import Iterator

from saejax.errors import ConfigError, DataError

BUILTIN = ("pydoc_topics", "stdlib_docstrings", "python_docs")
FILE_SUFFIXES = (".txt", ".jsonl")


class TextSource:
    """An ordered, re-iterable sequence of documents, with a hash of everything read."""

    def __init__(self, spec: str, field: str = "text", dataset_config: str = "", dataset_split: str = "train"):
        self.spec, self.field = spec, field
        self.dataset_config, self.dataset_split = dataset_config, dataset_split
        if spec.startswith("builtin:"):
            name = spec.split(":", 1)[1]
            if name not in BUILTIN:
                raise ConfigError(f"text.source={spec!r}: unknown built-in text; use one of "
                                  f"{', '.join('builtin:' + b for b in BUILTIN)}")
            self.kind, self.files = "builtin", []
        elif spec.startswith("hf:"):
            self.kind, self.files = "hf", []
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise ConfigError(f"text.source={spec!r} needs the `datasets` package: pip install datasets") from None
        else:
            self.kind, self.files = "files", self._list_files(spec)

    @staticmethod
    def _list_files(spec: str) -> list[str]:
        path = os.path.abspath(os.path.expanduser(spec))
        if os.path.isfile(path):
            if not path.endswith(FILE_SUFFIXES):
                raise ConfigError(f"text.source={spec!r}: harvest reads .txt and .jsonl files; got {os.path.basename(path)}")
            return [path]
        if os.path.isdir(path):
            found = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files if f.endswith(FILE_SUFFIXES))
            if not found:
                raise DataError(f"text.source={spec!r}: the directory holds no .txt or .jsonl files")
            return found
        raise ConfigError(f"text.source={spec!r} is not a file, a directory, builtin:NAME or hf:NAME "
                          f"(built-in texts: {', '.join('builtin:' + b for b in BUILTIN)})")

    def describe(self) -> str:
        return self.spec if self.kind != "files" or len(self.files) != 1 else self.files[0]

    def documents(self) -> Iterator[str]:
        """Non-empty documents, always in the same order."""
        if self.kind == "builtin":
            name = self.spec.split(":", 1)[1]
            if name in ("pydoc_topics", "python_docs"):
                yield from _pydoc_topics()
            if name in ("stdlib_docstrings", "python_docs"):
                yield from _stdlib_docstrings()
        elif self.kind == "hf":
            yield from self._dataset_documents()
        else:
            for path in self.files:
                yield from self._file_documents(path)

    def _file_documents(self, path: str) -> Iterator[str]:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text.strip():
                yield text
            return
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_number} is not valid JSON ({e})") from None
                if not isinstance(record, dict) or self.field not in record:
                    raise DataError(f"{path}:{line_number} has no field {self.field!r}; set --config.text.field to the "
                                    "field holding the text")
                if isinstance(record[self.field], str) and record[self.field].strip():
                    yield record[self.field]

    def _dataset_documents(self) -> Iterator[str]:
        import datasets

        name = self.spec.split(":", 1)[1]
        rows = datasets.load_dataset(name, self.dataset_config or None, split=self.dataset_split, streaming=True)
        for row in rows:
            if self.field not in row:
                raise DataError(f"dataset {name!r} has no field {self.field!r} (fields: {sorted(row)}); "
                                "set --config.text.field")
            if isinstance(row[self.field], str) and row[self.field].strip():
                yield row[self.field]


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _stdlib_docstrings() -> Iterator[str]:
    """Module, class and function docstrings of the standard library, file by file."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__", "idlelib"))
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, filename), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=False)
                    if doc and len(doc.split()) >= 5:
                        docs.append(inspect.cleandoc(doc))
            if docs:
                yield "\n\n".join(docs)

