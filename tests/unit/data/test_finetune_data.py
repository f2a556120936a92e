"""Tests for prompt/response data (``data.format=prompt_response`` and the built-in ``instruct`` corpus).

The hand-built cases use a tiny byte-level BPE (300 tokens) saved once per module and passed as
``data.tokenizer``, so that a test can compute the exact token layout a block must have before it
chooses ``seq_len``; each build then takes well under a second.
"""

from __future__ import annotations

import inspect
import json
import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from distrib import data
from distrib.config import ConfigError, DataConfig, load_config
from tests.conftest import ROOT

TINY = str(ROOT / "configs/pretrain/tiny.yaml")

IGNORE = -100

#: Two examples whose prompts and responses tokenize to a few tokens each.
EXAMPLES = [
    {"prompt": "Add one to x.\n", "response": "def inc(x):\n    return x + 1\n"},
    {"prompt": "Say hello.\n", "response": "print('hello')\n"},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 300-token BPE trained on text like the examples', saved as a ``data.tokenizer`` directory."""
    texts = [f"{e['prompt']}{e['response']}" for e in EXAMPLES] * 20
    texts += data.builtin_corpus("code")["train"][:20]
    path = tmp_path_factory.mktemp("tokenizer")
    data.load_or_train_tokenizer(DataConfig(vocab_size=300), texts).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return data.load_or_train_tokenizer(DataConfig(tokenizer=str(tokenizer_dir)), [])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pair_cfg(tmp_path: Path, train: list[Path], validation: list[Path], **overrides) -> DataConfig:
    return DataConfig(**{
        "source": "files",
        "format": "prompt_response",
        "train_files": [str(p) for p in train],
        "validation_files": [str(p) for p in validation],
        "cache_dir": str(tmp_path / "cache"),
        **overrides,
    })


def layout(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """The ids and labels one example must get: prompt masked, response and eos learned."""
    prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    response = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + response, [IGNORE] * len(prompt) + response


# -- labels --------------------------------------------------------------------------------------


def test_labels_are_ignored_exactly_on_prompt_and_padding(tmp_path, tokenizer_dir, tokenizer):
    (ids1, labels1), (ids2, labels2) = (layout(tokenizer, e) for e in EXAMPLES)
    seq_len = len(ids1) + len(ids2) + 3  # both fit in one block, with three positions of padding
    train = write_jsonl(tmp_path / "train.jsonl", EXAMPLES)
    cfg = pair_cfg(tmp_path, [train], [train], seq_len=seq_len, tokenizer=str(tokenizer_dir))
    prepared = data.prepare_data(cfg, seed=0)
    assert prepared.train.column_names == ["input_ids", "labels"] and len(prepared.train) == 1
    pad = tokenizer.pad_token_id
    assert prepared.train[0]["input_ids"].tolist() == ids1 + ids2 + [pad] * 3
    assert prepared.train[0]["labels"].tolist() == labels1 + labels2 + [IGNORE] * 3
    meta = json.loads((prepared.cache_path / "meta.json").read_text())["examples"]["train"]
    targets = sum(label != IGNORE for label in labels1 + labels2)
    assert meta == dict(examples=2, truncated=0, dropped=0, tokens=seq_len - 3, targets=targets, padding=3)


def test_collate_returns_labels_for_prompt_response_blocks(tmp_path, tokenizer_dir, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", EXAMPLES * 4)
    prepared = data.prepare_data(pair_cfg(tmp_path, [train], [train], seq_len=24, tokenizer=str(tokenizer_dir)), 0)
    batch = data.collate(prepared.train, [1, 0])
    assert set(batch) == {"input_ids", "labels"}
    assert batch["labels"].dtype == batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"][0], torch.as_tensor(prepared.train[1]["labels"]).long())
    response_positions = batch["labels"] != IGNORE
    assert torch.equal(batch["labels"][response_positions], batch["input_ids"][response_positions])


def test_changing_the_prompt_changes_input_ids_but_not_which_positions_are_learned(tmp_path, tokenizer_dir, tokenizer):
    # Same token count, other tokens, so the blocks line up position for position: the first such
    # variant of the prompt (which merges the BPE learned decides the count).
    def count(prompt: str) -> int:
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    prompt = EXAMPLES[0]["prompt"]
    variant = next(v for v in ("Add one to y.\n", "Add one to q.\n", "Qdd one to x.\n", "Add ane to x.\n")
                   if count(v) == count(prompt))
    first = [{"prompt": prompt, "response": EXAMPLES[0]["response"]}]
    second = [{"prompt": variant, "response": EXAMPLES[0]["response"]}]
    lengths = [count(prompt)] * 2
    blocks = []
    for name, rows in (("first", first), ("second", second)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        cfg = pair_cfg(tmp_path, [path], [path], seq_len=24, tokenizer=str(tokenizer_dir))
        blocks.append(data.prepare_data(cfg, seed=0).train[0])
    (a, b), prompt = blocks, lengths[0]
    assert (a["input_ids"][:prompt] != b["input_ids"][:prompt]).any()
    assert (a["labels"][:prompt] == IGNORE).all() and (b["labels"][:prompt] == IGNORE).all()
    assert np.array_equal(a["labels"], b["labels"])  # the targets are the response's, whatever the prompt


def _tiny_llama(vocab_size: int, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq_len,
    )
    return LlamaForCausalLM(config).eval()


def test_causal_lm_loss_counts_response_tokens_only(tmp_path, tokenizer_dir, tokenizer):
    from distrib.train.trainer import IGNORE_INDEX, causal_lm_loss

    assert data.IGNORE_INDEX == IGNORE_INDEX
    train = write_jsonl(tmp_path / "train.jsonl", EXAMPLES * 3)
    prepared = data.prepare_data(pair_cfg(tmp_path, [train], [train], seq_len=32, tokenizer=str(tokenizer_dir)), 0)
    batch = data.collate(prepared.train, range(len(prepared.train)))
    model = _tiny_llama(len(tokenizer), 32)
    out = causal_lm_loss(model, batch)

    # By hand: the next-token loss summed over the positions whose target is a response token or eos.
    with torch.no_grad():
        per_token = F.cross_entropy(
            model(input_ids=batch["input_ids"]).logits[:, :-1].transpose(1, 2).float(),
            batch["input_ids"][:, 1:],
            reduction="none",
        )
    is_target = batch["labels"][:, 1:] != IGNORE
    assert 0 < int(is_target.sum()) < is_target.numel()
    assert out.tokens == is_target.sum()
    torch.testing.assert_close(out.total, per_token[is_target].sum())

    # Other target ids on the prompt positions (as if the prompt were learned) change the loss...
    noisy = batch["labels"].clone()
    noisy[noisy == IGNORE] = torch.randint(0, len(tokenizer), (int((noisy == IGNORE).sum()),))
    assert causal_lm_loss(model, dict(batch, labels=noisy)).total > out.total
    # ...but the pipeline never puts any there: a rebuild gives the very same labels.
    rebuilt = data.collate(data.prepare_data(pair_cfg(tmp_path, [train], [train], seq_len=32,
                                                      tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "again")),
                                             0).train, range(len(prepared.train)))
    assert torch.equal(rebuilt["labels"], batch["labels"])


def test_prompt_positions_get_no_gradient(tmp_path, tokenizer_dir, tokenizer):
    from distrib.train.trainer import causal_lm_loss

    train = write_jsonl(tmp_path / "train.jsonl", EXAMPLES * 3)
    prepared = data.prepare_data(pair_cfg(tmp_path, [train], [train], seq_len=32, tokenizer=str(tokenizer_dir)), 0)
    batch = data.collate(prepared.train, range(len(prepared.train)))
    model = _tiny_llama(len(tokenizer), 32)
    kept = {}

    def keep_logits(module, args, output):
        output.logits.retain_grad()
        kept["logits"] = output.logits

    model.register_forward_hook(keep_logits)
    causal_lm_loss(model, batch).total.backward()
    grad = kept["logits"].grad[:, :-1].abs().sum(-1)  # position t predicts token t + 1
    predicts_target = batch["labels"][:, 1:] != IGNORE
    assert (grad[~predicts_target] == 0).all()  # prompt and padding targets: no gradient at all
    assert (grad[predicts_target] > 0).all()


# -- packing -------------------------------------------------------------------------------------


def test_pack_examples_keeps_examples_whole_and_truncates_or_drops_long_ones():
    tokenized = Dataset.from_dict({
        "input_ids": [[1, 2, 3, 9], [4, 5, 9], [6, 6, 6, 6, 6, 7, 9], [8, 9], [1, 1, 1, 1, 1, 1, 1, 2]],
        "prompt_len": [2, 1, 3, 1, 7],
    })
    blocks, stats = data.packing._pack_examples(tokenized, pad_id=0, seq_len=6)
    assert blocks["input_ids"] == [[1, 2, 3, 9, 0, 0], [4, 5, 9, 0, 0, 0], [6, 6, 6, 6, 6, 7], [8, 9, 0, 0, 0, 0]]
    assert blocks["labels"] == [
        [IGNORE, IGNORE, 3, 9, IGNORE, IGNORE],
        [IGNORE, 5, 9, IGNORE, IGNORE, IGNORE],
        [IGNORE, IGNORE, IGNORE, 6, 6, 7],  # truncated: the response is cut short, no eos
        [IGNORE, 9, IGNORE, IGNORE, IGNORE, IGNORE],  # the last block is kept, padded
    ]  # the fifth example's prompt alone fills a block: nothing to learn, dropped
    assert stats == dict(examples=5, truncated=1, dropped=1, tokens=15, targets=8, padding=9)


def test_long_examples_are_logged_once_per_split(tmp_path, tokenizer_dir, tokenizer, caplog):
    seq_len = max(len(layout(tokenizer, e)[0]) for e in EXAMPLES)  # the short examples just fit
    long = {"prompt": "Add one to x.\n", "response": "return x + 1\n" * 20}
    train = write_jsonl(tmp_path / "train.jsonl", [long, *EXAMPLES, long, long])
    with caplog.at_level("WARNING", logger="distrib.data"):
        data.prepare_data(pair_cfg(tmp_path, [train], [train], seq_len=seq_len, tokenizer=str(tokenizer_dir)), 0)
    lines = [r.getMessage() for r in caplog.records if "longer than data.seq_len" in r.getMessage()]
    assert lines == [f"{split} split: 3 of 5 examples are longer than data.seq_len={seq_len}: 3 were truncated to it "
                     "(their response cut short), 0 dropped (the prompt alone fills a block); raise data.seq_len to "
                     "keep them whole" for split in ("train", "validation")]


def _random_examples(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 40, n)
    ids = [rng.integers(1, 500, k).tolist() for k in lengths]
    return Dataset.from_dict({"input_ids": ids, "prompt_len": [int(rng.integers(0, k)) for k in lengths]})


def test_pack_examples_is_independent_of_chunking_and_of_memory_or_file_output(tmp_path, monkeypatch):
    tokenized = _random_examples(500)
    whole, stats = data.packing._pack_examples(tokenized, pad_id=0, seq_len=48)
    monkeypatch.setattr(data.packing, "_PACK_CHUNK_TOKENS", 7 * 48)  # chunks of 7 examples, an open block carried across each
    chunked, chunked_stats = data.packing._pack_examples(tokenized, pad_id=0, seq_len=48, path=tmp_path / "blocks.arrow")
    assert stats == chunked_stats and stats["examples"] == 500 and stats["dropped"] == 0
    for column in ("input_ids", "labels"):
        assert np.array_equal(np.asarray(whole[column]), np.asarray(chunked[column]))
    # Every response is in the blocks, whole and in order.
    flat_ids, flat_labels = np.asarray(whole["input_ids"]).ravel(), np.asarray(whole["labels"]).ravel()
    expected = [t for ids, p in zip(tokenized["input_ids"], tokenized["prompt_len"]) for t in ids[p:]]
    assert flat_ids[flat_labels != IGNORE].tolist() == expected  # nothing truncated at these lengths
    assert stats["tokens"] + stats["padding"] == len(whole) * 48


def test_packing_is_deterministic_and_independent_of_num_proc(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(data.team, "_MIN_DOCS_PER_PROC", 1)  # let a small file use 2 workers
    rows = [{"prompt": f"Task {i}: " + "do it " * (i % 7), "response": f"x = {i}\n" * (1 + i % 5)} for i in range(300)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = pair_cfg(tmp_path, [train], [train], seq_len=64, tokenizer=str(tokenizer_dir))
    one = data.prepare_data(cfg.model_copy(update={"num_proc": 1, "cache_dir": str(tmp_path / "a")}), seed=0)
    two = data.prepare_data(cfg.model_copy(update={"num_proc": 2, "cache_dir": str(tmp_path / "b")}), seed=0)
    assert one.fingerprint == two.fingerprint
    for column in ("input_ids", "labels"):
        a, b = one.train[:][column], two.train[:][column]
        assert a.shape == (len(one.train), 64) and np.array_equal(a, b)
    assert len(one.train) < len(rows)  # several examples per block


def test_jsonl_json_and_parquet_with_custom_field_names_give_the_same_blocks(tmp_path, tokenizer_dir):
    rows = [{"output": e["response"], "instruction": e["prompt"], "id": i} for i, e in enumerate(EXAMPLES * 3)]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=1))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    blocks = []
    for path in (jsonl, tmp_path / "rows.json", tmp_path / "rows.parquet"):
        cfg = pair_cfg(tmp_path, [path], [path], seq_len=32, tokenizer=str(tokenizer_dir),
                       prompt_field="instruction", response_field="output", cache_dir=str(tmp_path / path.suffix))
        blocks.append(data.prepare_data(cfg, seed=0).train[:])
    for other in blocks[1:]:
        assert all(np.array_equal(blocks[0][c], other[c]) for c in ("input_ids", "labels"))
    # Swapped names swap the roles: what was learned is now the prompt.
    texts = data.load_text(pair_cfg(tmp_path, [jsonl], [jsonl], prompt_field="output", response_field="instruction"))
    assert texts["train"][0] == {"prompt": rows[0]["output"], "response": rows[0]["instruction"]}


def test_cache_key_follows_format_and_field_names(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", EXAMPLES)
    text = DataConfig(source="files", train_files=[str(path)], text_field="prompt")
    pairs = text.model_copy(update={"format": "prompt_response"})
    keys = {data.cache._cache_key(c)[0] for c in (
        text, pairs, pairs.model_copy(update={"prompt_field": "q"}), pairs.model_copy(update={"response_field": "a"}),
    )}
    assert len(keys) == 4
    # Text data ignores the pair fields, and keeps the key (and cache) it had before they existed.
    assert data.cache._cache_key(text.model_copy(update={"prompt_field": "q"}))[0] == data.cache._cache_key(text)[0]
    assert "data_format" not in data.cache._cache_key(text)[1]


# -- bad prompt/response data ----------------------------------------------------------------------


def refused(tmp_path: Path, train: Path, **overrides) -> str:
    """The one-line message ``prepare_data`` refuses ``train`` with; nothing may be written."""
    before = {str(p) for p in tmp_path.rglob("*")}
    with pytest.raises(ConfigError) as err:
        data.prepare_data(pair_cfg(tmp_path, [train], [], **overrides), seed=0)
    assert "\n" not in str(err.value)
    assert {str(p) for p in tmp_path.rglob("*")} == before and not (tmp_path / "cache").exists()
    return str(err.value)


GOOD = json.dumps(EXAMPLES[0])


@pytest.mark.parametrize(
    "line,problem",
    [
        ('{"question": "q", "response": "r"}',
         "line 3 has no 'prompt' field (data.prompt_field); its fields are ['question', 'response']; "
         "set data.prompt_field or fix the line"),
        ('{"prompt": "p"}',
         "line 3 has no 'response' field (data.response_field); its fields are ['prompt']; "
         "set data.response_field or fix the line"),
        ('{"prompt": 5, "response": "r"}',
         "line 3: 'prompt' (data.prompt_field) is a number, not a string; store the prompt as a JSON string"),
        ('{"prompt": "p", "response": ["r"]}',
         "line 3: 'response' (data.response_field) is a array, not a string; store the response as a JSON string"),
        ('{"prompt": "p", "response": null}',
         "line 3: 'response' (data.response_field) is null, not a string; store the response as a JSON string "
         "(an empty one if there is none)"),
        ('["p", "r"]',
         "line 3 is a JSON array, not an object; write one object per line with the prompt in 'prompt' "
         "(data.prompt_field) and the response in 'response' (data.response_field)"),
    ],
    ids=["no-prompt", "no-response", "number-prompt", "array-response", "null-response", "not-an-object"],
)
def test_bad_jsonl_line_names_key_file_line_and_field(tmp_path, line, problem):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    assert refused(tmp_path, bad) == f"data.train_files: '{bad}' {problem}"


def test_bad_json_array_item_names_the_item(tmp_path):
    bad = tmp_path / "pairs.json"
    bad.write_text(json.dumps([EXAMPLES[0], "just a string"]))
    assert refused(tmp_path, bad).startswith(f"data.train_files: '{bad}' array item 2 is a JSON string, not an object")


def test_custom_field_names_appear_in_the_message(tmp_path):
    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "p", "output": "r"}, {"instruction": "p"}])
    assert refused(tmp_path, bad, prompt_field="instruction", response_field="output") == (
        f"data.train_files: '{bad}' line 2 has no 'output' field (data.response_field); its fields are "
        "['instruction']; set data.response_field or fix the line"
    )


def test_text_file_is_refused_for_prompt_response_data(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("Some text.\n")
    assert refused(tmp_path, bad) == (
        f"data.train_files: '{bad}' is plain text, which has no prompt and response (data.format=prompt_response); "
        "give .jsonl/.json/.csv/.parquet rows with the prompt in 'prompt' (data.prompt_field) and the response in "
        "'response' (data.response_field)"
    )


def test_parquet_without_the_response_column_or_with_nulls(tmp_path):
    bad = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "answer": ["r"]}), bad)
    assert refused(tmp_path, bad) == (
        f"data.train_files: '{bad}' has no column 'response' (data.response_field); its columns are "
        "['prompt', 'answer']; set data.response_field"
    )
    pq.write_table(pa.table({"prompt": ["p", "q"], "response": ["r", None]}), bad)
    assert refused(tmp_path, bad) == (
        f"data.train_files: '{bad}' column 'response' (data.response_field) is null in 1 rows; "
        "store every response as a string (an empty one if there is none)"
    )
    # Without footer statistics the nulls are found after loading, naming the row.
    pq.write_table(pa.table({"prompt": ["p", "q", "s"], "response": ["r", None, None]}), bad, write_statistics=False)
    assert refused(tmp_path, bad) == (
        f"data.response_field='response' is null in 2 rows of '{bad}' (the first is row 2); "
        "store every response as a string (an empty one if there is none)"
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.format=prompt_response"],
         "data.format=prompt_response needs prompt/response rows, but the built-in corpus data.name='code' is plain "
         "text; use data.name=instruct or data.format=text"),
        (["data.source=files", "data.train_files=[a.jsonl]", "data.format=prompt_response", "data.prompt_field=text",
          "data.response_field=text"],
         "data.prompt_field and data.response_field are both 'text'; name two different fields"),
        (["data.name=nope"],
         "data.name='nope' is not a built-in corpus; use data.name=code, data.name=prose or data.name=instruct"),
    ],
    ids=["pairs-from-code", "one-field-for-both", "unknown-builtin"],
)
def test_config_refuses_what_cannot_be_prompt_response_data(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value) == message


def test_config_accepts_the_instruct_corpus_and_pair_fields():
    cfg = load_config(TINY, ["data.name=instruct"]).data
    assert (cfg.source, cfg.name, cfg.format) == ("builtin", "instruct", "text")  # instruct is pairs regardless
    cfg = load_config(TINY, ["data.source=files", "data.train_files=[a.jsonl]", "data.format=prompt_response",
                             "data.prompt_field=instruction", "data.response_field=output"]).data
    assert (cfg.format, cfg.prompt_field, cfg.response_field) == ("prompt_response", "instruction", "output")


# -- the built-in instruct corpus ------------------------------------------------------------------


@pytest.fixture(scope="module")
def instruct() -> dict[str, list[dict]]:
    return data.builtin_corpus("instruct")


def test_builtin_instruct_corpus_is_deterministic_with_train_and_validation(instruct):
    assert data.builtin_corpus("instruct") == instruct
    assert len(instruct["train"]) > 1000 and len(instruct["validation"]) >= 4
    train = {(e["prompt"], e["response"]) for e in instruct["train"]}
    assert not train & {(e["prompt"], e["response"]) for e in instruct["validation"]}


def test_builtin_instruct_prompts_hold_docstrings_and_responses_the_code(instruct):
    examples = instruct["train"] + instruct["validation"]
    assert all(e["prompt"].startswith("Write a Python ") for e in examples)
    assert all(e["response"].startswith(("def ", "async def ")) for e in examples)
    assert all(len(e["prompt"]) + len(e["response"]) <= data.builtin._INSTRUCT_MAX_CHARS for e in examples)
    for e in examples[::50]:
        compile(e["response"], "<response>", "exec")  # dedented, docstring cut out cleanly: valid Python
    quote = [e for e in examples if e["prompt"].startswith("Write a Python function `quote(s)` (module `shlex`)")]
    assert len(quote) == 1
    assert inspect.getdoc(shlex.quote) in quote[0]["prompt"]
    assert quote[0]["response"].startswith("def quote(s):\n") and inspect.getdoc(shlex.quote) not in quote[0]["response"]


def test_builtin_instruct_is_prompt_response_data(tmp_path):
    cfg = DataConfig(source="builtin", name="instruct", max_documents=100, vocab_size=300, seq_len=128,
                     cache_dir=str(tmp_path))
    assert cfg.format == "text"  # the default; instruct is prompt/response whatever it says
    prepared = data.prepare_data(cfg, seed=0)
    for split in (prepared.train, prepared.validation):
        labels = split[:]["labels"]
        assert (labels == IGNORE).any() and (labels != IGNORE).any()
    block = prepared.train[0]
    learned = prepared.tokenizer.decode(block["input_ids"][block["labels"] != IGNORE])
    assert "def " in learned and "Write a Python" not in learned
