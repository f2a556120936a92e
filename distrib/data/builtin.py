"""The offline corpora: this Python's standard library as code, prose and instruct examples.

Nothing is downloaded, so a run (and the tests) can train end to end on any machine; the documents
depend on the Python version only, and validation is held out by a stable hash of each key.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import os
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from distrib.config import ConfigError

#: Small corpora still get a few validation documents, or evaluation would measure nothing.
_MIN_VALIDATION_DOCS = 4

#: Built-in instruct examples longer than this many characters (prompt plus response) are left out:
#: at a fine-tuning ``seq_len`` of a few hundred tokens they would mostly be truncated, and the long
#: functions are the least self-contained. 2,000 characters of code are about 600 tokens of a
#: 4,096-token BPE.
_INSTRUCT_MAX_CHARS = 2000

#: Standard-library directories that are not ordinary library code: installed third-party
#: packages, test suites (some deliberately broken or Python 2), bytecode, the pydoc topic data
#: (that is the prose corpus) and the build configuration (``config-3.x-<platform>``).
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}


#: A document of a built-in corpus: a text, or a prompt/response dict.
_Doc = TypeVar("_Doc")


def builtin_corpus(domain: str, validation_fraction: float = 0.02) -> dict[str, list]:
    """An offline corpus made from this Python's standard library.

    ``code`` is the library's ``.py`` sources, one document per file. ``prose`` is English
    documentation: the language-reference topics shipped in ``pydoc_data`` and the module
    docstrings of the library, one document per topic or module. ``instruct`` is instruction data
    for fine-tuning: one ``{"prompt": ..., "response": ...}`` example per documented public function
    or method, the prompt asking for the function by its signature and docstring, the response its
    code without the docstring (see :func:`_stdlib_instructions`). Test suites, installed packages
    and the machine-specific ``_sysconfigdata`` are left out, so the corpus depends on the Python
    version only.

    Args:
        domain: ``"code"``, ``"prose"`` or ``"instruct"``.
        validation_fraction: share of documents held out, chosen by a stable hash of each
            document's key (at least a few documents are always held out).

    Returns:
        ``{"train": [...], "validation": [...]}``, each in sorted key order: strings for ``code``
        and ``prose``, ``{"prompt", "response"}`` dicts for ``instruct``.

    Raises:
        ConfigError: for an unknown domain.
    """
    if domain == "code":
        docs = _stdlib_sources()
    elif domain == "prose":
        docs = _stdlib_prose()
    elif domain == "instruct":
        docs = _stdlib_instructions()
    else:
        raise ConfigError(
            f"data.name={domain!r} is not a built-in corpus; use data.name=code, data.name=prose or data.name=instruct"
        )
    return _split_by_hash(docs, validation_fraction)


def _stdlib_sources() -> dict[str, str]:
    """Relative posix path -> source text for every readable library ``.py`` file."""
    root = sysconfig.get_paths()["stdlib"]
    docs = {}
    for directory, subdirs, files in os.walk(root):
        # Prune in place so os.walk never descends into site-packages (which can be huge).
        subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                docs[Path(os.path.relpath(path, root)).as_posix()] = text
    return docs


def _stdlib_prose() -> dict[str, str]:
    """Key -> English text: pydoc topics and module docstrings."""
    docs = {}
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; module docstrings remain
        topics = {}
    for name, text in topics.items():
        if isinstance(text, str) and text.strip():
            docs[f"topics/{name}"] = text.strip() + "\n"
    for path, source in _stdlib_sources().items():
        doc = _module_docstring(source)
        if doc:
            docs[f"modules/{path}"] = doc + "\n"
    return docs


def _module_docstring(source: str) -> str | None:
    """The docstring of a module's source, read from its first tokens only.

    Parsing the whole file with ``ast`` would take seconds for the library; the docstring is the
    first statement, so tokenizing until the first significant token is enough.
    """
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in skip:
                continue
            if tok.type != tokenize.STRING:
                return None
            value = ast.literal_eval(tok.string)
            return inspect.cleandoc(value) if isinstance(value, str) and value.strip() else None
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    return None


def _stdlib_instructions() -> dict[str, dict[str, str]]:
    """``module:qualname`` -> ``{"prompt", "response"}`` for the library's documented public functions.

    Every module-level function and method (of classes at any depth, also those defined under a
    module- or class-level ``if``/``try``) whose name path has no ``_``-prefixed part and that has
    a docstring becomes one example::

        prompt:   Write a Python function `name(args) -> ret` (module `pkg.mod`) that does the following:
                  <the docstring, cleaned as inspect.cleandoc does>
        response: def name(args) -> ret:
                      <the body without the docstring>

    (``method `Class.name(self, ...)``` for methods). The response is the function's own source
    lines from ``def`` to its end, dedented, with the docstring's lines cut out; decorators are
    left out (they often name module internals the prompt does not show). Functions nested in
    functions are skipped (they depend on their closure), and so are functions whose remaining
    body is trivial (``pass``, ``...``, ``raise NotImplementedError``, a bare ``return``), whose
    docstring shares a line with code, whose source cannot be cut cleanly (a multi-line string
    less indented than the ``def``), and examples longer than ``_INSTRUCT_MAX_CHARS``. Of two
    definitions with one qualified name (per-platform variants) the first is kept.

    Everything is derived from the sorted file walk of :func:`_stdlib_sources` and ``ast``, so the
    result is the same on every run and machine with the same Python version. Parsing the whole
    library with ``ast`` is the cost (about 2-5 seconds on one core); it is paid once per cache build.
    """
    examples: dict[str, dict[str, str]] = {}
    for path, source in _stdlib_sources().items():
        module = _module_name(path)
        for qualname, prompt, response in _function_examples(source, module):
            examples.setdefault(f"{module}:{qualname}", {"prompt": prompt, "response": response})
    return examples


def _module_name(path: str) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _function_examples(source: str, module: str) -> Iterator[tuple[str, str, str]]:
    """``(qualname, prompt, response)`` for each documented public function of one module's source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file of another Python version, or a NUL byte
        return
    # Split on "\n" only: ast counts lines so, while str.splitlines also breaks at form feeds,
    # which some library files contain.
    lines = source.split("\n")
    for node, qualname, is_method in _public_functions(tree.body, ""):
        docstring = ast.get_docstring(node, clean=True)
        if not docstring or not docstring.strip():
            continue
        response = _code_without_docstring(node, lines)
        if response is None:
            continue
        signature = f"{qualname}({ast.unparse(node.args)})"
        if node.returns is not None:
            signature += f" -> {ast.unparse(node.returns)}"
        kind = "method" if is_method else "function"
        prompt = f"Write a Python {kind} `{signature}` (module `{module}`) that does the following:\n{docstring}\n"
        if len(prompt) + len(response) <= _INSTRUCT_MAX_CHARS:
            yield qualname, prompt, response


def _public_functions(body: list[ast.stmt], prefix: str, in_class: bool = False) -> Iterator[tuple[ast.AST, str, bool]]:
    """``(node, qualname, is_method)`` for the public functions of a module or class body, in source order."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            if not node.name.startswith("_"):
                yield from _public_functions(node.body, f"{prefix}{node.name}.", in_class=True)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not node.name.startswith("_"):
                yield node, prefix + node.name, in_class
        elif isinstance(node, ast.If):  # per-platform or per-version definitions
            yield from _public_functions(node.body, prefix, in_class)
            yield from _public_functions(node.orelse, prefix, in_class)
        elif isinstance(node, ast.Try):  # "try: import fast; except ImportError: def slow(...)"
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _public_functions(block, prefix, in_class)


def _code_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The source of ``node`` from ``def`` to its end, dedented, without its docstring; None if unusable."""
    doc, rest = node.body[0], node.body[1:]
    if not rest or all(_is_trivial(stmt) for stmt in rest):
        return None
    # ast columns count UTF-8 bytes; only the docstring's own lines may be cut out, so it must
    # start on a line of its own and leave nothing but a comment after it.
    before = lines[doc.lineno - 1].encode()[: doc.col_offset]
    after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset :].strip()
    if doc.lineno == node.lineno or before.strip() or (after and not after.startswith(b"#")):
        return None
    indent = lines[node.lineno - 1][: node.col_offset]  # leading whitespace: bytes == characters
    kept = lines[node.lineno - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    out = []
    for line in kept:
        if line.startswith(indent):
            out.append(line[len(indent) :])
        elif not line.strip():
            out.append("")
        else:  # a multi-line string reaching left of the def: dedenting would change it
            return None
    return "\n".join(out).rstrip() + "\n"


def _is_trivial(stmt: ast.stmt) -> bool:
    """``pass``, ``...``, a bare ``return`` or ``raise NotImplementedError``: a stub, nothing to learn."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
        return True
    if isinstance(stmt, ast.Return):
        return stmt.value is None or (isinstance(stmt.value, ast.Constant) and stmt.value.value is None)
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _stable_unit(key: str) -> float:
    """A hash of ``key`` in [0, 1) that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _split_by_hash(docs: dict[str, _Doc], fraction: float) -> dict[str, list[_Doc]]:
    keys = sorted(docs)
    by_hash = sorted(keys, key=_stable_unit)
    held_out = {k for k in by_hash if _stable_unit(k) < fraction}
    minimum = min(_MIN_VALIDATION_DOCS, len(keys) // 2)
    if len(held_out) < minimum:  # too few by chance: take the lowest hashes, still deterministic
        held_out = set(by_hash[:minimum])
    return {
        "train": [docs[k] for k in keys if k not in held_out],
        "validation": [docs[k] for k in keys if k in held_out],
    }
