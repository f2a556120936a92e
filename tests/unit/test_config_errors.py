"""Bad configs fail fast: exit code 2, one line naming the key, nothing written."""

import subprocess
import sys

import pytest

from distrib.cli import main
from distrib.config import load_config
from tests.conftest import ROOT

TINY = str(ROOT / "configs/pretrain/tiny.yaml")

# (overrides, extra CLI args, a fragment the one-line message must contain)
BAD = [
    (["train.foo=1"], [], "unknown key 'train.foo'"),
    (["train.micro_batch_size=0"], [], "train.micro_batch_size"),
    (["precision=fp8"], [], "precision"),
    (["model.hidden_size=130"], [], "model.num_heads"),
    (["model.num_kv_heads=3"], [], "model.num_kv_heads"),
    (["train.global_batch_size=36"], [], "train.global_batch_size=36"),
    (["train.global_batch_size=40"], ["--nproc-per-node", "2"], "multiple of 16"),
    (["parallel.zero_stage=4"], [], "parallel.zero_stage"),
    (["parallel.offload_params=true"], [], "parallel.offload_params"),
    (["data.name=nope"], [], "data.name"),
    (["data.source=files"], [], "data.train_files"),
    (["data.source=files", "data.train_files=[/no/such/file.txt]"], [], "data.train_files"),
    (["data.tokenizer=/no/such/tokenizer"], [], "data.tokenizer"),
    (["model.max_position_embeddings=64"], [], "data.seq_len"),
    (["parallel.tp=3"], ["--nproc-per-node", "2"], "parallel.tp=3 does not divide the world size 2"),
    (["parallel.tp=4", "train.global_batch_size=32"], ["--nproc-per-node", "4"], "model.num_kv_heads=2"),
    (["parallel.tp=2", "parallel.zero_stage=3"], ["--nproc-per-node", "2"], "parallel.zero_stage=3"),
    (["train.lr=fast"], [], "train.lr"),
    (["train.lr"], [], "key.path=value"),
    (["train.warmup_steps=500"], [], "train.warmup_steps"),
    (["model.pretrained=/no/such/model"], [], "model.pretrained"),
]


@pytest.mark.parametrize("overrides,extra,fragment", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, overrides, extra, fragment):
    out = tmp_path / "run"
    code = main(["pretrain", TINY, f"output_dir={out}", *overrides, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert fragment in err
    assert not out.exists()


def test_missing_config_file_names_the_path(capsys):
    assert main(["pretrain", "/no/such.yaml"]) == 2
    assert "/no/such.yaml" in capsys.readouterr().err


def test_console_script_exits_2_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "distrib", "pretrain", TINY, f"output_dir={out}", "train.max_steps=-5"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("distrib: error: train.max_steps")
    assert not out.exists()


def test_overrides_and_options_mix_in_any_order(tmp_path):
    cfg = load_config(TINY, ["train.lr=1e-4", "model.num_layers=2"])
    assert cfg.train.lr == 1e-4 and cfg.model.num_layers == 2


def test_resume_with_changed_model_is_refused(tmp_path, capsys):
    from distrib.checkpoint import check_resumable

    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    cfg = load_config(TINY, [f"output_dir={out}"])
    (ckpt / "config.yaml").write_text(cfg.to_yaml())
    (ckpt / "trainer_state.json").write_text("{}")
    (out / "checkpoints" / "latest").write_text(ckpt.name)
    # run-control keys may change...
    assert check_resumable(load_config(TINY, [f"output_dir={out}", "train.exit_after_steps=3"])) == ckpt
    # ...the model may not
    before = sorted(p.name for p in out.rglob("*"))
    code = main(["pretrain", TINY, f"output_dir={out}", "model.num_layers=2"])
    err = capsys.readouterr().err
    assert code == 2 and "model.num_layers (4 -> 2)" in err
    assert sorted(p.name for p in out.rglob("*")) == before
