"""Fine-tuning data: every source type and format, the loss mask, the held-out split, the manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from loratune.data.generate_instructions import generate
from loratune.training import DatasetSpec, prepare_dataset
from loratune.training.settings import BUILTIN_DATASETS
from loratune.training.data import (
    BUILTIN_FILES,
    IGNORE_INDEX,
    Example,
    builtin_dataset_path,
    chat_prompt,
    header_segments,
    instruction_prompt,
    read_prepared,
    resolve_template,
    split_examples,
    tokenize_examples,
)
from tiny_models import build_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def prepare(tmp_path: Path, source: Path | str, **options) -> tuple[dict, list[Example], list[Example]]:
    manifest = prepare_dataset(DatasetSpec(path=str(source), **options), tmp_path / "prepared")
    prepared = read_prepared(tmp_path / "prepared")
    return manifest, prepared.train, prepared.eval


ALPACA = [
    {"instruction": "Reverse the word.", "input": "garden", "output": "nedrag"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
]


# ---- formats ---------------------------------------------------------------------------
def test_alpaca_jsonl_with_and_without_input(tmp_path):
    manifest, train, held_out = prepare(tmp_path, write_jsonl(tmp_path / "a.jsonl", ALPACA), eval_fraction=0.0)
    assert manifest["format"] == "alpaca"
    assert held_out == []
    assert train == [
        Example(
            "### Instruction:\nReverse the word.\n\n### Input:\ngarden\n\n### Response:\n",
            "nedrag",
            (("user", "Reverse the word.\n\ngarden"), ("assistant", "nedrag")),
        ),
        Example(
            "### Instruction:\nSay hello.\n\n### Response:\n",
            "Hello!",
            (("user", "Say hello."), ("assistant", "Hello!")),
        ),
    ]


def test_self_instruct_gives_one_example_per_instance(tmp_path):
    record = {
        "id": "seed_task_0",
        "instruction": "Add the numbers.",
        "is_classification": False,
        "instances": [{"input": "1 + 2", "output": "3"}, {"input": "2 + 2", "output": "4"}],
    }
    manifest, train, _ = prepare(tmp_path, write_jsonl(tmp_path / "s.jsonl", [record]), eval_fraction=0.0)
    assert manifest["format"] == "self_instruct"
    assert manifest["n_records"] == 1 and manifest["n_examples"] == 2
    assert [e.completion for e in train] == ["3", "4"]
    assert train[1].prompt == instruction_prompt("Add the numbers.", "2 + 2")


def test_prompt_completion_is_taken_verbatim(tmp_path):
    records = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    manifest, train, _ = prepare(tmp_path, write_jsonl(tmp_path / "p.jsonl", records), eval_fraction=0.0)
    assert manifest["format"] == "prompt_completion"
    assert train == [Example("Q: 2+2?\nA:", " 4")]


def test_plain_text_has_an_empty_prompt(tmp_path):
    source = tmp_path / "passages.txt"
    source.write_text("The first passage.\n\nThe second passage.\n")
    manifest, train, _ = prepare(tmp_path, source, eval_fraction=0.0)
    assert manifest["format"] == "text"
    assert train == [Example("", "The first passage."), Example("", "The second passage.")]


CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
}


def test_chat_gives_one_example_per_conversation(tmp_path):
    manifest, train, _ = prepare(tmp_path, write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]), eval_fraction=0.0)
    assert manifest["format"] == "chat" and manifest["template"] == "auto"
    (example,) = train
    assert example.is_conversation
    assert example.messages == tuple((m["role"], m["content"]) for m in CONVERSATION["messages"])


def test_json_csv_parquet_and_folders_read_the_same_records(tmp_path):
    expected = prepare(tmp_path / "jsonl", write_jsonl(tmp_path / "a.jsonl", ALPACA), eval_fraction=0.0)[1]
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    pd.DataFrame(ALPACA).to_csv(tmp_path / "a.csv", index=False)  # the empty input becomes an empty cell
    pd.DataFrame(ALPACA).to_parquet(tmp_path / "a.parquet")
    for name in ("a.json", "a.csv", "a.parquet"):
        assert prepare(tmp_path / name.replace(".", "_"), tmp_path / name, eval_fraction=0.0)[1] == expected
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part1.jsonl", ALPACA[:1])
    write_jsonl(folder / "part2.jsonl", ALPACA[1:])
    manifest, train, _ = prepare(tmp_path / "f", folder, eval_fraction=0.0)
    assert train == expected
    assert manifest["source_sha256"] is not None


def test_saved_datasets_folder_is_read_with_its_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA)}).save_to_disk(str(tmp_path / "saved"))
    _, train, _ = prepare(tmp_path, tmp_path / "saved", eval_fraction=0.0)
    assert [e.completion for e in train] == ["nedrag", "Hello!"]
    with pytest.raises(ValueError, match=r"^dataset\.split: .* has no split 'validation'"):
        prepare(tmp_path, tmp_path / "saved", split="validation")


def test_explicit_format_overrides_detection(tmp_path):
    # Records with both text and prompt/completion fields: auto picks prompt_completion.
    records = [{"prompt": "P", "completion": "C", "text": "T"}]
    source = write_jsonl(tmp_path / "both.jsonl", records)
    assert prepare(tmp_path / "auto", source, eval_fraction=0.0)[1] == [Example("P", "C")]
    assert prepare(tmp_path / "text", source, format="text", eval_fraction=0.0)[1] == [Example("", "T")]


def test_max_examples_keeps_the_first_in_source_order(tmp_path):
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    manifest, train, held_out = prepare(tmp_path, write_jsonl(tmp_path / "p.jsonl", records), max_examples=4)
    assert manifest["n_examples"] == 4
    assert sorted(e.prompt for e in train + held_out) == ["p0", "p1", "p2", "p3"]


# ---- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("records", "options", "message"),
    [
        (
            [{"instruction": "x", "input": "y"}],
            {"format": "alpaca"},
            r"record 1: missing field 'output' \(format alpaca\)",
        ),
        ([{"instruction": "x", "output": ""}], {}, r"record 1: empty 'output' \(format alpaca\)"),
        (
            [{"question": "x", "answer": "y"}],
            {},
            r"^dataset\.format: cannot tell the format .* \['answer', 'question'\]",
        ),
        ([{"messages": [{"role": "user", "content": "hi"}]}], {}, r"no non-empty assistant message"),
        ([{"messages": [{"role": "robot", "content": "hi"}]}], {}, r"message 1: role must be one of"),
        ([{"instruction": "x", "instances": []}], {}, r"'instances' must be a non-empty list"),
        ([{"prompt": "a", "completion": ["b"]}], {}, r"'completion' must be non-empty text"),
    ],
)
def test_bad_records_name_the_file_record_and_field(tmp_path, records, options, message):
    source = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match=message) as error:
        prepare(tmp_path, source, **options)
    assert "\n" not in str(error.value)
    if not message.startswith("^"):
        assert str(error.value).startswith(f"dataset.path: {source}")


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^dataset\.path: no such file or directory: .*missing\.jsonl$"):
        prepare(tmp_path, tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"^dataset\.path: .*empty\.jsonl holds no records$"):
        prepare(tmp_path, tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"^dataset\.path: .*broken\.jsonl line 2: not valid JSON"):
        prepare(tmp_path, tmp_path / "broken.jsonl")
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"^dataset\.path: .*data\.xml: unsupported file type"):
        prepare(tmp_path, tmp_path / "data.xml")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"^dataset\.path: .*nothing holds no \.jsonl"):
        prepare(tmp_path, tmp_path / "nothing")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "xml"}, r"^dataset\.format: unknown 'xml'; choose one of \['auto', "),
        ({"eval_fraction": 1.0}, r"^dataset\.eval_fraction: must lie in \[0\.0, 1\.0\)"),
        ({"max_examples": 0}, r"^dataset\.max_examples: must be >= 1"),
        ({"path": "builtin:nope"}, r"^dataset\.path: unknown 'builtin:nope'"),
        ({"path": ""}, r"^dataset\.path: expected a non-empty string"),
    ],
)
def test_dataset_spec_validation(options, message):
    with pytest.raises(ValueError, match=message):
        DatasetSpec(**options)


# ---- the held-out split ----------------------------------------------------------------
def numbered(n: int, start: int = 0) -> list[Example]:
    return [Example(f"prompt {i}", f"answer {i}") for i in range(start, start + n)]


def test_split_is_stable_under_reordering_and_additions():
    examples = numbered(400)
    train, held_out = split_examples(examples, 0.2, split_seed=0)
    assert 50 <= len(held_out) <= 110  # about 80 of 400
    assert split_examples(examples, 0.2, 0) == (train, held_out)
    reordered_train, reordered_eval = split_examples(list(reversed(examples)), 0.2, 0)
    assert set(reordered_eval) == set(held_out) and set(reordered_train) == set(train)
    grown_train, grown_eval = split_examples(examples + numbered(200, start=400), 0.2, 0)
    assert set(held_out) <= set(grown_eval) and set(train) <= set(grown_train)
    assert set(split_examples(examples, 0.2, split_seed=1)[1]) != set(held_out)


def test_split_keeps_duplicates_together_and_both_sides_non_empty():
    examples = numbered(50) * 2
    train, held_out = split_examples(examples, 0.3, 0)
    assert not set(train) & set(held_out)
    assert split_examples(numbered(3), 0.01, 0)[1]  # tiny: one example held out anyway
    assert split_examples(numbered(3), 0.99, 0)[0]
    assert split_examples(numbered(3), 0.0, 0)[1] == []


# ---- manifest and prepared files -------------------------------------------------------
def test_manifest_counts_and_hashes(tmp_path):
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)]
    source = write_jsonl(tmp_path / "p.jsonl", records)
    manifest = prepare_dataset(DatasetSpec(path=str(source), eval_fraction=0.25), tmp_path / "out")
    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest["n_train"] + manifest["n_eval"] == manifest["n_examples"] == 40
    written = (tmp_path / "out" / "train.jsonl").read_text() + "\0" + (tmp_path / "out" / "eval.jsonl").read_text()
    assert manifest["data_sha256"] == hashlib.sha256(written.encode()).hexdigest()
    again = prepare_dataset(DatasetSpec(path=str(source), eval_fraction=0.25), tmp_path / "again")
    assert again["data_sha256"] == manifest["data_sha256"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no leftover temporaries


def test_builtin_dataset_is_the_generator_output(tmp_path):
    assert set(BUILTIN_FILES) == set(BUILTIN_DATASETS)
    shipped = [json.loads(line) for line in builtin_dataset_path("builtin:instructions").read_text().splitlines()]
    assert shipped == generate()  # regenerate with: python -m loratune.data.generate_instructions
    manifest = prepare_dataset(DatasetSpec(), tmp_path)
    assert manifest["format"] == "alpaca"
    assert manifest["n_examples"] == len(shipped) == 400
    assert 20 <= manifest["n_eval"] <= 60


def test_real_self_instruct_seed_tasks(tmp_path):
    source = SHARED_DATA / "self_instruct_seed_tasks.jsonl"
    if not source.is_file():
        pytest.skip(f"real test data not found at {source} (../shared/data beside the checkout)")
    manifest = prepare_dataset(DatasetSpec(path=str(source)), tmp_path)
    n_instances = sum(len(json.loads(line)["instances"]) for line in source.read_text().splitlines())
    assert manifest["format"] == "self_instruct"
    assert manifest["n_records"] == 175 and manifest["n_examples"] == n_instances
    prepared = read_prepared(tmp_path)
    assert all(e.prompt.startswith("### Instruction:\n") and e.completion for e in prepared.train + prepared.eval)


# ---- tokenization and the loss mask ----------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_loss_mask_covers_the_completion_and_eos_only(tokenizer):
    example = Example(instruction_prompt("Reverse the word.", "garden"), "nedrag")
    (tokens,) = tokenize_examples(tokenizer, [example], max_seq_length=512)
    prompt_ids = tokenizer(example.prompt)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    assert tokens.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert tokens.input_ids[0] == tokenizer.bos_token_id
    assert tokens.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode([t for t in tokens.labels if t != IGNORE_INDEX], skip_special_tokens=True) == "nedrag"


def test_plain_text_is_learned_from_every_token_after_bos(tokenizer):
    (tokens,) = tokenize_examples(tokenizer, [Example("", "The quick brown fox.")], max_seq_length=512)
    assert tokens.labels[0] == IGNORE_INDEX and tokens.input_ids[0] == tokenizer.bos_token_id
    assert IGNORE_INDEX not in tokens.labels[1:]
    assert tokens.loss_tokens == len(tokens.input_ids) - 1


def test_truncation_cuts_the_end_and_can_leave_no_loss_tokens(tokenizer):
    example = Example(instruction_prompt("Reverse the word.", "garden"), "nedrag " * 20)
    (short,) = tokenize_examples(tokenizer, [example], max_seq_length=40)
    assert len(short.input_ids) == len(short.labels) == 40
    assert short.labels[-1] != IGNORE_INDEX
    (none_left,) = tokenize_examples(tokenizer, [example], max_seq_length=8)
    assert none_left.loss_tokens == 0


def test_collated_padding_has_no_loss_and_no_attention(tokenizer):
    from loratune.training.trainer import collate
    import torch

    examples = tokenize_examples(tokenizer, [Example("a", "b"), Example("a longer prompt here", "and answer")], 512)
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape == (2, len(examples[1].input_ids))
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, short:] == 0).all() and (batch["attention_mask"][0, :short] == 1).all()
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()


def test_fixed_headers_render_a_conversation_once_with_every_answer_learned(tokenizer, tmp_path):
    _, (example,), _ = prepare(tmp_path, write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]), eval_fraction=0.0)
    segments = header_segments(example, "alpaca")
    assert [s.learned for s in segments] == [False, True, False, True]
    assert segments[0].text == chat_prompt([("system", "Be brief."), ("user", "Hi")])
    assert segments[2].text == "\n\n### User:\nBye\n\n### Assistant:\n"
    (tokens,) = tokenize_examples(tokenizer, [example], 512, "alpaca")
    learned = [t for t in tokens.labels if t != IGNORE_INDEX]
    hello, goodbye = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("Hello.", "Goodbye."))
    assert learned == hello + [tokenizer.eos_token_id] + goodbye + [tokenizer.eos_token_id]
    # The whole conversation is one sequence: the prompt of the second answer is not encoded twice.
    assert tokenizer.decode(tokens.input_ids).count("### User:") == 2


def test_template_none_renders_instructions_without_headers(tokenizer, tmp_path):
    _, (example,), _ = prepare(tmp_path, write_jsonl(tmp_path / "a.jsonl", ALPACA[:1]), eval_fraction=0.0)
    assert [(s.text, s.learned) for s in header_segments(example, "none")] == [
        ("Reverse the word.\n\ngarden\n", False),
        ("nedrag", True),
    ]


def test_auto_without_a_chat_template_is_alpaca_and_chat_needs_one(tokenizer):
    assert resolve_template("auto", tokenizer) == "alpaca"
    with pytest.raises(ValueError, match=r"^dataset\.template: chat, but the model's tokenizer has no chat template"):
        resolve_template("chat", tokenizer)
    with pytest.raises(ValueError, match=r"^dataset\.template: unknown 'jinja'"):
        DatasetSpec(template="jinja")


# ---- the model's own chat template (the embedded SmolLM2's tokenizer) ---------------------
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from loratune.training.models import builtin_gguf_path

    path = builtin_gguf_path("builtin:smollm2-135m")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def learned_spans(tokens) -> list[list[int]]:
    """The runs of consecutive learned labels."""
    spans, current = [], []
    for label in tokens.labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def test_chat_template_loss_covers_exactly_the_assistant_tokens(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    assert tok.chat_template and resolve_template("auto", tok) == "chat"
    _, (example,), _ = prepare(tmp_path, write_jsonl(tmp_path / "a.jsonl", ALPACA[:1]), eval_fraction=0.0)
    (tokens,) = tokenize_examples(tok, [example], 512, "auto")
    messages = [{"role": "user", "content": "Reverse the word.\n\ngarden"}, {"role": "assistant", "content": "nedrag"}]
    # The sequence is the model's own rendering, as it is used after training.
    assert (
        tokens.input_ids
        == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    (span,) = learned_spans(tokens)
    assert tok.decode(span) == "nedrag<|im_end|>"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tokens.labels.index(span[0]) == len(tok(prompt, add_special_tokens=False)["input_ids"])


# The embedded SmolLM2's tokens of CONVERSATION under its chat template, and the labels: each
# answer and its <|im_end|> (2) are learned; the newline (198) after <|im_end|> and the headers are not.
CONVERSATION_IDS = [
    *[1, 9690, 198, 6077, 5453, 30, 2, 198],  # <|im_start|>system\nBe brief.<|im_end|>\n
    *[1, 4093, 198, 26843, 2, 198],  # <|im_start|>user\nHi<|im_end|>\n
    *[1, 520, 9531, 198, 19556, 30, 2, 198],  # <|im_start|>assistant\nHello.<|im_end|>\n
    *[1, 4093, 198, 3087, 85, 2, 198],  # <|im_start|>user\nBye<|im_end|>\n
    *[1, 520, 9531, 198, 14229, 25257, 30, 2, 198],  # <|im_start|>assistant\nGoodbye.<|im_end|>\n
]
CONVERSATION_LABELS = [IGNORE_INDEX] * 18 + [19556, 30, 2] + [IGNORE_INDEX] * 12 + [14229, 25257, 30, 2, IGNORE_INDEX]


def test_chat_template_multi_turn_learns_every_answer_in_one_example(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    _, (example,), _ = prepare(tmp_path, write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]), eval_fraction=0.0)
    (tokens,) = tokenize_examples(tok, [example], 512, "chat")
    assert tokens.input_ids == CONVERSATION_IDS and tokens.labels == CONVERSATION_LABELS
    assert [tok.decode(span) for span in learned_spans(tokens)] == ["Hello.<|im_end|>", "Goodbye.<|im_end|>"]
    text = tok.decode(tokens.input_ids)
    assert text == tok.apply_chat_template(list(CONVERSATION["messages"]), tokenize=False)
    assert text.count("Hi") == 1  # each prefix encoded once


def test_chat_template_mask_ignores_which_tokens_the_tokenizer_calls_special(smollm2_tokenizer, tmp_path):
    """transformers 5.17 converts SmolLM2's GGUF tokenizer with EOS = <|im_start|>, so <|im_end|> is no
    named special token there: the mask is the same, because it comes from the rendered text."""
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.eos_token, tok.pad_token = "<|im_start|>", None  # what 5.17's converter does
    assert 2 not in tok.all_special_ids
    _, (example,), _ = prepare(tmp_path, write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]), eval_fraction=0.0)
    (tokens,) = tokenize_examples(tok, [example], 512, "chat")
    assert tokens.input_ids == CONVERSATION_IDS and tokens.labels == CONVERSATION_LABELS


def test_chat_template_errors_name_the_setting(smollm2_tokenizer):
    opening = Example("", "", (("assistant", "Hello."), ("user", "Hi"), ("assistant", "Bye.")))
    with pytest.raises(ValueError, match=r"^dataset\.template: example 2 opens with an assistant message"):
        tokenize_examples(smollm2_tokenizer, [Example("Q:", " A"), opening], 512, "chat")
    import copy

    # A template that renders earlier turns differently once a later one follows (numbered turns
    # counted from the end) has no turn-by-turn spans.
    backwards = copy.deepcopy(smollm2_tokenizer)
    backwards.chat_template = (
        "{% for m in messages %}{{ (messages|length - loop.index)|string + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>' }}{% endif %}"
    )
    conversation = Example("", "", (("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Bye.")))
    with pytest.raises(ValueError, match=r"^dataset\.template: the model's chat template does not render example 1"):
        tokenize_examples(backwards, [conversation], 512, "chat")


def _masks_of_this_transformers() -> dict:
    """The chat and alpaca masks of a conversation and an instruction with the GGUF file's tokenizer
    as this transformers version loads it (raw) and as loratune converts it (load_gguf_tokenizer)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from loratune.training.models import builtin_gguf_path, load_gguf_tokenizer

    path = builtin_gguf_path("builtin:smollm2-135m")
    raw = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    converted = load_gguf_tokenizer(path, AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))
    conversation = Example("", "", tuple((m["role"], m["content"]) for m in CONVERSATION["messages"]))
    instruction = Example(
        instruction_prompt("Reverse the word.", "garden"),
        "nedrag",
        (("user", "Reverse the word.\n\ngarden"), ("assistant", "nedrag")),
    )

    def masks(tokenizer, template):
        return [
            [t.input_ids, t.labels] for t in tokenize_examples(tokenizer, [conversation, instruction], 512, template)
        ]

    return {
        "version": transformers.__version__,
        "raw_chat": masks(raw, "chat"),
        "converted_chat": masks(converted, "chat"),
        "converted_alpaca": masks(converted, "alpaca"),
        "converted_eos": converted.eos_token,
    }


OTHER_TRANSFORMERS = os.environ.get("LORATUNE_OTHER_TRANSFORMERS")


@pytest.mark.skipif(
    not OTHER_TRANSFORMERS,
    reason="LORATUNE_OTHER_TRANSFORMERS names no pip --target folder with another transformers version",
)
def test_chat_template_mask_is_the_same_under_another_transformers_version(smollm2_tokenizer):
    """The H200 image's transformers 5.17 counted one more answer token per example than 5.24 did
    (the newline after <|im_end|>). Run with, e.g.,
    ``pip install --no-deps --target /tmp/tf517 transformers==5.17.* 'huggingface_hub<2' httpx``
    and ``LORATUNE_OTHER_TRANSFORMERS=/tmp/tf517``."""
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([OTHER_TRANSFORMERS, str(tests.parent), str(tests)])}
    probe = "import json, test_data; print(json.dumps(test_data._masks_of_this_transformers()))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    other, here = json.loads(done.stdout.strip().splitlines()[-1]), _masks_of_this_transformers()
    assert other["version"] != here["version"]
    assert other["raw_chat"] == here["raw_chat"] == here["converted_chat"]
    assert other["raw_chat"][0] == [CONVERSATION_IDS, CONVERSATION_LABELS]
    assert other["converted_alpaca"] == here["converted_alpaca"]
    assert other["converted_eos"] == here["converted_eos"] == "<|im_end|>"


def test_generation_tags_give_the_same_mask_as_turn_by_turn_rendering(smollm2_tokenizer, tmp_path):
    """A template that marks the assistant's text with {% generation %} gets the same spans."""
    import copy

    tagged = copy.deepcopy(smollm2_tokenizer)
    tagged.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    _, (example,), _ = prepare(tmp_path, write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]), eval_fraction=0.0)
    (tokens,) = tokenize_examples(tagged, [example], 512, "chat")
    assert [tagged.decode(span) for span in learned_spans(tokens)] == ["Hello.<|im_end|>", "Goodbye.<|im_end|>"]


def test_alpaca_template_keeps_the_2024_tokens_with_a_chat_model(smollm2_tokenizer):
    tok = smollm2_tokenizer
    example = Example(
        instruction_prompt("Reverse the word.", "garden"),
        "nedrag",
        (("user", "Reverse the word.\n\ngarden"), ("assistant", "nedrag")),
    )
    (tokens,) = tokenize_examples(tok, [example], 512, "alpaca")
    prompt_ids = tok(example.prompt)["input_ids"]
    answer = tok("nedrag", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tokens.input_ids == prompt_ids + answer
    assert tokens.labels == [IGNORE_INDEX] * len(prompt_ids) + answer


def test_raw_prompt_completion_is_never_templated(smollm2_tokenizer):
    tok = smollm2_tokenizer
    (templated,) = tokenize_examples(tok, [Example("Q: 2+2?\nA:", " 4")], 512, "chat")
    (plain,) = tokenize_examples(tok, [Example("Q: 2+2?\nA:", " 4")], 512, "alpaca")
    assert templated == plain and "<|im_start|>" not in tok.decode(templated.input_ids)


def test_chat_templated_examples_pack_for_the_fused_path(smollm2_tokenizer, tmp_path):
    import torch

    from loratune.training.fused import pack

    tok = smollm2_tokenizer
    source = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION])
    _, (conversation,), _ = prepare(tmp_path / "c", source, eval_fraction=0.0)
    _, instructions, _ = prepare(tmp_path / "a", write_jsonl(tmp_path / "a.jsonl", ALPACA), eval_fraction=0.0)
    tokenized = tokenize_examples(tok, [conversation, *instructions], 512, "auto")
    batch = pack(tokenized, torch.device("cpu"))
    learned = batch.targets[batch.targets != IGNORE_INDEX].tolist()
    # Position t predicts token t+1 of its own example: every learned token, each example's in turn.
    assert learned == [t for example in tokenized for t in example.labels if t != IGNORE_INDEX]
    assert tok.decode(learned) == "Hello.<|im_end|>Goodbye.<|im_end|>nedrag<|im_end|>Hello!<|im_end|>"
