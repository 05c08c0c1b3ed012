"""lm-evaluation-harness tasks over local files: loratune's own, built from a study's held-out
split, and a user's task folder.

Every task reads its documents with lm-eval's ``dataset_path: json`` and ``data_files``, so
nothing comes from a hub. loratune's tasks, each over the held-out examples it fits:

- ``loratune_instruct``: instructions (not classification ones); the adapter generates an answer
  greedily, scored against the reference by ``exact_match`` (case and punctuation ignored) and
  ``chrf`` (sacrebleu's character n-gram F-score: an overlap score that, unlike ROUGE in
  lm-eval, needs no task code and no download).
- ``loratune_classify``: classification instructions (self-instruct's ``is_classification``):
  multiple choice over the task's labels, ``acc``.
- ``loratune_last_word``: plain text: the passage's last word from the words before it, as
  lm-eval's LAMBADA scores it: ``acc`` (the word is the greedy continuation) and ``perplexity``.

The instruction tasks are rendered as the adapter was trained: the study's ``dataset.template``
(the chat template: the user's message through lm-eval's ``apply_chat_template``; alpaca: the
``### Instruction:`` prompt).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from loratune import ledger
from loratune.training.data import Example

# Fields a task file must have for loratune to run it and to know what it reports.
REQUIRED_TASK_FIELDS = ("task", "dataset_path", "doc_to_text", "doc_to_target", "metric_list")
MAX_ANSWER_TOKENS = 64  # longest generated answer of loratune_instruct
_STOP_SEQUENCES = ("\n\n###", "###", "<|im_end|>")


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    metric_list: tuple[dict[str, Any], ...]  # lm-eval's metric_list of the task
    help: str
    output_type: str  # lm-eval's
    # The task file's own fields (doc_to_target, ...); doc_to_text defaults to the question as
    # the study renders it (``_builtin_config``).
    fields: dict[str, Any]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(entry["metric"] for entry in self.metric_list)


def _mean(metric: str, **options: Any) -> dict[str, Any]:
    return {"metric": metric, "aggregation": "mean", "higher_is_better": True, **options}


BUILTIN_TASKS = {
    task.name: task
    for task in (
        BuiltinTask(
            "loratune_instruct",
            (
                _mean("exact_match", ignore_case=True, ignore_punctuation=True),
                {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True},
            ),
            "held-out instructions: generated answers",
            "generate_until",
            {
                "doc_to_target": "{{answer}}",
                "target_delimiter": "",
                "generation_kwargs": {
                    "until": list(_STOP_SEQUENCES),
                    "max_gen_toks": MAX_ANSWER_TOKENS,
                    "do_sample": False,
                },
            },
        ),
        BuiltinTask(
            "loratune_classify",
            (_mean("acc"),),
            "held-out classification instructions: multiple choice",
            "multiple_choice",
            {
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "target_delimiter": "",  # both renderings end the prompt where the answer starts
            },
        ),
        # LAMBADA's scoring: the log-likelihood of " word" after the context; acc = it is the greedy continuation.
        BuiltinTask(
            "loratune_last_word",
            ({"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}, _mean("acc")),
            "held-out text: its last word",
            "loglikelihood",
            {"doc_to_text": "{{context}}", "doc_to_target": "{{' ' + word}}"},
        ),
    )
}


class TaskError(ValueError):
    """A task name or task file is unusable; the message names the config field or file."""


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task files, whose ``!function module.name`` tags only lm-eval resolves."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")


def _read_task_file(path: Path) -> dict[str, Any]:
    try:
        content = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)
    except yaml.YAMLError as error:
        raise TaskError(f"evaluation.include_path: {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise TaskError(f"evaluation.include_path: {path}: expected a mapping")
    included = content.pop("include", None)
    if isinstance(included, str):  # lm-eval's include: the named file's fields, overridden by this one's
        content = {**_read_task_file(path.parent / included), **content}
    return content


def user_tasks(include_path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Task name -> its config, for every task file in ``include_path`` (lm-eval's group files skipped)."""
    if include_path is None:
        return {}
    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise TaskError(f"evaluation.include_path: no such folder: {include_path}")
    tasks = {}
    for path in sorted(folder.rglob("*.yaml")):
        config = _read_task_file(path)
        if "group" in config and "task" in config and isinstance(config["task"], list):
            continue
        if "task" not in config:  # a file only others include
            continue
        missing = [name for name in REQUIRED_TASK_FIELDS if name not in config]
        if missing:
            raise TaskError(f"evaluation.include_path: {path}: missing field {missing[0]!r}")
        if not isinstance(config["metric_list"], list) or not all(
            isinstance(m, dict) and "metric" in m for m in config["metric_list"]
        ):
            raise TaskError(f"evaluation.include_path: {path}: metric_list: each entry needs a 'metric'")
        tasks[str(config["task"])] = config
    return tasks


def task_metrics(tasks: Iterable[str], include_path: str | Path | None) -> dict[str, tuple[str, ...]]:
    """The metrics each named task reports; raises ``TaskError`` for a task that does not exist."""
    users = user_tasks(include_path)
    known = sorted(BUILTIN_TASKS) + sorted(users)
    reported = {}
    for index, name in enumerate(tasks):
        if name in users:
            reported[name] = tuple(str(m["metric"]) for m in users[name]["metric_list"])
        elif name in BUILTIN_TASKS:
            reported[name] = tuple(BUILTIN_TASKS[name].metrics)
        else:
            raise TaskError(f"evaluation.tasks[{index}]: unknown task {name!r}; choose from {known}")
    return reported


def sha256_folder(folder: str | Path | None) -> str | None:
    """Names and contents of every file in a task folder: an edited task changes it."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    root = Path(folder).expanduser()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def task_config_fingerprint(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """What an evaluation's results depend on besides the adapter and the data: the settings and
    the user's task files. Written beside the results so that a change re-runs evaluation only."""
    return {
        "tasks": list(evaluation["tasks"]),
        "include_path": evaluation["include_path"],
        "include_sha256": sha256_folder(evaluation["include_path"]),
        "limit": evaluation["limit"],
    }


# ---- loratune's tasks over a study's held-out split -----------------------------------
def _documents(task: str, examples: Iterable[Example]) -> list[dict[str, Any]]:
    docs = []
    for example in examples:
        if task == "loratune_instruct" and example.completion and example.messages and not example.choices:
            docs.append({"prompt": example.prompt, "user": example.messages[0][1], "answer": example.completion})
        elif task == "loratune_classify" and example.choices:
            docs.append(
                {
                    "prompt": example.prompt,
                    "user": example.messages[0][1],
                    "choices": list(example.choices),
                    "label": example.choices.index(example.completion),
                }
            )
        elif task == "loratune_last_word" and not example.messages and not example.prompt:
            context, _, word = example.completion.rpartition(" ")
            if context.strip() and word.strip():
                docs.append({"context": context, "word": word})
    return docs


def _builtin_config(task: str, data_file: Path, chat: bool) -> dict[str, Any]:
    """The lm-eval task file of a loratune task over the documents in ``data_file``."""
    spec = BUILTIN_TASKS[task]
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": spec.output_type,
        "doc_to_text": "{{user}}" if chat else "{{prompt}}",
        **copy.deepcopy(spec.fields),
        "metric_list": [dict(entry) for entry in spec.metric_list],
    }


def write_builtin_tasks(
    tasks: Iterable[str], examples: Iterable[Example], folder: str | Path, *, chat: bool
) -> dict[str, str]:
    """Write the named loratune tasks (YAML and documents) into ``folder``; return task -> sha256
    of its config with its documents in place of their path (the same for the same data)."""
    folder = Path(folder)
    examples = list(examples)
    fingerprints = {}
    for task in tasks:
        if task not in BUILTIN_TASKS:
            continue
        docs = _documents(task, examples)
        if not docs:
            raise TaskError(
                f"evaluation.tasks: {task} has no document in the held-out split (it needs {BUILTIN_TASKS[task].help})"
            )
        docs_text = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
        data_file = folder / f"{task}.jsonl"
        ledger.atomic_write_text(data_file, docs_text)
        config = _builtin_config(task, data_file, chat)
        ledger.atomic_write_text(folder / f"{task}.yaml", yaml.safe_dump(config, sort_keys=False))
        portable = {**config, "dataset_kwargs": {"data_sha256": hashlib.sha256(docs_text.encode()).hexdigest()}}
        fingerprints[task] = hashlib.sha256(json.dumps(portable, sort_keys=True).encode()).hexdigest()
    return fingerprints


def sync_task_config(path: str | Path, evaluation: Mapping[str, Any]) -> None:
    """Write the fingerprint of ``evaluation`` to ``path`` unless it already holds it: its mtime
    then changes exactly when the evaluation settings do (the workflow's rerun trigger)."""
    text = json.dumps(task_config_fingerprint(evaluation), indent=1, sort_keys=True) + "\n"
    path = Path(path)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        ledger.atomic_write_text(path, text)
