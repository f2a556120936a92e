"""Bad `distrib eval` input: one line `distrib: error: ...`, exit 2, no traceback, no eval.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One task-data cache for the module (the shipped tasks are generated once, about 5 s)."""
    return tmp_path_factory.mktemp("eval-cache")


def refused(cache: Path, *args: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "distrib", "eval", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "DISTRIB_CACHE": str(cache), **(env or {})})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distrib: error: "), proc.stderr[-3000:]
    return last.removeprefix("distrib: error: ")


def fake_model(path: Path) -> Path:
    """A directory that looks like a Hugging Face model; the refusals come before anything loads it."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def test_directory_that_is_not_a_model(tmp_path, cache):
    (tmp_path / "notes.txt").write_text("not a model")
    msg = refused(cache, str(tmp_path))
    assert msg.startswith(f"'{tmp_path}' is not a model: it has no config.json")
    assert "pass a run's hf/ directory, its run directory or its adapter/" in msg
    assert not (tmp_path / "eval.json").exists()


def test_path_that_does_not_exist(tmp_path, cache):
    assert refused(cache, str(tmp_path / "nope")).startswith(f"'{tmp_path / 'nope'}' is not a directory")


def test_unknown_task_lists_the_shipped_ones(tmp_path, cache):
    model = fake_model(tmp_path / "hf")
    msg = refused(cache, str(model), "--tasks", "distrib_code_nextline,no_such_task")
    assert msg.startswith("unknown task 'no_such_task'; the shipped tasks are distrib_code_ppl, distrib_prose_ppl, "
                          "distrib_code_nextline, distrib_instruct_response")
    assert not (model / "eval.json").exists()


def test_adapter_without_its_base(tmp_path, cache):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    missing = tmp_path / "gone" / "hf"
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(missing)}))
    msg = refused(cache, str(adapter))
    assert msg.startswith(f"'{adapter}' is a peft adapter whose base '{missing}' (base_model_name_or_path in "
                          "adapter_config.json) is not on disk")


def test_several_ranks_refused(tmp_path, cache):
    model = fake_model(tmp_path / "hf")
    msg = refused(cache, str(model), env={"RANK": "0", "WORLD_SIZE": "2"})
    assert msg.startswith("distrib eval runs on one process, but this is one of 2 ranks started by a launcher")


def test_bad_limit(tmp_path, cache):
    model = fake_model(tmp_path / "hf")
    assert refused(cache, str(model), "--limit", "0").startswith("--limit 0 must be positive")
