"""Fine-tuning data: read a source, normalize it to examples, hold out a split by content hash,
and tokenize with a loss mask.

Every format becomes the same record, ``{"prompt", "completion"}`` plus, for instruction- and
chat-shaped data, the conversation as ``messages``: the loss covers the completion (and the
end-of-sequence token after it) only. Plain text has an empty prompt, so its loss covers every
token. The prepared data stays model-independent (its sha256 does not depend on which model a
study tunes): ``prompt`` holds the fixed ``### Instruction:`` rendering, and the model's own chat
template is applied to ``messages`` only when tokenizing, where the tokenizer is known
(``dataset.template``, see ``resolve_template``). A conversation is one example whose loss
covers every assistant turn.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from loratune.files import atomic_write_json, atomic_write_text
from loratune.training.settings import DATASET_FORMATS, TEMPLATES, DatasetSpec

IGNORE_INDEX = -100  # label of a token without loss (prompt, padding): torch's cross_entropy default
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
BUILTIN_FILES = {"builtin:instructions": "instructions.jsonl"}
# Marker files of a folder written by datasets' save_to_disk (a Dataset or a DatasetDict).
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_CHAT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
_NO_HEADERS = dict.fromkeys(_CHAT_HEADERS, "")
Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Example:
    """One training example.

    Raw data (prompt_completion, text): the model reads ``prompt`` and learns ``completion``.
    An instruction also has ``messages`` (user, assistant) for the model's chat template; its
    prompt/completion are the fixed ``### Instruction:`` rendering. A conversation (chat data)
    has only ``messages`` (prompt and completion empty): every assistant message is learned.
    ``choices``: the labels of a classification task (self-instruct's is_classification), for
    the multiple-choice evaluation; training ignores them.
    """

    prompt: str
    completion: str
    messages: tuple[Message, ...] = ()
    choices: tuple[str, ...] = ()

    @property
    def is_conversation(self) -> bool:
        return bool(self.messages) and not self.completion


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

    @property
    def template(self) -> str:
        """``dataset.template`` of the study; data prepared before the setting existed used alpaca."""
        return self.manifest.get("template", "alpaca")


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class Segment:
    """A stretch of rendered text; ``learned``: the loss covers it (an answer, followed by EOS)."""

    text: str
    learned: bool


# ---- prompt templates ------------------------------------------------------------------
def instruction_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca-style prompt of an instruction with an optional input."""
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def instruction_message(instruction: str, context: str = "") -> str:
    """The user's message of an instruction with an optional input, for a chat template."""
    return f"{instruction}\n\n{context}" if context else instruction


def chat_prompt(turns: Sequence[Message]) -> str:
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


def _instruction(instruction: str, context: str, answer: str, choices: tuple[str, ...] = ()) -> Example:
    messages = (("user", instruction_message(instruction, context)), ("assistant", answer))
    return Example(instruction_prompt(instruction, context), answer, messages, choices)


def _self_instruct(record: dict, where: str) -> list[Example]:
    instruction = _text(record, "instruction", where, "self_instruct")
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ValueError(f"dataset.path: {where}: field 'instances' must be a non-empty list (format self_instruct)")
    pairs = []
    for number, instance in enumerate(instances, start=1):
        place = f"{where} instance {number}"
        if not isinstance(instance, dict):
            raise ValueError(f"dataset.path: {place}: expected an object with input and output")
        context = _text(instance, "input", place, "self_instruct", required=False)
        pairs.append((context, _completion(instance, "output", place, "self_instruct")))
    # A classification task's labels are the answers its instances give (two at least to choose from).
    labels = tuple(sorted({answer for _, answer in pairs})) if record.get("is_classification") is True else ()
    choices = labels if len(labels) >= 2 else ()
    return [_instruction(instruction, context, answer, choices) for context, answer in pairs]


def _alpaca(record: dict, where: str) -> list[Example]:
    instruction = _text(record, "instruction", where, "alpaca")
    context = _text(record, "input", where, "alpaca", required=False)
    return [_instruction(instruction, context, _completion(record, "output", where, "alpaca"))]


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
    turns: list[Message] = []
    learned = 0  # turns up to the last non-empty answer: what follows it teaches nothing
    for number, message in enumerate(messages, start=1):
        place = f"{where} message {number}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _CHAT_HEADERS:
            raise ValueError(f"dataset.path: {place}: role must be one of {list(_CHAT_HEADERS)}, got {role!r}")
        content = _text(message, "content", place, "chat")
        turns.append((role, content))
        if role == "assistant" and content:
            learned = len(turns)
    if not learned:
        raise ValueError(f"dataset.path: {where}: no non-empty assistant message (format chat)")
    # One example per conversation: the loss covers every answer, each prefix encoded once.
    return [Example("", "", tuple(turns[:learned]))]


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
    # Content that the rendering does not change: an instruction's split is the same as before
    # messages were stored, and a conversation is hashed by its messages.
    content = [[list(m) for m in example.messages]] if example.is_conversation else []
    key = json.dumps([split_seed, example.prompt, example.completion, *content], ensure_ascii=False)
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
def _record(example: Example) -> dict[str, Any]:
    record: dict[str, Any] = {"prompt": example.prompt, "completion": example.completion}
    if example.messages:
        record["messages"] = [{"role": role, "content": content} for role, content in example.messages]
    if example.choices:
        record["choices"] = list(example.choices)
    return record


def _jsonl(examples: Iterable[Example]) -> str:
    return "".join(json.dumps(_record(e), ensure_ascii=False) + "\n" for e in examples)


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
        "template": spec.template,
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
    atomic_write_text(out_dir / "train.jsonl", train_text)
    atomic_write_text(out_dir / "eval.jsonl", eval_text)
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def _read_examples(path: Path) -> list[Example]:
    return [
        Example(
            record["prompt"],
            record["completion"],
            tuple((m["role"], m["content"]) for m in record.get("messages", ())),
            tuple(record.get("choices", ())),
        )
        for record in _read_jsonl(path)
    ]


def read_prepared(data_dir: str | Path) -> PreparedData:
    """The train and eval examples and the manifest that ``prepare_dataset`` wrote."""
    data_dir = Path(data_dir)
    missing = [name for name in ("train.jsonl", "eval.jsonl", "manifest.json") if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"data_dir: {data_dir} lacks {missing}; run prepare_dataset first")
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    return PreparedData(_read_examples(data_dir / "train.jsonl"), _read_examples(data_dir / "eval.jsonl"), manifest)


# ---- tokenization ----------------------------------------------------------------------
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, tokenizer: Any) -> str:
    """The rendering ``dataset.template`` asks for with this tokenizer: chat, alpaca or none.

    auto: the tokenizer's chat template when it has one, else the fixed headers (alpaca).
    """
    if template not in TEMPLATES:
        raise ValueError(f"dataset.template: unknown {template!r}; choose one of {list(TEMPLATES)}")
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "alpaca"
    if template == "chat" and not has_chat_template(tokenizer):
        raise ValueError("dataset.template: chat, but the model's tokenizer has no chat template; use auto or alpaca")
    return template


def header_segments(example: Example, template: str) -> list[Segment]:
    """The text of an example under a fixed template (alpaca: ``###`` headers; none: no headers).

    Raw data and alpaca-rendered instructions are their prompt and completion as prepared (the
    2024 study's tokens). A conversation, or an instruction without headers, is rendered turn by
    turn: each message is followed by a blank line (alpaca) or a newline (none), and every
    assistant message is a learned segment of its own.
    """
    if not example.messages or (template == "alpaca" and not example.is_conversation):
        return [Segment(example.prompt, False), Segment(example.completion, True)]
    headers, separator = (_CHAT_HEADERS, "\n\n") if template == "alpaca" else (_NO_HEADERS, "\n")
    segments, pending = [], ""
    for role, content in example.messages:
        if role == "assistant" and content:
            segments += [Segment(pending + headers["assistant"], False), Segment(content, True)]
            pending = separator
        else:
            pending += f"{headers[role]}{content}{separator}"
    return segments


def _tokenize_segments(tokenizer: Any, examples: Sequence[Example], template: str) -> list[TokenizedExample]:
    # Batched: every segment of every example in two tokenizer calls. The first segment gets
    # the tokenizer's own special tokens (a BOS, for tokenizers that add one); each learned
    # segment is followed by EOS so the model learns to stop.
    if not examples:
        return []
    rendered = [header_segments(example, template) for example in examples]
    firsts = tokenizer([segments[0].text for segments in rendered], add_special_tokens=True)["input_ids"]
    rest_texts = [segment.text for segments in rendered for segment in segments[1:]]
    rest = iter(tokenizer(rest_texts, add_special_tokens=False)["input_ids"] if rest_texts else [])
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokenized = []
    for segments, first in zip(rendered, firsts):
        input_ids, labels = list(first), [IGNORE_INDEX] * len(first)
        for segment in segments[1:]:
            ids = list(next(rest))
            if segment.learned:
                ids += end
                labels += ids
            else:
                labels += [IGNORE_INDEX] * len(ids)
            input_ids += ids
        tokenized.append(TokenizedExample(input_ids, labels))
    return tokenized


def _render(tokenizer: Any, messages: Sequence[Message], prompt: bool) -> str:
    turns = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)


def assistant_spans(tokenizer: Any, example: Example, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the model's chat template renders it, and the character spans the loss
    covers: each non-empty assistant message and the template's end-of-turn marker after it.

    An assistant turn is the text its message adds to the rendering of the conversation before
    it with the generation prompt (``<|im_start|>assistant\\n``): for SmolLM2,
    ``nedrag<|im_end|>\\n``. Its trailing whitespace is not learned: the model writes the
    end-of-turn marker and stops; the newline after it is the template's, as is the next header.
    The spans come from text alone, not from which tokens a tokenizer registers as special (that
    differs between transformers versions for one GGUF file). Each rendering must be a prefix of
    the whole, or the spans would be wrong.
    """
    text = _render(tokenizer, example.messages, False)
    spans = []
    for index, (role, content) in enumerate(example.messages):
        if role != "assistant" or not content:
            continue
        if index == 0:
            raise ValueError(
                f"dataset.template: {where} opens with an assistant message, which a chat template "
                f"cannot render as an answer; start it with a user message or use dataset.template: alpaca"
            )
        before = _render(tokenizer, example.messages[:index], True)
        through = (
            text if index == len(example.messages) - 1 else _render(tokenizer, example.messages[: index + 1], False)
        )
        if not text.startswith(through) or not through.startswith(before):
            raise ValueError(
                f"dataset.template: the model's chat template does not render {where} turn by turn "
                f"(message {index + 1} changes the text before it); use dataset.template: alpaca"
            )
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def _chat_template_tokens(tokenizer: Any, numbered: Sequence[tuple[int, Example]]) -> list[TokenizedExample]:
    # Render each conversation once, tokenize all in one call, and learn exactly the tokens whose
    # characters overlap an assistant span (a token across a span's edge holds answer text).
    if not numbered:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "dataset.template: the chat template's loss mask needs a fast (tokenizers) tokenizer for "
            "character offsets; this model's is not; use dataset.template: alpaca"
        )
    rendered = [assistant_spans(tokenizer, example, f"example {number}") for number, example in numbered]
    # The template writes its own BOS, so the tokenizer adds no special tokens.
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    tokenized = []
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        learned = [any(start < stop and end > begin for begin, stop in spans) for start, end in offsets]
        tokenized.append(TokenizedExample(list(ids), [t if m else IGNORE_INDEX for t, m in zip(ids, learned)]))
    return tokenized


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], max_seq_length: int, template: str = "alpaca"
) -> list[TokenizedExample]:
    """Token ids and labels; the labels mask everything but the answers, so only they are learned.

    ``template`` is ``dataset.template`` (see ``resolve_template``). With the chat template, an
    instruction or conversation is rendered as the model is used, and the loss covers exactly
    each assistant message and the template's end-of-turn marker (``assistant_spans``); raw data (prompt/completion,
    text) always keeps its own text. Otherwise ``header_segments`` renders it and each answer is
    followed by EOS. Sequences are cut at ``max_seq_length``; an example whose answers are cut
    away entirely has no loss tokens.
    """
    if not examples:
        return []
    rendering = resolve_template(template, tokenizer)
    templated = [rendering == "chat" and bool(example.messages) for example in examples]
    plain = iter(_tokenize_segments(tokenizer, [e for e, t in zip(examples, templated) if not t], rendering))
    chat = iter(_chat_template_tokens(tokenizer, [(n, e) for n, (e, t) in enumerate(zip(examples, templated), 1) if t]))
    tokenized = []
    for uses_template in templated:
        whole = next(chat) if uses_template else next(plain)
        tokenized.append(TokenizedExample(whole.input_ids[:max_seq_length], whole.labels[:max_seq_length]))
    return tokenized


def check_fits(tokenizer: Any, data: PreparedData, max_seq_length: int, chunk: int = 256) -> None:
    """Fail once, in prepare_dataset, when ``max_seq_length`` cuts away every answer of the
    training or the held-out examples, as training renders them; else every trial would fail
    alone with the same error. Stops at the first chunk with an example that fits."""
    for split, examples in (("training", data.train), ("held-out", data.eval)):
        fits = any(
            example.loss_tokens
            for start in range(0, len(examples), chunk)
            for example in tokenize_examples(tokenizer, examples[start : start + chunk], max_seq_length, data.template)
        )
        if examples and not fits:
            raise ValueError(
                f"training.max_seq_length: {max_seq_length} tokens leave no answer token in any of the "
                f"{len(examples)} {split} examples of {data.manifest.get('source')}; raise it or shorten the examples"
            )
