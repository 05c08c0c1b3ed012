"""Fine-tuning data: read a source, normalize it to prompt/completion examples, hold out a split
by content hash, and tokenize with a loss mask.

Every format becomes the same record, ``{"prompt", "completion"}``: the loss covers the
completion (and the end-of-sequence token after it) only. Plain text has an empty prompt, so its
loss covers every token. Prompts are rendered here, with a fixed model-independent template, so
the prepared data (and its sha256) does not depend on which model a study tunes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from loratune import ledger
from loratune.training.settings import DATASET_FORMATS, DatasetSpec

IGNORE_INDEX = -100  # label of a token without loss (prompt, padding): torch's cross_entropy default
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
BUILTIN_FILES = {"builtin:instructions": "instructions.jsonl"}
# Marker files of a folder written by datasets' save_to_disk (a Dataset or a DatasetDict).
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_CHAT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


@dataclass(frozen=True)
class Example:
    """One training example: the model reads ``prompt`` and learns to write ``completion``."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class RecordBatch:
    """The raw records of one source file (or hub split); ``origin`` names it in errors."""

    origin: str
    records: list[dict[str, Any]]


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    eval: list[Example]
    manifest: dict[str, Any]


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


# ---- prompt templates ------------------------------------------------------------------
def instruction_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca-style prompt of an instruction with an optional input."""
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def chat_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """The conversation so far, followed by the header the assistant's answer goes under."""
    history = "".join(f"{_CHAT_HEADERS[role]}{content}\n\n" for role, content in turns)
    return history + _CHAT_HEADERS["assistant"]


# ---- reading sources -------------------------------------------------------------------
def builtin_dataset_path(name: str) -> Path:
    """The file of a dataset shipped inside the loratune package."""
    return Path(__file__).resolve().parents[1] / "data" / BUILTIN_FILES[name]


def looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.lower().endswith(DATA_SUFFIXES)


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as bad:
                raise ValueError(f"dataset.path: {path} line {number}: not valid JSON ({bad.msg})") from None
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as bad:
        raise ValueError(f"dataset.path: {path} line {bad.lineno}: not valid JSON ({bad.msg})") from None
    if not isinstance(content, list):
        raise ValueError(f"dataset.path: {path}: expected a JSON list of records, got a {type(content).__name__}")
    return content


def _read_csv(path: Path) -> list[dict]:
    import pandas as pd

    # Every cell as text, and an empty cell as "" rather than NaN (an empty 'input' is common).
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    # to_pylist keeps nested columns (instances, messages) as plain lists and dicts.
    return pq.read_table(path).to_pylist()


def _read_text_lines(path: Path) -> list[dict]:
    return [{"text": line.rstrip("\n")} for line in path.open(encoding="utf-8") if line.strip()]


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_text_lines,
}


def _read_file(path: Path) -> RecordBatch:
    try:
        records = _READERS[path.suffix.lower()](path)
    except UnicodeDecodeError as bad:
        raise ValueError(f"dataset.path: {path}: not UTF-8 text (byte {bad.start}); save it as UTF-8") from None
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"dataset.path: {path} record {index}: expected an object, got {type(record).__name__}")
    return RecordBatch(str(path), records)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_tree(folder: Path) -> str:
    # Names and contents of every file, in a fixed order: a renamed or edited file changes it.
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def folder_holds_data(folder: Path) -> bool:
    """Whether a folder is a saved dataset or holds a data file (checked before any job)."""
    if any((folder / marker).exists() for marker in _SAVED_DATASET_MARKERS):
        return True
    return any(p.is_file() and p.suffix.lower() in DATA_SUFFIXES for p in folder.iterdir())


def _read_folder(folder: Path, split: str) -> list[RecordBatch]:
    if any((folder / marker).exists() for marker in _SAVED_DATASET_MARKERS):
        import datasets

        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"dataset.split: {folder} has no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[split]
        return [RecordBatch(f"{folder} ({split})", loaded.to_list())]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise ValueError(f"dataset.path: {folder} holds no {'/'.join(DATA_SUFFIXES)} file")
    return [_read_file(path) for path in files]


def _read_hub(name: str, split: str) -> list[RecordBatch]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types; the user needs the name and the reason
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"dataset.path: {name!r} is no local file and could not be loaded from the hub "
            f"({type(error).__name__}: {first_line})"
        ) from None
    return [RecordBatch(f"{name} ({split})", loaded.to_list())]


def read_source(spec: DatasetSpec) -> tuple[list[RecordBatch], str, str | None]:
    """The records of ``spec.path``, where they came from, and the sha256 of the source (None for the hub)."""
    if spec.path in BUILTIN_FILES:
        path = builtin_dataset_path(spec.path)
    else:
        path = Path(spec.path).expanduser()
        if not path.exists():
            if looks_like_local_path(spec.path):
                raise FileNotFoundError(f"dataset.path: no such file or directory: {spec.path}")
            return _read_hub(spec.path, spec.split), spec.path, None
    if path.is_dir():
        return _read_folder(path, spec.split), str(path), _sha256_tree(path)
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise ValueError(f"dataset.path: {path}: unsupported file type; expected one of {list(DATA_SUFFIXES)}")
    return [_read_file(path)], str(path), sha256_file(path)


# ---- normalizing records ---------------------------------------------------------------
def detect_format(record: dict, origin: str) -> str:
    """The format of a record, from its fields."""
    if "messages" in record:
        return "chat"
    if "instruction" in record and "instances" in record:
        return "self_instruct"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    choices = [f for f in DATASET_FORMATS if f != "auto"]
    raise ValueError(
        f"dataset.format: cannot tell the format of {origin} from its fields {sorted(record)}; "
        f"set dataset.format to one of {choices}"
    )


def _text(record: dict, key: str, where: str, fmt: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"dataset.path: {where}: missing field {key!r} (format {fmt})")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"dataset.path: {where}: field {key!r} must be text, got {type(value).__name__}")
    return str(value).strip()


def _completion(record: dict, key: str, where: str, fmt: str) -> str:
    text = _text(record, key, where, fmt)
    if not text:
        raise ValueError(f"dataset.path: {where}: empty {key!r} (format {fmt})")
    return text


def _self_instruct(record: dict, where: str) -> list[Example]:
    instruction = _text(record, "instruction", where, "self_instruct")
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ValueError(f"dataset.path: {where}: field 'instances' must be a non-empty list (format self_instruct)")
    examples = []
    for number, instance in enumerate(instances, start=1):
        place = f"{where} instance {number}"
        if not isinstance(instance, dict):
            raise ValueError(f"dataset.path: {place}: expected an object with input and output")
        context = _text(instance, "input", place, "self_instruct", required=False)
        examples.append(
            Example(instruction_prompt(instruction, context), _completion(instance, "output", place, "self_instruct"))
        )
    return examples


def _alpaca(record: dict, where: str) -> list[Example]:
    instruction = _text(record, "instruction", where, "alpaca")
    context = _text(record, "input", where, "alpaca", required=False)
    return [Example(instruction_prompt(instruction, context), _completion(record, "output", where, "alpaca"))]


def _prompt_completion(record: dict, where: str) -> list[Example]:
    # Taken verbatim: a prompt/completion dataset brings its own template.
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"dataset.path: {where}: field 'prompt' must be text (format prompt_completion)")
    completion = record.get("completion")
    if not isinstance(completion, str) or not completion.strip():
        raise ValueError(f"dataset.path: {where}: field 'completion' must be non-empty text (format prompt_completion)")
    return [Example(prompt, completion)]


def _plain_text(record: dict, where: str) -> list[Example]:
    return [Example("", _completion(record, "text", where, "text"))]


def _chat(record: dict, where: str) -> list[Example]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"dataset.path: {where}: field 'messages' must be a non-empty list (format chat)")
    turns: list[tuple[str, str]] = []
    examples = []
    for number, message in enumerate(messages, start=1):
        place = f"{where} message {number}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _CHAT_HEADERS:
            raise ValueError(f"dataset.path: {place}: role must be one of {list(_CHAT_HEADERS)}, got {role!r}")
        content = _text(message, "content", place, "chat")
        # One example per assistant turn: the loss covers every answer, each seen with its context.
        if role == "assistant" and content:
            examples.append(Example(chat_prompt(turns), content))
        turns.append((role, content))
    if not examples:
        raise ValueError(f"dataset.path: {where}: no non-empty assistant message (format chat)")
    return examples


_NORMALIZERS = {
    "self_instruct": _self_instruct,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "text": _plain_text,
    "chat": _chat,
}


def normalize(batches: Iterable[RecordBatch], fmt: str) -> list[Example]:
    """Every record as prompt/completion examples, in source order."""
    examples = []
    for batch in batches:
        for index, record in enumerate(batch.records, start=1):
            examples.extend(_NORMALIZERS[fmt](record, f"{batch.origin} record {index}"))
    return examples


# ---- the held-out split ----------------------------------------------------------------
def held_out_score(example: Example, split_seed: int) -> float:
    """A number in [0, 1) fixed by the example's content: adding or reordering others never changes it."""
    key = json.dumps([split_seed, example.prompt, example.completion], ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_examples(
    examples: Sequence[Example], eval_fraction: float, split_seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, eval): an example is held out when its score is below ``eval_fraction``.

    Duplicates land on the same side, so the held-out loss never scores a memorized example.
    With so few examples that no score falls below the fraction, the lowest one is held out
    anyway (and likewise one example is kept for training).
    """
    scores = [held_out_score(example, split_seed) for example in examples]
    held_out = [score < eval_fraction for score in scores]
    if eval_fraction > 0 and len(examples) >= 2:
        if not any(held_out):
            held_out[min(range(len(scores)), key=scores.__getitem__)] = True
        if all(held_out):
            held_out[max(range(len(scores)), key=scores.__getitem__)] = False
    train = [example for example, out in zip(examples, held_out) if not out]
    evaluation = [example for example, out in zip(examples, held_out) if out]
    return train, evaluation


# ---- prepared data on disk -------------------------------------------------------------
def _jsonl(examples: Iterable[Example]) -> str:
    return "".join(
        json.dumps({"prompt": e.prompt, "completion": e.completion}, ensure_ascii=False) + "\n" for e in examples
    )


def prepare_dataset(spec: DatasetSpec, out_dir: str | Path) -> dict[str, Any]:
    """Normalize and split ``spec``'s data into ``out_dir``/{train,eval}.jsonl and manifest.json.

    Each file is written atomically and the manifest last, so a manifest means a complete set.
    Returns the manifest.
    """
    from loratune import __version__

    batches, origin, source_sha256 = read_source(spec)
    n_records = sum(len(batch.records) for batch in batches)
    if n_records == 0:
        raise ValueError(f"dataset.path: {origin} holds no records")
    first = next(batch for batch in batches if batch.records)
    fmt = detect_format(first.records[0], first.origin) if spec.format == "auto" else spec.format
    examples = normalize(batches, fmt)
    if spec.max_examples is not None:
        examples = examples[: spec.max_examples]
    train, evaluation = split_examples(examples, spec.eval_fraction, spec.split_seed)
    if not train:
        raise ValueError(f"dataset.path: {origin} leaves no training example (it has {len(examples)})")
    if spec.eval_fraction > 0 and not evaluation:
        raise ValueError(
            f"dataset.eval_fraction: {spec.eval_fraction} of {len(examples)} example(s) in {origin} holds out none; "
            f"give more examples or a larger fraction"
        )
    train_text, eval_text = _jsonl(train), _jsonl(evaluation)
    manifest = {
        "path": spec.path,
        "source": origin,
        "format": fmt,
        "split": spec.split,
        "eval_fraction": spec.eval_fraction,
        "split_seed": spec.split_seed,
        "max_examples": spec.max_examples,
        "n_records": n_records,
        "n_examples": len(examples),
        "n_train": len(train),
        "n_eval": len(evaluation),
        "source_sha256": source_sha256,
        "data_sha256": hashlib.sha256((train_text + "\0" + eval_text).encode("utf-8")).hexdigest(),
        "loratune_version": __version__,
    }
    out_dir = Path(out_dir)
    ledger.atomic_write_text(out_dir / "train.jsonl", train_text)
    ledger.atomic_write_text(out_dir / "eval.jsonl", eval_text)
    ledger.atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def _read_examples(path: Path) -> list[Example]:
    return [Example(record["prompt"], record["completion"]) for record in _read_jsonl(path)]


def read_prepared(data_dir: str | Path) -> PreparedData:
    """The train and eval examples and the manifest that ``prepare_dataset`` wrote."""
    data_dir = Path(data_dir)
    missing = [name for name in ("train.jsonl", "eval.jsonl", "manifest.json") if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"data_dir: {data_dir} lacks {missing}; run prepare_dataset first")
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    return PreparedData(_read_examples(data_dir / "train.jsonl"), _read_examples(data_dir / "eval.jsonl"), manifest)


# ---- tokenization ----------------------------------------------------------------------
def tokenize_examples(tokenizer: Any, examples: Sequence[Example], max_seq_length: int) -> list[TokenizedExample]:
    """Token ids and labels; the labels mask the prompt, so only the completion (and EOS) is learned.

    The prompt gets the tokenizer's own special tokens (a BOS, for tokenizers that add one);
    the completion is followed by EOS so the model learns to stop. Sequences are cut at
    ``max_seq_length``; an example whose completion is cut away entirely has no loss tokens.
    """
    if not examples:
        return []
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokenized = []
    for prompt_ids, completion_ids in zip(prompts, completions):
        answer = list(completion_ids) + end
        input_ids = (list(prompt_ids) + answer)[:max_seq_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer)[:max_seq_length]
        tokenized.append(TokenizedExample(input_ids, labels))
    return tokenized
