"""`distrib eval` on a model pretrained with the shipped tiny config: finite scores, eval.json equal to
lm-eval's own output, and the next-line task beaten by the trained model but not by a random one."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

NEXTLINE = "distrib_code_nextline"
CHANCE = 0.25
METRICS = ("acc", "acc_norm", "acc_mutual_info")


@pytest.fixture(scope="session")
def trained(tiny_pretrained):
    """configs/pretrain/tiny.yaml as shipped (200 steps on the code corpus, 2 processes): the session's one."""
    return tiny_pretrained


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="session")
def random_model(tmp_path_factory, trained):
    """A randomly initialised model of the trained one's shape, with its tokenizer (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("random") / "hf"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trained / "hf")).save_pretrained(out)
    AutoTokenizer.from_pretrained(trained / "hf").save_pretrained(out)
    return out


def distrib_eval(cache: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "distrib", "eval", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env={**os.environ, "DISTRIB_CACHE": str(cache), "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def p_above_chance(successes: int, n: int, p: float = CHANCE) -> float:
    """One-sided exact binomial test: P(X >= successes) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(successes, n + 1))


def chance_test(results: dict, n: int) -> dict[str, tuple[float, float]]:
    """metric -> (accuracy, one-sided p-value against 25%) on the next-line task."""
    out = {}
    for metric in METRICS:
        acc = results[NEXTLINE][f"{metric},none"]
        out[metric] = (acc, p_above_chance(round(acc * n), n))
    return out


def test_all_shipped_tasks_give_finite_scores(trained, eval_cache):
    proc = distrib_eval(eval_cache, str(trained), "--limit", "5")  # the run directory: its hf/ is evaluated
    record = json.loads((trained / "eval.json").read_text())
    assert record["model"] == str(trained / "hf")
    assert set(record["results"]) == {"distrib_code_ppl", "distrib_prose_ppl", NEXTLINE, "distrib_instruct_response"}
    values = [v for r in record["results"].values() for k, v in r.items() if isinstance(v, float) and "stderr" not in k]
    assert len(values) == 11 and all(math.isfinite(v) for v in values), record["results"]
    assert "distrib_code_ppl" in proc.stdout and "word_perplexity" in proc.stdout  # the table


def test_trained_beats_chance_random_does_not(trained, random_model, eval_cache, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from distrib.commands.evaluate import evaluate_model
    from distrib.commands.eval_tasks import task_dir

    hf = trained / "hf"
    distrib_eval(eval_cache, str(hf), "--tasks", NEXTLINE)
    record = json.loads((hf / "eval.json").read_text())
    n = record["n-samples"][NEXTLINE]["effective"]
    assert n >= 200

    # eval.json holds exactly what lm-eval's own simple_evaluate returns for the same call
    own = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf), "tokenizer": str(hf), "dtype": "float32"}, tasks=[NEXTLINE],
        task_manager=TaskManager(include_path=str(task_dir(eval_cache)), include_defaults=False),
        batch_size=16, device="cpu", log_samples=False,
    )
    assert record["results"] == json.loads(json.dumps(own["results"], default=str))

    trained_test = chance_test(record["results"], n)
    random_record = evaluate_model(random_model, [NEXTLINE], cache_root=eval_cache)
    random_test = chance_test(random_record["results"], random_record["n-samples"][NEXTLINE]["effective"])
    with capsys.disabled():
        print(f"\nnext-line items: {n}; trained: {trained_test}; random: {random_test}")
    assert any(p < 0.01 for _, p in trained_test.values()), trained_test
    assert trained_test["acc_mutual_info"][1] < 0.01, trained_test
    assert all(p >= 0.01 for _, p in random_test.values()), random_test


def test_adapter_is_evaluated_on_its_base(trained, eval_cache, tmp_path):
    """An adapter directory scores as the same adapter merged into its base (so the adapter is applied)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distrib.commands.evaluate import evaluate_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(trained / "hf", dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")  # base_model_name_or_path: the trained hf/
    lora.merge_and_unload().save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(trained / "hf").save_pretrained(tmp_path / "merged")

    tasks = [NEXTLINE, "distrib_instruct_response"]
    adapter = evaluate_model(tmp_path / "adapter", tasks, limit=20, cache_root=eval_cache)
    merged = evaluate_model(tmp_path / "merged", tasks, limit=20, write=False, cache_root=eval_cache)
    plain = evaluate_model(trained / "hf", tasks, limit=20, write=False, cache_root=eval_cache)["results"]
    assert adapter["peft"] == str(tmp_path / "adapter") and adapter["model"] == str(trained / "hf")
    assert (tmp_path / "adapter" / "eval.json").is_file()
    bpb = "bits_per_byte,none"
    got, want = adapter["results"]["distrib_instruct_response"][bpb], merged["results"]["distrib_instruct_response"][bpb]
    assert got == pytest.approx(want, rel=1e-4)
    assert got != pytest.approx(plain["distrib_instruct_response"][bpb], rel=1e-3)
