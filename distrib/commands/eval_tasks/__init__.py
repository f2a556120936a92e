"""Offline lm-eval tasks built from the standard library: the held-out side of the built-in corpora.

Four tasks, each an lm-eval YAML shipped beside this module over a local jsonl file:

* ``distrib_code_ppl`` and ``distrib_prose_ppl``: word and byte perplexity (``loglikelihood_rolling``)
  on the validation split of the built-in ``code`` and ``prose`` corpora, whole documents;
* ``distrib_code_nextline``: multiple choice, the start of a function from the ``code`` validation
  files and four candidate next lines (its own and those of three other held-out functions);
* ``distrib_instruct_response``: the validation pairs of the built-in ``instruct`` fine-tuning data,
  scored on the response's first lines given the prompt (bits and perplexity per byte).

Everything comes from :func:`distrib.data.builtin_corpus` with its default split, so no task ever
holds a document the same-domain training stage trains on. (The ``instruct`` split is by function,
the ``code`` split by file: a held-out instruct function's source can sit in a file the code corpus
trains on. Its figures measure fine-tuning generalisation, not text unseen in pretraining.)

:func:`task_dir` generates the data deterministically on first use into
``<cache>/eval-tasks/<hash>/`` (``<cache>`` is ``$DISTRIB_CACHE`` or ``~/.cache/distrib``, as for the
training data), with the YAMLs' ``@DATA_DIR@`` filled in; the hash covers this Python's version and
the task sources, so a changed library or task makes a new directory. Pass that directory to
``lm_eval.tasks.TaskManager(include_path=...)``.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from filelock import FileLock

from distrib.data import builtin_corpus

#: The shipped task names; ``distrib`` (an lm-eval tag) runs them all.
TASKS = ("distrib_code_ppl", "distrib_prose_ppl", "distrib_code_nextline", "distrib_instruct_response")
TAG = "distrib"

_HERE = Path(__file__).resolve().parent
_PLACEHOLDER = "@DATA_DIR@"

#: Next-line items per function at most, at distinct lines within its first ``_CUT_WINDOW`` lines.
_CUTS_PER_FUNCTION = 3
_CUT_WINDOW = 15
_CHOICES = 4

#: A response is scored on its first lines up to this many characters (at least its first line, cut
#: there if longer). lm-eval refuses a continuation longer than the model's context, and small models
#: have short ones (the tiny config's is 128 tokens); 200 characters of code are about 60 tokens of a
#: 4,096-token byte-level BPE.
_RESPONSE_CHARS = 200


def task_dir(cache_root: str | Path | None = None) -> Path:
    """The directory of the shipped task YAMLs and their data, generated on first use.

    Built into a temporary directory and renamed into place under a file lock, so concurrent
    callers never see half a directory and only one of them builds.
    """
    root = Path(cache_root or os.environ.get("DISTRIB_CACHE") or "~/.cache/distrib").expanduser() / "eval-tasks"
    final = root / _key()
    if (final / "done").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "done").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _build(tmp, final)
            if final.exists():  # a crashed build left it without "done"
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _key() -> str:
    """What the generated files depend on: the Python (its library), this package's sources and the corpus builder's."""
    h = hashlib.sha256()
    h.update(f"{sys.version}\n{sysconfig.get_paths()['stdlib']}\n".encode())
    for path in sorted([*_HERE.glob("*.yaml"), *_HERE.glob("*.py"), Path(inspect.getsourcefile(builtin_corpus))]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _build(tmp: Path, final: Path) -> None:
    code = builtin_corpus("code")["validation"]
    rows = {
        "code_ppl": [{"text": t} for t in code],
        "prose_ppl": [{"text": t} for t in builtin_corpus("prose")["validation"]],
        "code_nextline": nextline_items(code),
        "instruct_response": [
            {"prompt": ex["prompt"], "response": _head(ex["response"])} for ex in builtin_corpus("instruct")["validation"]
        ],
    }
    for name, items in rows.items():
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
    data_dir = json.dumps(str(final))[1:-1]  # the YAMLs quote it: escape as in a JSON string
    for template in _HERE.glob("*.yaml"):
        (tmp / template.name).write_text(template.read_text().replace(_PLACEHOLDER, data_dir))
    shutil.copy(_HERE / "metrics.py", tmp / "metrics.py")
    (tmp / "done").write_text(json.dumps({name: len(items) for name, items in rows.items()}) + "\n")


def _head(response: str) -> str:
    """The response's first lines, up to ``_RESPONSE_CHARS`` characters (see there)."""
    lines = response.split("\n")
    out = lines[0][:_RESPONSE_CHARS]
    for line in lines[1:]:
        if len(out) + 1 + len(line) > _RESPONSE_CHARS:
            break
        out += "\n" + line
    return out


def nextline_items(sources: list[str]) -> list[dict]:
    """Multiple-choice items ``{"context", "choices", "label"}`` from the functions of ``sources``.

    Every function (methods and nested ones too, decorators left out) is dedented so its ``def``
    starts at column 0. At up to ``_CUTS_PER_FUNCTION`` of its non-blank lines among the first
    ``_CUT_WINDOW`` (chosen by a seeded draw), the lines before are the context and that line,
    as written (its indentation kept), is the answer. The three wrong choices are answers of items
    of other functions, so right and wrong choices come from one distribution: a model that ignores
    the context (or a random one) is at chance, 25%, whatever it thinks of line lengths. Items are
    deterministic: every draw is seeded from the item's own position.
    """
    items = []  # (function key, context, answer)
    for doc_index, source in enumerate(sources):
        for node, lines in _functions(source):
            key = f"{doc_index}:{node.lineno}"
            candidates = [i for i in range(1, min(len(lines), _CUT_WINDOW)) if len(lines[i].strip()) >= 2]
            rng = random.Random(key)
            for i in sorted(rng.sample(candidates, min(_CUTS_PER_FUNCTION, len(candidates)))):
                items.append((key, "\n".join(lines[:i]) + "\n", lines[i]))
    out = []
    for n, (key, context, answer) in enumerate(items):
        rng = random.Random(f"choices:{n}")
        wrong: list[str] = []
        while len(wrong) < _CHOICES - 1:
            other_key, _, other = items[rng.randrange(len(items))]
            if other_key != key and other != answer and other not in wrong:
                wrong.append(other)
        label = rng.randrange(_CHOICES)
        choices = wrong[:label] + [answer] + wrong[label:]
        out.append({"context": context, "choices": choices, "label": label})
    return out


def _functions(source: str):
    """``(node, dedented lines from def to end)`` for each function of ``source``, in line order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.split("\n")
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                   key=lambda n: n.lineno)
    for node in nodes:
        indent = lines[node.lineno - 1][: node.col_offset]
        body = []
        for line in lines[node.lineno - 1 : node.end_lineno]:
            if line.startswith(indent):
                body.append(line[len(indent) :].rstrip())
            elif not line.strip():
                body.append("")
            else:  # a multi-line string left of the def: dedenting would change it
                break
        else:
            yield node, body
