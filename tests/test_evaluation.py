"""lm-eval tasks over a study's held-out split, run on saved adapters; config checks of evaluation."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from loratune import files, ledger
from loratune.config import ConfigError, validate_config
from loratune.evaluation import BUILTIN_TASKS, evaluate_adapter, flatten, task_metrics
from loratune.loop import update_history
from loratune.training import DatasetSpec, ModelSpec, prepare_dataset, prepare_model, run_trial
from conftest import STUDY_SPACE

SETTINGS_CPU = {
    "quantization": "none",
    "max_steps": 1,
    "batch_size": 2,
    "max_seq_length": 64,
    "keep_adapter": True,
    "device": "cpu",
}
HPARAMS = {"lora_rank": 4, "lora_alpha": 8, "learning_rate": 1e-3}

USER_TASK = {
    "task": "my_reverse",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": "SET"}},
    "test_split": "test",
    "output_type": "loglikelihood",
    "doc_to_text": "{{prompt}}",
    "doc_to_target": "{{completion}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}


def study_config(**changes) -> dict:
    config = {
        "study": "eval-check",
        "backend": "qlora",
        "objectives": {"eval_loss": "min", "lm_eval.loratune_last_word.acc": "max"},
        "search_space": STUDY_SPACE,
        "arms": {"random": {"proposer": "random"}},
        "training": {"keep_adapter": True},
        "evaluation": {"tasks": ["loratune_last_word"]},
    }
    for key, value in changes.items():
        config[key] = value
    return config


def write_task(folder: Path, task: dict) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    return folder


# ---- config checks: one line naming the field, before any job --------------------------
def test_a_valid_evaluation_config_passes_and_reports_its_metrics():
    study = validate_config(study_config())
    assert study.evaluates and study.config["evaluation"]["limit"] is None
    assert task_metrics(["loratune_instruct"], None) == {"loratune_instruct": ("exact_match", "chrf")}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"evaluation": {"tasks": ["hellaswag"]}}, r"^evaluation\.tasks\[0\]: unknown task 'hellaswag'"),
        (
            {"objectives": {"lm_eval.loratune_last_word.f1": "max"}},
            r"^objectives\.lm_eval\.loratune_last_word\.f1: task loratune_last_word reports \['perplexity', 'acc'\]",
        ),
        (
            {"objectives": {"lm_eval.loratune_instruct.chrf": "max"}},
            r"^objectives\.lm_eval\.loratune_instruct\.chrf: task 'loratune_instruct' is not in evaluation\.tasks",
        ),
        ({"training": {"keep_adapter": False}}, r"^training\.keep_adapter: evaluation\.tasks evaluate"),
        ({"evaluation": {"tasks": ["loratune_last_word"], "limit": 0}}, r"^evaluation\.limit: "),
    ],
)
def test_bad_evaluation_settings_fail_with_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as raised:
        validate_config(study_config(**changes))
    assert "\n" not in str(raised.value)


def test_a_user_task_folder_is_checked_field_by_field(tmp_path):
    folder = write_task(tmp_path / "tasks", USER_TASK)
    config = study_config(
        evaluation={"tasks": ["my_reverse"], "include_path": str(folder)}, objectives={"lm_eval.my_reverse.acc": "max"}
    )
    assert validate_config(config).evaluates
    write_task(folder, {k: v for k, v in USER_TASK.items() if k != "doc_to_target"})
    with pytest.raises(
        ConfigError, match=r"^evaluation\.include_path: .*my_reverse\.yaml: missing field 'doc_to_target'$"
    ):
        validate_config(study_config(evaluation={"tasks": ["my_reverse"], "include_path": str(folder)}))


def test_a_failed_evaluation_gives_nan_objectives_and_keeps_the_others():
    objectives = {"eval_loss": "min", "lm_eval.loratune_instruct.chrf": "max"}
    ok = {"status": "ok", "lm_eval": {"loratune_instruct": {"chrf": 12.5, "exact_match": 0.25}}}
    assert flatten(ok, objectives) == {
        "lm_eval.loratune_instruct.chrf": 12.5,
        "lm_eval.loratune_instruct.exact_match": 0.25,
    }
    assert math.isnan(flatten({"status": "failed", "lm_eval": {}}, objectives)["lm_eval.loratune_instruct.chrf"])


# ---- running lm-eval on saved adapters -------------------------------------------------
def _passages(path: Path) -> Path:
    words = "garden river stone cloud window pencil candle forest planet rocket silver orange".split()
    rows = [{"text": " ".join(words[i:] + words[:i])} for i in range(len(words))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_last_word_and_a_user_task_run_on_a_saved_adapter(tmp_path, tiny_model):
    data_dir = tmp_path / "data"
    prepare_dataset(DatasetSpec(path=str(_passages(tmp_path / "p.jsonl")), eval_fraction=0.5), data_dir)
    metrics = run_trial(HPARAMS, SETTINGS_CPU, tiny_model, data_dir, tmp_path / "trial", seed=0)
    assert metrics["status"] == "ok"
    user_task = {**USER_TASK, "dataset_kwargs": {"data_files": {"test": str(data_dir / "eval.jsonl")}}}
    evaluation = {
        "tasks": ["loratune_last_word", "my_reverse"],
        "include_path": str(write_task(tmp_path / "tasks", user_task)),
        "limit": 3,
        "batch_size": 2,
    }
    record = evaluate_adapter(tiny_model, tmp_path / "trial" / "adapter", data_dir, evaluation, device="cpu")
    assert record["status"] == "ok", record.get("error")
    scores = record["lm_eval"]["loratune_last_word"]
    assert 0.0 <= scores["acc"] <= 1.0 and scores["perplexity"] > 1.0  # a random 2-layer model is no oracle
    assert set(record["lm_eval"]["my_reverse"]) == {"acc"}
    assert record["n_documents"] == {"loratune_last_word": 3, "my_reverse": 3}
    # Another adapter directory that does not exist: recorded as a failed evaluation, not raised.
    missing = evaluate_adapter(tiny_model, tmp_path / "nothing", data_dir, evaluation, device="cpu")
    assert missing["status"] == "failed" and "keep_adapter" in missing["error"]


CLASSIFY = [
    {
        "id": f"task_{i}",
        "instruction": instruction,
        "instances": [{"input": text, "output": label} for text, label in instances],
        "is_classification": True,
    }
    for i, (instruction, instances) in enumerate(
        [
            (
                "Is the sentiment of the review positive or negative?",
                [
                    ("I loved every minute.", "Positive"),
                    ("Dull and far too long.", "Negative"),
                    ("A wonderful cast.", "Positive"),
                    ("I want my money back.", "Negative"),
                ],
            ),
            (
                "Is the number even or odd?",
                [("14", "Even"), ("7", "Odd"), ("22", "Even"), ("9", "Odd"), ("31", "Odd"), ("40", "Even")],
            ),
        ]
    )
]


@pytest.fixture(scope="module")
def smollm2(request, tmp_path_factory) -> str:
    """The embedded SmolLM2-135M-Instruct, converted once into pytest's cache folder (the
    conversion, the slow part, is redone only when the GGUF file changes; a scratch folder when
    pytest runs without its cache, -p no:cacheprovider)."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("loratune-models") if cache is not None else tmp_path_factory.mktemp("models")
    return prepare_model(ModelSpec(), folder)


def test_classification_on_the_embedded_model_lands_in_the_history(tmp_path, smollm2):
    source = tmp_path / "classify.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in CLASSIFY))
    data_dir = tmp_path / "data"
    prepare_dataset(DatasetSpec(path=str(source), eval_fraction=0.4), data_dir)
    trial_dir = tmp_path / "seed0" / "trials" / "r4_a8_lr0.001"
    metrics = run_trial(HPARAMS, SETTINGS_CPU, smollm2, data_dir, trial_dir, seed=0)
    files.atomic_write_json(trial_dir / "metrics.json", {**metrics, "trial_id": trial_dir.name})
    evaluation = {"tasks": ["loratune_classify"], "include_path": None, "limit": 4, "batch_size": 4}

    from loratune.evaluation.harness import evaluate_trial

    record = evaluate_trial(trial_dir / "metrics.json", smollm2, data_dir, evaluation, trial_dir / "evaluation.json")
    assert record["status"] == "ok", record.get("error")
    assert record["template"] == "chat"  # SmolLM2's tokenizer carries its chat template
    assert 0.0 <= record["lm_eval"]["loratune_classify"]["acc"] <= 1.0

    proposals = pd.DataFrame(
        [
            {
                "seed": 0,
                "arm": "pilot",
                "round": 0,
                "trial_id": trial_dir.name,
                "lora_rank": 4,
                "lora_alpha": 8,
                "learning_rate": 1e-3,
            }
        ]
    )
    ledger.write_table(proposals, tmp_path / "proposals.tsv")
    objectives = {"eval_loss": "min", "lm_eval.loratune_classify.acc": "max"}
    history = update_history(
        None,
        tmp_path / "proposals.tsv",
        [trial_dir / "metrics.json"],
        tmp_path / "history.tsv",
        evaluation_paths=[trial_dir / "evaluation.json"],
        objectives=objectives,
    )
    assert history.loc[0, "lm_eval.loratune_classify.acc"] == record["lm_eval"]["loratune_classify"]["acc"]
    assert history.loc[0, "evaluation_status"] == "ok"


def test_builtin_task_names_are_the_documented_ones():
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "loratune/schemas/config.schema.yaml").read_text())
    described = schema["properties"]["evaluation"]["properties"]["tasks"]["description"]
    assert all(name in described for name in BUILTIN_TASKS)


def test_a_rung_record_scores_the_adapter_its_rung_selected(tmp_path):
    """A stopped trial's rung record (step<k>/metrics.json) uses the trial folder's adapter while
    it holds the rung's selected step, its own folder's where the rung trained apart, and none
    (a failed evaluation, no lm-eval run) once the trial trained on and replaced it."""
    from loratune.evaluation.harness import adapter_of, evaluate_trial
    from loratune.training.metrics import ADAPTER_STEP_FILE

    trial = tmp_path / "seed0" / "trials" / "r4_a8_lr0.001"
    rung = trial / "step10" / "metrics.json"
    record = {"status": "ok", "trial_id": trial.name, "best_step": 10}
    files.atomic_write_json(rung, record)

    def save(folder: Path, step: int) -> None:
        files.atomic_write_json(folder / "adapter_config.json", {"peft_type": "LORA"})
        files.atomic_write_json(folder / ADAPTER_STEP_FILE, {"step": step})

    with pytest.raises(FileNotFoundError, match="keep_adapter"):
        adapter_of(rung, record)
    save(trial / "adapter", 10)
    assert adapter_of(rung, record) == trial / "adapter"
    save(trial / "adapter", 20)  # trained on to step 20 (another arm's full budget)
    with pytest.raises(ValueError, match=r"holds step 20, not step 10 that .*step10/metrics\.json selected"):
        adapter_of(rung, record)
    evaluation = {"tasks": ["loratune_instruct"], "include_path": None, "limit": 1, "batch_size": 1}
    failed = evaluate_trial(rung, "unused-model", tmp_path / "no-data", evaluation, rung.with_name("evaluation.json"))
    assert failed["status"] == "failed" and "holds step 20" in failed["error"]
    assert json.loads(rung.with_name("evaluation.json").read_text())["trial_id"] == trial.name
    save(trial / "step10" / "adapter", 10)  # the rung trained in its own folder
    assert adapter_of(rung, record) == trial / "step10" / "adapter"
    # A full-budget record looks beside itself only.
    files.atomic_write_json(trial / "metrics.json", {**record, "best_step": 20})
    assert adapter_of(trial / "metrics.json", {**record, "best_step": 20}) == trial / "adapter"


def test_a_rung_keeps_the_adapter_it_selected_when_the_trial_trains_on(tmp_path, tiny_model):
    """keep_rung_adapter links the rung's adapter beside its record; the trainer's next save
    replaces the trial folder's adapter and leaves the rung's weights as they were."""
    import torch

    from loratune.evaluation.harness import adapter_of
    from loratune.training.metrics import ADAPTER_STEP_FILE
    from loratune.training.models import add_lora, load_base_model
    from loratune.training.trainer import save_adapter
    from loratune.trial import keep_rung_adapter

    base = load_base_model(
        tiny_model, quantization="none", dtype=torch.float32, device=torch.device("cpu"), gradient_checkpointing=False
    )
    model = add_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trial = tmp_path / "trials" / "r4_a8_lr0.001"
    save_adapter(model, trial / "adapter", 10)
    keep_rung_adapter(trial / "adapter", trial / "step10" / "adapter")
    rung_weights = (trial / "step10" / "adapter" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)  # trained on
    save_adapter(model, trial / "adapter", 20)
    assert (trial / "adapter" / "adapter_model.safetensors").read_bytes() != rung_weights
    assert (trial / "step10" / "adapter" / "adapter_model.safetensors").read_bytes() == rung_weights
    assert json.loads((trial / "step10" / "adapter" / ADAPTER_STEP_FILE).read_text()) == {"step": 10}
    record = {"status": "ok", "best_step": 10}
    assert adapter_of(trial / "step10" / "metrics.json", record) == trial / "step10" / "adapter"


def test_an_evaluation_claims_its_gpu_as_a_trial_does(tmp_path, tiny_model, monkeypatch):
    """evaluate_trial(gpus=1) holds a GPU of the local pool while lm-eval runs (the pool here: a
    device named by CUDA_VISIBLE_DEVICES; this machine has no CUDA, so lm-eval runs on the CPU),
    records it, and frees it after: an evaluation never lands on a GPU that a trial holds."""
    from loratune.devices import claim_gpu, default_lock_dir
    from loratune.evaluation.harness import evaluate_trial

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    data_dir = tmp_path / "data"
    prepare_dataset(DatasetSpec(path=str(_passages(tmp_path / "p.jsonl")), eval_fraction=0.5), data_dir)
    trial = tmp_path / "trial"
    metrics = run_trial(HPARAMS, SETTINGS_CPU, tiny_model, data_dir, trial, seed=0)
    files.atomic_write_json(trial / "metrics.json", metrics)
    evaluation = {"tasks": ["loratune_last_word"], "include_path": None, "limit": 2, "batch_size": 2}
    record = evaluate_trial(trial / "metrics.json", tiny_model, data_dir, evaluation, trial / "evaluation.json", gpus=1)
    assert record["status"] == "ok", record.get("error")
    assert record["gpu"] == "7"
    assert (default_lock_dir() / "7.lock").exists()  # claimed through the trials' lock
    with claim_gpu(1, timeout_seconds=1) as free:  # released
        assert free == "7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"  # restored
