"""Bad configs fail fast: exit code 2, one exact line naming the key and the fix, nothing written.

Every case runs the real CLI (``distrib pretrain``) in-process against a workspace holding a
pre-existing run directory with a file in it, the config files the cases read, and a plain file;
the whole workspace (names, kinds, sizes, bytes, mtimes of files and directories) must be the same
afterwards.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from distrib.commands.cli import main
from distrib.config import DEEPSPEED_OWNED, Config, ConfigError, ModelConfig, TrainConfig, load_config
from tests.conftest import ROOT

TINY = str(ROOT / "configs/pretrain/tiny.yaml")

#: Files written into the workspace before every case (None: a directory).
FILES = {
    "empty.yaml": "",
    "comments.yaml": "# only comments\n# train:\n#   max_steps: 5\n",
    "null.yaml": "null\n",
    "list.yaml": "- train\n- model\n",
    "syntax.yaml": "train:\n  lr: 1\n max_steps: [5\n",
    "onkey.yaml": "on: 1\n",
    "alias.yaml": "deepspeed:\n  x: &a [1, *a]\n",
    "python.yaml": "output_dir: !!python/object/apply:os.system ['touch pwned']\n",
    "latin1.yaml": b"output_dir: caf\xe9\n",
    "null-section.yaml": "train:\n  # max_steps: 5\n",
    "ds-stage.yaml": "parallel:\n  zero_stage: 1\ndeepspeed:\n  zero_optimization:\n    stage: 3\n",
    "dir.yaml": None,
    "afile": "not a directory\n",
}

# The "valid keys here" lists follow the schema, so adding a key does not rewrite every message below.
TRAIN_KEYS = ", ".join(sorted(TrainConfig.model_fields))
TOP_KEYS = ", ".join(sorted(Config.model_fields))
MODEL_KEYS = ", ".join(sorted(ModelConfig.model_fields))
PRECISION_FIX = "remove it from deepspeed and set precision=bf16, precision=fp16 or precision=fp32"


def _fix(key: str) -> str:
    return f"fix {key} in the YAML or with {key}=VALUE"


# (config, overrides, extra CLI args, the exact message; "{tmp}" stands for the workspace)
BAD = [
    # -- schema values and cross-field checks
    (TINY, ["train.foo=1"], [], f"unknown key 'train.foo'; valid keys here: {TRAIN_KEYS}"),
    (TINY, ["train.micro_batch_size=0"], [],
     f"train.micro_batch_size: Input should be greater than 0 (got 0); {_fix('train.micro_batch_size')}"),
    (TINY, ["precision=fp8"], [], f"precision: Input should be 'bf16', 'fp16' or 'fp32' (got 'fp8'); {_fix('precision')}"),
    (TINY, ["model.hidden_size=130"], [],
     "model.hidden_size=130 is not divisible by model.num_heads=4; pick a head count that divides the hidden size"),
    (TINY, ["model.num_kv_heads=3"], [],
     "model.num_heads=4 is not a multiple of model.num_kv_heads=3; grouped-query attention needs num_heads % num_kv_heads == 0"),
    (TINY, ["train.global_batch_size=36"], [],
     "train.global_batch_size=36 is not a multiple of train.micro_batch_size=8; "
     "make it micro batch x accumulation x data-parallel size"),
    (TINY, ["train.global_batch_size=40"], ["--nproc-per-node", "2"],
     "train.global_batch_size=40 is not a multiple of train.micro_batch_size x data-parallel size = 8 x 2 = 16; "
     "set train.global_batch_size to a multiple of 16"),
    (TINY, ["parallel.zero_stage=4"], [],
     f"parallel.zero_stage: Input should be 0, 1, 2 or 3 (got 4); {_fix('parallel.zero_stage')}"),
    (TINY, ["parallel.offload_params=true"], [], "parallel.offload_params needs parallel.zero_stage=3"),
    (TINY, ["data.name=nope"], [],
     "data.name='nope' is not a built-in corpus; use data.name=code, data.name=prose or data.name=instruct"),
    (TINY, ["data.source=files"], [],
     "data.source=files needs data.train_files, a list of paths or globs of data files: "
     ".txt/.jsonl/.json/.csv/.parquet (the first four also compressed as .gz/.bz2/.xz)"),
    (TINY, ["data.source=files", "data.train_files=[/no/such/file.txt]"], [],
     "data.train_files: '/no/such/file.txt' matches no file; fix the path or glob"),
    (TINY, ["data.tokenizer=/no/such/tokenizer"], [],
     "data.tokenizer='/no/such/tokenizer' is not a directory; point it at a saved tokenizer"),
    (TINY, ["model.max_position_embeddings=64"], [],
     "data.seq_len=128 exceeds model.max_position_embeddings=64; lower data.seq_len or raise the model's context"),
    (TINY, ["parallel.tp=3"], ["--nproc-per-node", "2"], "parallel.tp=3 does not divide the world size 2; use a tp that divides it"),
    (TINY, ["parallel.tp=4", "train.global_batch_size=32"], ["--nproc-per-node", "4"],
     "parallel.tp=4 does not divide model.num_kv_heads=2; tensor parallelism splits attention heads across ranks, "
     "so pick a tp that divides 2"),
    (TINY, ["parallel.tp=2", "parallel.zero_stage=3"], ["--nproc-per-node", "2"],
     "parallel.tp=2 with parallel.zero_stage=3 is not supported (its checkpoints cannot be consolidated); "
     "use parallel.zero_stage=1 or 2 with tensor parallelism, or parallel.tp=1"),
    (TINY, ["train.lr=fast"], [],
     f"train.lr: Input should be a valid number, unable to parse string as a number (got 'fast'); {_fix('train.lr')}"),
    (TINY, ["train.warmup_steps=500"], [], "train.warmup_steps=500 must be below train.max_steps=200; shorten the warmup"),
    (TINY, ["model.pretrained=/no/such/model"], [],
     "model.pretrained='/no/such/model' is not a Hugging Face model directory (no config.json); "
     "point it at a save_pretrained directory"),
    # -- numbers: booleans, fractions, non-finite and negative values
    (TINY, ["model.hidden_size=true"], [],
     "model.hidden_size=true is a boolean, not an integer; set model.hidden_size to a whole number"),
    (TINY, ["parallel.zero_stage=false"], [],
     "parallel.zero_stage=false is a boolean, not an integer; set parallel.zero_stage to a whole number"),
    (TINY, ["train.lr=true"], [], "train.lr=true is a boolean, not a number; set train.lr to a number"),
    (TINY, ["model.num_kv_heads=yes"], [],
     "model.num_kv_heads=true is a boolean, not an integer; set model.num_kv_heads to a whole number"),
    (TINY, ["train.max_steps=1.5"], [], "train.max_steps=1.5 is not a whole number; set train.max_steps to an integer"),
    (TINY, ["train.max_steps=1e-3"], [], "train.max_steps=0.001 is not a whole number; set train.max_steps to an integer"),
    (TINY, ["train.lr=.nan"], [], "train.lr=.nan is not a finite number; set train.lr to a finite number"),
    (TINY, ["train.lr=1e999"], [], "train.lr=.inf is not a finite number; set train.lr to a finite number"),
    (TINY, [f"train.lr={10**400}"], [],
     "train.lr=100000000000000000000000000000000000000000000000000000000... is too large; set train.lr to a smaller number"),
    (TINY, ["train.max_steps=-5"], [], f"train.max_steps: Input should be greater than 0 (got -5); {_fix('train.max_steps')}"),
    (TINY, ["train.warmup_steps=-1"], [],
     f"train.warmup_steps: Input should be greater than or equal to 0 (got -1); {_fix('train.warmup_steps')}"),
    (TINY, ["model.dropout=-0.1"], [],
     f"model.dropout: Input should be greater than or equal to 0 (got -0.1); {_fix('model.dropout')}"),
    (TINY, ["seed=-1"], [], f"seed: Input should be greater than or equal to 0 (got -1); {_fix('seed')}"),
    (TINY, ["data.train_files=[a.txt, 3]"], [],
     f"data.train_files.1: Input should be a valid string (got 3); {_fix('data.train_files')}"),
    # -- unknown and misspelt keys
    (TINY, ["trian.lr=1e-4"], [], f"unknown section 'trian'; did you mean 'train'? valid keys here: {TOP_KEYS}"),
    (TINY, ["train.max_step=5"], [],
     f"unknown key 'train.max_step'; did you mean 'train.max_steps'? valid keys here: {TRAIN_KEYS}"),
    (TINY, ["model.hiden_size=64"], [],
     f"unknown key 'model.hiden_size'; did you mean 'model.hidden_size'? valid keys here: {MODEL_KEYS}"),
    (TINY, ["precison=fp32"], [], f"unknown key 'precison'; did you mean 'precision'? valid keys here: {TOP_KEYS}"),
    # -- override syntax
    (TINY, ["train.lr"], [], "override 'train.lr' is not key.path=value; write e.g. train.lr=1e-4"),
    (TINY, ["=3"], [], "override '=3' is not key.path=value; write e.g. train.lr=1e-4"),
    (TINY, ["train..lr=1"], [], "override 'train..lr=1' has an empty part in the key 'train..lr'; write e.g. train.lr=1e-4"),
    (TINY, ["train.=1"], [], "override 'train.=1' has an empty part in the key 'train.'; write e.g. train.lr=1e-4"),
    (TINY, ["train.lr.x=1"], [], "override 'train.lr.x=1': train.lr is a value, not a section; set train.lr=VALUE instead"),
    (TINY, ["deepspeed.x=1", "deepspeed.x.y=2"], [],
     "override 'deepspeed.x.y=2': deepspeed.x is already set to 1, not a section; set deepspeed.x=VALUE instead"),
    (TINY, ["train=5"], [], "train is a section of keys, not 5; set keys under it (e.g. train.KEY=VALUE) or remove it"),
    (TINY, ["train.lr=[1"], [],
     "override 'train.lr=[1' has a value that is not valid YAML (expected ',' or ']', but got '<stream end>' "
     "at line 1, column 3); fix it or quote it"),
    (TINY, ["train.lr=2024-13-45"], [],
     "override 'train.lr=2024-13-45' has a value that is not valid YAML (month must be in 1..12); fix it or quote it"),
    (TINY, ["deepspeed.x={on: 1}"], [],
     "override 'deepspeed.x={on: 1}': key true under deepspeed.x is not a string (YAML read it as bool); quote it in the YAML"),
    (TINY, ["output_dir=''"], [],
     f"output_dir: String should have at least 1 character (got ''); {_fix('output_dir')}"),
    # -- config files
    ("{tmp}/missing.yaml", [], [],
     "config file '{tmp}/missing.yaml' does not exist; pass a YAML file such as configs/pretrain/tiny.yaml"),
    ("{tmp}/empty.yaml", [], [],
     "config file '{tmp}/empty.yaml' is empty (no keys, only comments or null); add keys, e.g. start from configs/pretrain/tiny.yaml"),
    ("{tmp}/comments.yaml", [], [],
     "config file '{tmp}/comments.yaml' is empty (no keys, only comments or null); add keys, e.g. start from "
     "configs/pretrain/tiny.yaml"),
    ("{tmp}/null.yaml", [], [],
     "config file '{tmp}/null.yaml' is empty (no keys, only comments or null); add keys, e.g. start from configs/pretrain/tiny.yaml"),
    ("{tmp}/dir.yaml", [], [],
     "config file '{tmp}/dir.yaml' is a directory, not a YAML file; pass a file such as configs/pretrain/tiny.yaml"),
    ("{tmp}/list.yaml", [], [],
     "config file '{tmp}/list.yaml' must hold a mapping of keys, not list; write one key: value per line, e.g. 'precision: bf16'"),
    ("{tmp}/syntax.yaml", [], [],
     "config file '{tmp}/syntax.yaml' is not valid YAML: expected <block end>, but found '<block mapping start>' "
     "at line 3, column 2; fix the syntax there"),
    ("{tmp}/onkey.yaml", [], [],
     "config file '{tmp}/onkey.yaml': key true at the top level is not a string (YAML read it as bool); quote it in the YAML"),
    ("{tmp}/alias.yaml", [], [],
     "config file '{tmp}/alias.yaml': the YAML alias at deepspeed.x.1 refers to a value that contains it; "
     "remove the recursive alias"),
    ("{tmp}/python.yaml", [], [],
     "config file '{tmp}/python.yaml' is not valid YAML: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system' at line 1, column 13; fix the syntax there"),
    ("{tmp}/latin1.yaml", [], [], "config file '{tmp}/latin1.yaml' is not UTF-8 text; save it as UTF-8 YAML"),
    ("{tmp}/null-section.yaml", [], [],
     "train is a section of keys, not null; set keys under it (e.g. train.KEY=VALUE) or remove it"),
    # -- output_dir
    (TINY, ["output_dir={tmp}/afile"], [],
     "output_dir='{tmp}/afile' is a file, not a directory; set output_dir to a new or existing run directory"),
    (TINY, ["output_dir={tmp}/afile/run"], [],
     "output_dir='{tmp}/afile/run' is inside '{tmp}/afile', which is not a directory; set output_dir to a path under a directory"),
    # -- raw DeepSpeed keys the typed config owns: every entry of DEEPSPEED_OWNED
    ("{tmp}/ds-stage.yaml", [], [],
     "deepspeed.zero_optimization.stage is set by parallel.zero_stage; remove it from deepspeed and set parallel.zero_stage=3"),
    (TINY, ["deepspeed.zero_optimization.stage=3"], [],
     "deepspeed.zero_optimization.stage is set by parallel.zero_stage; remove it from deepspeed and set parallel.zero_stage=3"),
    (TINY, ["deepspeed.zero_optimization.offload_optimizer.device=cpu"], [],
     "deepspeed.zero_optimization.offload_optimizer.device is set by parallel.offload_optimizer; "
     "remove it from deepspeed and set parallel.offload_optimizer=true or false"),
    (TINY, ["deepspeed.zero_optimization.offload_param.device=cpu"], [],
     "deepspeed.zero_optimization.offload_param.device is set by parallel.offload_params; "
     "remove it from deepspeed and set parallel.offload_params=true or false"),
    (TINY, ["deepspeed.zero_optimization.cpu_offload=true"], [],
     "deepspeed.zero_optimization.cpu_offload is set by parallel.offload_optimizer; "
     "remove it from deepspeed and set parallel.offload_optimizer=true"),
    (TINY, ["deepspeed.zero_optimization.cpu_offload_param=true"], [],
     "deepspeed.zero_optimization.cpu_offload_param is set by parallel.offload_params; "
     "remove it from deepspeed and set parallel.offload_params=true"),
    (TINY, ["deepspeed.bf16.enabled=false"], [], f"deepspeed.bf16.enabled is set by precision; {PRECISION_FIX}"),
    (TINY, ["deepspeed.bfloat16.enabled=true"], [], f"deepspeed.bfloat16.enabled is set by precision; {PRECISION_FIX}"),
    (TINY, ["deepspeed.fp16.enabled=true"], [], f"deepspeed.fp16.enabled is set by precision; {PRECISION_FIX}"),
    (TINY, ["deepspeed.torch_autocast.enabled=true"], [], f"deepspeed.torch_autocast.enabled is set by precision; {PRECISION_FIX}"),
    (TINY, ["deepspeed.amp.opt_level=O1"], [], f"deepspeed.amp is set by precision; {PRECISION_FIX}"),
    (TINY, ["deepspeed.train_batch_size=64"], [],
     "deepspeed.train_batch_size is set by train.global_batch_size; remove it from deepspeed and set train.global_batch_size=64"),
    (TINY, ["deepspeed.train_micro_batch_size_per_gpu=4"], [],
     "deepspeed.train_micro_batch_size_per_gpu is set by train.micro_batch_size; "
     "remove it from deepspeed and set train.micro_batch_size=4"),
    (TINY, ["deepspeed.gradient_accumulation_steps=2"], [],
     "deepspeed.gradient_accumulation_steps is set by train.global_batch_size; remove it from deepspeed and set "
     "train.global_batch_size = train.micro_batch_size x 2 x data-parallel size"),
    (TINY, ["deepspeed.gradient_clipping=0.5"], [],
     "deepspeed.gradient_clipping is set by train.grad_clip; remove it from deepspeed and set train.grad_clip=0.5"),
    (TINY, ["deepspeed.optimizer.type=Adam"], [],
     "deepspeed.optimizer.type is set by distrib (always AdamW); remove it from deepspeed and tune AdamW with "
     "train.lr, train.beta1, train.beta2, train.eps and train.weight_decay"),
    (TINY, ["deepspeed.optimizer.params.lr=1e-3"], [],
     "deepspeed.optimizer.params.lr is set by train.lr; remove it from deepspeed and set train.lr=0.001"),
    (TINY, ["deepspeed.optimizer.params.betas=[0.9, 0.999]"], [],
     "deepspeed.optimizer.params.betas is set by train.beta1 and train.beta2; "
     "remove it from deepspeed and set train.beta1 and train.beta2"),
    (TINY, ["deepspeed.optimizer.params.eps=1e-6"], [],
     "deepspeed.optimizer.params.eps is set by train.eps; remove it from deepspeed and set train.eps=1e-06"),
    (TINY, ["deepspeed.optimizer.params.weight_decay=0"], [],
     "deepspeed.optimizer.params.weight_decay is set by train.weight_decay; "
     "remove it from deepspeed and set train.weight_decay=0"),
    (TINY, ["deepspeed.scheduler.type=WarmupLR"], [],
     "deepspeed.scheduler is set by train.lr_decay and train.warmup_steps; "
     "remove it from deepspeed and set train.lr_decay, train.warmup_steps and train.min_lr_ratio"),
    (TINY, ["deepspeed.tensor_parallel.autotp_size=2"], [],
     "deepspeed.tensor_parallel.autotp_size is set by parallel.tp; remove it from deepspeed and set parallel.tp=2"),
    (TINY, ["deepspeed.tensor_parallel.tp.tp_size=2"], [],
     "deepspeed.tensor_parallel.tp.tp_size is set by parallel.tp; remove it from deepspeed and set parallel.tp=2"),
    (TINY, ["export.max_shard_size=5 GiB"], [],
     "export.max_shard_size='5 GiB' is not a size; write it as a number and a unit, such as 5GB, 500MB or 100KB"),
    (TINY, ["deepspeed.checkpoint.load_universal=true"], [],
     "deepspeed.checkpoint.load_universal is set by distrib itself; remove it from deepspeed (a resume at another "
     "data-parallel size converts to and loads the universal format automatically)"),
    # a value where an owned key's section should be replaces the whole generated section
    (TINY, ["deepspeed.zero_optimization=3"], [],
     "deepspeed.zero_optimization=3 replaces the section holding deepspeed.zero_optimization.stage, which is set by "
     "parallel.zero_stage; remove it from deepspeed and set parallel.zero_stage=VALUE"),
    (TINY, ["deepspeed.bf16=true"], [],
     "deepspeed.bf16=true replaces the section holding deepspeed.bf16.enabled, which is set by precision; "
     f"{PRECISION_FIX}"),
]


def _id(case) -> str:
    config, overrides, extra, _ = case
    name = Path(config).name if config != TINY else ""
    return " ".join([name, *overrides, *extra]).strip()


@pytest.fixture
def workspace(tmp_path):
    """tmp_path with a run directory that already holds a file, plus the config files of the cases."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("written before the run\n")
    for name, content in FILES.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return tmp_path


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its kind, mtime and (for files) bytes."""
    snap = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        snap[rel] = ("dir", st.st_mtime_ns) if path.is_dir() else ("file", st.st_mtime_ns, path.read_bytes())
    return snap


def test_there_are_at_least_30_bad_config_cases():
    assert len(BAD) >= 30
    assert len({_id(c) for c in BAD}) == len(BAD)


@pytest.mark.parametrize("config,overrides,extra,message", BAD, ids=[_id(c) for c in BAD])
def test_bad_config_exits_2_with_the_exact_line_and_changes_nothing(workspace, capsys, config, overrides, extra, message):
    tmp = str(workspace)
    sub = lambda s: s.replace("{tmp}", tmp)  # noqa: E731
    before = snapshot(workspace)
    code = main(["pretrain", sub(config), f"output_dir={tmp}/run", *map(sub, overrides), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"distrib: error: {sub(message)}\n"
    assert captured.out == ""
    assert snapshot(workspace) == before


def test_every_deepspeed_owned_key_has_a_bad_config_case():
    given = {o.split("=", 1)[0].removeprefix("deepspeed.") for _, overrides, _, _ in BAD for o in overrides}
    for path in DEEPSPEED_OWNED:
        assert any(g == path or g.startswith(path + ".") for g in given), path


def test_every_key_deepspeed_config_generates_is_owned_or_a_known_tuning_default():
    """The generated DeepSpeed config is the contract: each leaf comes from a typed key (and is then refused under
    deepspeed.*) or is a fixed default that users may tune. A new generated key must be put in one of the two."""
    from distrib.parallel.engine import deepspeed_config

    tuning = {
        "zero_optimization.overlap_comm", "zero_optimization.contiguous_gradients", "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold",
        "zero_optimization.stage3_gather_16bit_weights_on_model_save",
        "zero_optimization.offload_optimizer.pin_memory", "zero_optimization.offload_param.pin_memory",
        "fp16.initial_scale_power", "steps_per_print", "wall_clock_breakdown",
    }

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]

    variants = [
        [], ["parallel.zero_stage=0"], ["parallel.zero_stage=3"], ["parallel.offload_optimizer=true"],
        ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true"],
        ["precision=fp16"], ["parallel.tp=2"],
    ]
    seen = set()
    for overrides in variants:
        cfg = load_config(TINY, overrides)
        for universal in (False, True):
            seen |= set(leaves(deepspeed_config(cfg, 2, load_universal=universal)))
    owned = {leaf for leaf in seen if any(leaf == p or leaf.startswith(p + ".") for p in DEEPSPEED_OWNED)}
    assert seen - owned == tuning
    assert "tensor_parallel.autotp_size" in owned and "zero_optimization.offload_param.device" in owned


def test_deepspeed_keys_the_typed_config_does_not_own_stay_allowed():
    cfg = load_config(TINY, [
        "deepspeed.zero_optimization.reduce_bucket_size=1e6",
        "deepspeed.zero_optimization.sub_group_size=1e8",
        "deepspeed.optimizer.params.torch_adam=true",
        "deepspeed.fp16.initial_scale_power=12",
        "deepspeed.bf16.immediate_grad_update=false",
        "deepspeed.zero_optimization.offload_optimizer.pin_memory=true",
        "deepspeed.comms_logger.verbose=true",
        "deepspeed.flops_profiler={profile_step: 5}",
        "deepspeed.data_types.grad_accum_dtype=fp32",
        "deepspeed.tensor_parallel.partition_config={use_default_specs: true}",
    ])
    assert cfg.deepspeed["zero_optimization"] == {
        "reduce_bucket_size": 1e6, "sub_group_size": 1e8, "offload_optimizer": {"pin_memory": True}}
    assert cfg.deepspeed["flops_profiler"] == {"profile_step": 5}


def test_exponent_notation_is_a_number_in_overrides():
    cfg = load_config(TINY, ["train.max_steps=1e3", "train.lr=5e-5", "train.eps=1E-8", "checkpoint.every_steps=1E+2",
                             "train.warmup_steps=1.0e1"])
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    assert cfg.train.lr == 5e-5 and cfg.train.eps == 1e-8
    assert cfg.checkpoint.every_steps == 100 and cfg.train.warmup_steps == 10


def test_exponent_notation_is_a_number_in_yaml_files(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  max_steps: 1e3\n  lr: 5e-5\n  eps: 1.0e-8\n  warmup_steps: 2E+1\n")
    cfg = load_config(path)
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.eps, cfg.train.warmup_steps) == (1000, 5e-5, 1e-8, 20)


def test_whole_floats_fill_int_fields_and_ints_fill_float_fields():
    cfg = load_config(TINY, ["train.max_steps=1000.0", "train.lr=1", "parallel.zero_stage=3.0", "model.hidden_size=256"])
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.parallel.zero_stage == 3 and type(cfg.parallel.zero_stage) is int


def test_strings_that_only_look_like_exponents_stay_strings():
    cfg = load_config(TINY, ["output_dir=runs/1e3-x", "data.text_field=e5"])
    assert cfg.output_dir == "runs/1e3-x" and cfg.data.text_field == "e5"


def test_missing_config_file_names_the_path(capsys):
    assert main(["pretrain", "/no/such.yaml"]) == 2
    assert capsys.readouterr().err == (
        "distrib: error: config file '/no/such.yaml' does not exist; pass a YAML file such as configs/pretrain/tiny.yaml\n"
    )


def test_config_error_messages_are_raised_by_load_config_too(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"^config file '.*empty.yaml' is empty"):
        load_config(tmp_path / "empty.yaml")


def test_console_script_exits_2_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "distrib", "pretrain", TINY, f"output_dir={out}", "train.max_steps=-5"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "distrib: error: train.max_steps: Input should be greater than 0 (got -5); "
        "fix train.max_steps in the YAML or with train.max_steps=VALUE"
    )
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
