"""The shipped lm-eval tasks: generated deterministically from the held-out side of the built-in corpora,
and loaded by lm-eval from local files with the network switched off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The shipped tasks generated once for the module: (cache root, task directory)."""
    from distrib.commands.eval_tasks import task_dir

    root = tmp_path_factory.mktemp("eval-cache")
    return root, task_dir(root)

#: Loads every shipped task through lm-eval's TaskManager in a fresh process where any socket
#: connection raises, and prints each task's document count.
_LOAD = r"""
import json, socket, sys

def no_network(*args, **kwargs):
    raise OSError("network access attempted")

socket.socket.connect = no_network
socket.create_connection = no_network

from lm_eval.tasks import TaskManager, get_task_dict
from distrib.commands.eval_tasks import TASKS, task_dir

manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
tasks = get_task_dict(list(TASKS), manager)
out = {}
for name, task in tasks.items():
    docs = list(task.test_docs())
    out[name] = {"docs": len(docs), "output_type": task.OUTPUT_TYPE, "first": docs[0]}
print(json.dumps(out))
"""


def test_shipped_tasks_load_offline(tmp_path, built):
    env = {**os.environ, "DISTRIB_CACHE": str(built[0]), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}  # no cached hub files to fall back on
    proc = subprocess.run([sys.executable, "-c", _LOAD], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {name: t["output_type"] for name, t in out.items()} == {
        "distrib_code_ppl": "loglikelihood_rolling",
        "distrib_prose_ppl": "loglikelihood_rolling",
        "distrib_code_nextline": "multiple_choice",
        "distrib_instruct_response": "loglikelihood",
    }
    assert out["distrib_code_nextline"]["docs"] >= 200  # enough items for a binomial test
    assert all(t["docs"] >= 4 for t in out.values())
    first = out["distrib_code_nextline"]["first"]
    assert len(first["choices"]) == 4 and len(set(first["choices"])) == 4 and 0 <= first["label"] < 4


def test_tasks_are_the_held_out_side(built):
    from distrib.data import builtin_corpus

    d = built[1]
    rows = lambda name: [json.loads(line) for line in (d / f"{name}.jsonl").read_text().splitlines()]
    code, prose, instruct = (builtin_corpus(n) for n in ("code", "prose", "instruct"))
    assert [r["text"] for r in rows("code_ppl")] == code["validation"]
    assert [r["text"] for r in rows("prose_ppl")] == prose["validation"]
    held_out = "\n".join(code["validation"])
    for item in rows("code_nextline"):  # contexts and every choice come from held-out files (dedented)
        assert item["context"].split("\n")[0].strip() in held_out
        assert all(choice.strip() in held_out for choice in item["choices"])
    prompts = {ex["prompt"] for ex in instruct["train"]}
    assert rows("instruct_response") and all(r["prompt"] not in prompts for r in rows("instruct_response"))
    assert [r["prompt"] for r in rows("instruct_response")] == [ex["prompt"] for ex in instruct["validation"]]
    assert all(ex["response"].startswith(r["response"]) for r, ex in zip(rows("instruct_response"), instruct["validation"]))


def test_generation_is_deterministic(tmp_path, built):
    from distrib.commands.eval_tasks import task_dir

    a, b = built[1], task_dir(tmp_path)
    assert a.name == b.name
    for name in ("code_ppl", "prose_ppl", "code_nextline", "instruct_response"):
        assert (a / f"{name}.jsonl").read_bytes() == (b / f"{name}.jsonl").read_bytes()
    assert "@DATA_DIR@" not in (a / "distrib_code_nextline.yaml").read_text()
    assert str(a) in (a / "distrib_code_nextline.yaml").read_text()
