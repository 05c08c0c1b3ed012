"""Study configuration: JSON-Schema validation with defaults, then checks the schema cannot express.

Every error is a ``ConfigError`` whose one-line message starts with the offending field, e.g.
``search_space.lora_rank.step: 5 does not divide high - low (252)``, so a bad config fails
before any job starts and says what to fix.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from importlib import resources
from typing import Any, Mapping

import jsonschema
import yaml

from loratune.designs import DESIGNS
from loratune.early_stopping import STUDY_PROMOTIONS, EarlyStopping
from loratune.ledger import PILOT
from loratune.space import SearchSpace, SpaceError
from loratune.training.metrics import OBJECTIVE_METRICS

__all__ = [
    "ConfigError",
    "Study",
    "dataclass_schema",
    "load_schema",
    "step_budget",
    "validate_config",
    "ARM_NAME_PATTERN",
]

ARM_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9-]*"
# Checked with re.fullmatch: the schema's ^...$ under re.search lets a trailing newline through.
STUDY_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
RESERVED_ARM_NAMES = {PILOT, "trials", "data", "plots", "gptune_db"}
# Numeric metrics that every qlora trial records in its metrics.json: the possible objectives.
TRIAL_METRICS = OBJECTIVE_METRICS


class ConfigError(ValueError):
    """The study configuration is invalid; the message names the field."""


def load_schema() -> dict:
    """The config schema: ``schemas/config.schema.yaml`` with the ``model``, ``dataset`` and
    ``training`` sections' fields generated from their dataclasses (``_dataclass_sections``) and
    the pilot designs from ``loratune.designs.DESIGNS``."""
    text = resources.files("loratune").joinpath("schemas/config.schema.yaml").read_text()
    schema = yaml.safe_load(text)
    for section, cls in _dataclass_sections().items():
        schema["properties"][section].update(dataclass_schema(cls))
    schema["properties"]["pilot"]["properties"]["design"]["enum"] = list(DESIGNS)
    return schema


def _dataclass_sections() -> dict[str, type]:
    from loratune.training.settings import DatasetSpec, ModelSpec, TrainingSettings

    return {"model": ModelSpec, "dataset": DatasetSpec, "training": TrainingSettings}


_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}


def _type_schema(annotation: Any, where: str) -> dict:
    """JSON-Schema ``type`` (and ``items``) of a field annotation: scalars, ``X | None``, ``tuple[str, ...]``."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    names, schema = [], {}
    for option in options:
        if typing.get_origin(option) in (tuple, list):
            item, *_ = typing.get_args(option)
            names.append("array")
            schema["items"] = _type_schema(item, where)
        elif option in _JSON_TYPES:
            names.append(_JSON_TYPES[option])
        else:
            raise TypeError(f"{where}: no JSON-Schema type for the annotation {option!r}")
    return {"type": names[0] if len(names) == 1 else names, **schema}


def _jsonable_default(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def dataclass_schema(cls: type) -> dict:
    """The JSON-Schema of a config section from its dataclass: per field its type, default,
    ``metadata["help"]`` as description and ``metadata["choices"]`` as enum; no other keys."""
    hints = typing.get_type_hints(cls)
    properties = {}
    for spec in dataclasses.fields(cls):
        where = f"{cls.__name__}.{spec.name}"
        if "help" not in spec.metadata:
            raise TypeError(f"{where}: a config field needs metadata={{'help': ...}}")
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if default is dataclasses.MISSING:
            raise TypeError(f"{where}: a config field needs a default")
        entry = {**_type_schema(hints[spec.name], where), "description": spec.metadata["help"]}
        if "choices" in spec.metadata:
            entry["enum"] = list(spec.metadata["choices"])
        entry["default"] = _jsonable_default(default)
        properties[spec.name] = entry
    return {"type": "object", "additionalProperties": False, "properties": properties}


def _fill_defaults(instance: Any, schema: Mapping[str, Any]) -> None:
    """Fill ``default`` values of object properties in place, recursively (through the
    items of an array too: each warm_start entry gets its defaults)."""
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(item, schema["items"])
        return
    if not isinstance(instance, dict) or schema.get("type") not in ("object", None):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance:
            _fill_defaults(instance[name], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for name, value in instance.items():
            if name not in schema.get("properties", {}):
                _fill_defaults(value, extra)


def _field(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _error_line(error: jsonschema.ValidationError) -> str:
    """One line that starts with the field: an unknown key (a typo) is named itself."""
    known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(error.instance, dict) and known:
        unknown = sorted(name for name in error.instance if name not in known)
        if unknown:
            return f"{_field([*error.absolute_path, unknown[0]])}: unknown setting; choose from {sorted(known)}"
    return f"{_field(error.absolute_path)}: {error.message}"


@dataclass(frozen=True)
class Arm:
    name: str
    proposer: str
    rounds: int
    batch_size: int
    options: dict
    early_stopping: EarlyStopping | None = None  # None: every trial trains its full budget


@dataclass(frozen=True)
class Study:
    """The validated study: what the workflow and scripts need, derived once from the config."""

    config: dict
    space: SearchSpace
    objectives: dict
    arms: tuple[Arm, ...]

    @property
    def name(self) -> str:
        return self.config["study"]

    @property
    def seeds(self) -> list[int]:
        return list(self.config["seeds"])

    @property
    def evaluates(self) -> bool:
        """Whether trials are evaluated by lm-eval (evaluation.tasks), after training."""
        return self.config["backend"] == "qlora" and bool(self.config.get("evaluation", {}).get("tasks"))

    @property
    def model_slug(self) -> str:
        """The model's name as one file-name component (a hub id holds a slash)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.config["model"]["name"]).strip("-.")

    def rung_steps(self, arm_name: str) -> list[int]:
        """The step each rung of an arm with early stopping ends at (checked by validate_config)."""
        return self.arm(arm_name).early_stopping.rung_steps(step_budget(self.config))

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)


def _check_objectives(config: dict, space: SearchSpace) -> None:
    objectives = config["objectives"]
    if config["backend"] == "benchmark":
        from loratune.benchmarks import PROBLEMS

        problem = config["benchmark"]["problem"]
        if problem == "table":
            from loratune.benchmarks import problem_from_config

            try:
                problem_from_config(config["benchmark"]).check(space, objectives)
            except ValueError as error:
                raise ConfigError(str(error)) from None
            if config["benchmark"]["memory_limit_gib"] is not None:
                raise ConfigError("benchmark.memory_limit_gib: only lora_surrogate models memory, not 'table'")
            return
        if problem not in PROBLEMS:
            raise ConfigError(f"benchmark.problem: unknown {problem!r}; choose one of {sorted([*PROBLEMS, 'table'])}")
        metric_names = getattr(PROBLEMS[problem], "metric_names", None)
        if config["benchmark"]["memory_limit_gib"] is not None and problem != "lora_surrogate":
            raise ConfigError(f"benchmark.memory_limit_gib: only lora_surrogate models memory, not {problem!r}")
        if not metric_names:
            try:
                PROBLEMS[problem].check(len(objectives), space.dim)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        else:
            for name in objectives:
                if name not in metric_names:
                    raise ConfigError(
                        f"objectives.{name}: not recorded by benchmark {problem!r}; "
                        f"choose from {sorted(metric_names)}"
                    )
        return
    reported = _check_evaluation(config)
    for name in objectives:
        if name.startswith("lm_eval."):
            task, _, metric = name.removeprefix("lm_eval.").rpartition(".")
            if task not in reported:
                raise ConfigError(
                    f"objectives.{name}: task {task or name!r} is not in evaluation.tasks {sorted(reported)}"
                )
            if metric not in reported[task]:
                raise ConfigError(f"objectives.{name}: task {task} reports {list(reported[task])}, not {metric!r}")
        elif name not in TRIAL_METRICS:
            raise ConfigError(
                f"objectives.{name}: not a recorded trial metric or lm_eval.<task>.<metric>; "
                f"choose from {sorted(TRIAL_METRICS)}"
            )


def _check_evaluation(config: dict) -> dict[str, tuple[str, ...]]:
    """The metrics of each evaluation task; the tasks must exist and the adapters be kept."""
    evaluation = config["evaluation"]
    if not evaluation["tasks"]:
        return {}
    from loratune.evaluation.tasks import TaskError, task_metrics

    if not config["training"].get("keep_adapter", False):
        raise ConfigError("training.keep_adapter: evaluation.tasks evaluate each trial's adapter; set it to true")
    try:
        return task_metrics(evaluation["tasks"], evaluation["include_path"])
    except TaskError as error:
        raise ConfigError(str(error)) from None


def _check_arm_coordinates(arms: tuple[Arm, ...], space: SearchSpace) -> None:
    """An arm whose proposer models the LoRA-aware coordinates needs rank, alpha and a tunable
    learning rate in the search space: said now, not by the first propose job."""
    from loratune.proposers.coordinates import LoraCoordinates

    for arm in arms:
        kind = arm.options.get("coordinates", "raw")
        if kind != "raw":
            try:
                LoraCoordinates(space, kind)
            except ValueError as error:
                raise ConfigError(f"arms.{arm.name}.options.coordinates: {error}") from None


def _check_arms(config: dict) -> tuple[Arm, ...]:
    from loratune.proposers import AVAILABLE_PROPOSERS, check_options

    arms = []
    for name, spec in config["arms"].items():
        if not re.fullmatch(ARM_NAME_PATTERN, name):
            raise ConfigError(f"arms.{name}: arm names hold letters, digits and -, starting with a letter")
        if name in RESERVED_ARM_NAMES:
            raise ConfigError(f"arms.{name}: {name!r} is reserved; choose another arm name")
        if spec["proposer"] not in AVAILABLE_PROPOSERS:
            raise ConfigError(
                f"arms.{name}.proposer: unknown {spec['proposer']!r}; " f"choose one of {sorted(AVAILABLE_PROPOSERS)}"
            )
        try:
            check_options(spec["proposer"], spec["options"])
        except ValueError as error:
            raise ConfigError(f"arms.{name}.options: {error}") from None
        early_stopping = None
        if spec.get("early_stopping") is not None:
            try:
                field = f"arms.{name}.early_stopping"
                early_stopping = EarlyStopping.from_config(spec["early_stopping"], field=field)
                budget = step_budget(config)
                if budget is None:
                    raise ValueError(
                        f"{field}: rungs are fractions of training.max_steps, which must be set (not null)"
                    )
                early_stopping.rung_steps(budget, field=f"{field}.rungs")
                if early_stopping.promote not in STUDY_PROMOTIONS:
                    raise ValueError(
                        f"{field}.promote: {early_stopping.promote!r} is measured by bench/early_stopping.py only "
                        f"(a study's promote job reads no complete curves); choose one of {list(STUDY_PROMOTIONS)}"
                    )
            except ValueError as error:
                raise ConfigError(str(error)) from None
        arms.append(
            Arm(name, spec["proposer"], spec["rounds"], spec["batch_size"], dict(spec["options"]), early_stopping)
        )
    return tuple(arms)


def step_budget(config: dict) -> int | None:
    """A trial's full step budget, which rungs are fractions of: a learning-curve table's own
    ``max_steps`` for the table problem, else ``training.max_steps`` (None: derived from epochs
    and the data, so not known before the data is prepared)."""
    if config["backend"] == "benchmark" and config["benchmark"]["problem"] == "table":
        from loratune.benchmarks import problem_from_config

        return problem_from_config(config["benchmark"]).max_steps
    return config["training"].get("max_steps")


def _check_training(config: dict) -> None:
    if config["backend"] != "qlora":
        return
    from loratune.training.settings import TrainingSettings, resolve_trial

    for key, cls in _dataclass_sections().items():
        try:
            cls(**config[key])
        except ValueError as error:
            message = str(error)
            raise ConfigError(message if message.startswith(f"{key}.") else f"{key}: {message}") from None
    # A local model or dataset that is missing fails now, not in the first job that reads it.
    from loratune.training import data, models

    for field, name, is_local in (
        ("model.name", config["model"]["name"], models.looks_like_local_path),
        ("dataset.path", config["dataset"]["path"], data.looks_like_local_path),
    ):
        if is_local(name) and not Path(name).expanduser().exists():
            raise ConfigError(f"{field}: no such file or directory: {name}")
    _check_dataset_source(config["dataset"]["path"])
    if "eval_loss" in config["objectives"] and config["dataset"]["eval_fraction"] == 0:
        raise ConfigError("dataset.eval_fraction: 0 holds out no example, but eval_loss is an objective")
    # Every trial must resolve to LoRA hyperparameters and settings: check the space's corners,
    # its centre and every choice, not only the centre (a rank of 0 hides at the low end).
    space = SearchSpace.from_config(config["search_space"])
    settings = TrainingSettings(**config["training"])
    for point in _probe_points(space):
        try:
            resolve_trial(point, settings)
        except ValueError as error:
            raise ConfigError(f"search_space: {str(error).removeprefix('hparams: ')}") from None


def _probe_points(space: SearchSpace) -> list[dict]:
    """The lowest, highest and middle point of the space, and one point per choice value."""
    points = [space.from_unit([u] * space.dim) for u in (0.0, 1.0, 0.5)]
    centre = points[-1]
    for param in space.tunable:
        for level in param.levels or []:
            points.append(space.snap({**centre, param.name: level}))
    return points


def _check_dataset_source(name: str) -> None:
    """A dataset that is not a local file, folder or builtin must be a hub id the job can fetch."""
    from loratune.training import data

    path = Path(name).expanduser()
    if name in data.BUILTIN_FILES:
        return
    if path.is_dir():
        if not data.folder_holds_data(path):
            raise ConfigError(f"dataset.path: {name} holds no {'/'.join(data.DATA_SUFFIXES)} file and no saved dataset")
        return
    if path.exists() or data.looks_like_local_path(name):
        return
    if "/" not in name:
        raise ConfigError(f"dataset.path: no such file or directory: {name} (a hub dataset id has the form owner/name)")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ConfigError(f"dataset.path: {name} is not a local path and the hub is offline (HF_HUB_OFFLINE)")


def _check_space_values(config: dict, space: SearchSpace) -> None:
    """Distinct choice values that print alike would share a trial id (and a trial folder)."""
    for param in space.tunable:
        seen: dict[str, Any] = {}
        for level in param.levels or []:
            text = param.format(level)
            if text in seen and seen[text] is not level:
                raise ConfigError(
                    f"search_space.{param.name}.values: {seen[text]!r} and {level!r} give the same trial id "
                    f"{text!r}; keep one"
                )
            seen[text] = level


def _check_space_size(config: dict, space: SearchSpace) -> None:
    """A finite space must hold the distinct points the pilot and every arm will ask for."""
    size = space.cardinality
    if size is None:
        return
    pilot = config["pilot"]["n"]
    if pilot > size:
        raise ConfigError(f"pilot.n: {pilot} trials asked for, but search_space has only {size} distinct points")
    for name, spec in config["arms"].items():
        needed = pilot + spec["rounds"] * spec["batch_size"]
        if needed > size:
            raise ConfigError(
                f"arms.{name}: pilot.n + rounds x batch_size = {needed} distinct trials, "
                f"but search_space has only {size} points"
            )


def _check_warm_start(config: dict, space: SearchSpace) -> None:
    """Every warm_start source readable, with the space's parameters and the objectives, and
    with trials inside the space (``loratune.warm_start.load_sources``)."""
    if not config["warm_start"]:
        return
    from loratune.warm_start import WarmStartError, load_sources

    try:
        load_sources(config, space, config["objectives"])
    except WarmStartError as error:
        raise ConfigError(str(error)) from None


def validate_config(config: dict) -> Study:
    """Validate ``config`` in place (defaults are filled in) and return the derived ``Study``."""
    schema = load_schema()
    _fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise ConfigError(_error_line(errors[0]))
    try:
        space = SearchSpace.from_config(config["search_space"])
    except SpaceError as error:
        raise ConfigError(str(error)) from None
    if not re.fullmatch(STUDY_NAME_PATTERN, config["study"]):
        raise ConfigError(
            f"study: {config['study']!r} must be letters, digits, _ . - (starting with a letter or digit)"
        )
    results_dir = Path(config["results_dir"]).expanduser()
    if results_dir.exists() and not results_dir.is_dir():
        raise ConfigError(f"results_dir: {config['results_dir']} is a file, not a folder")
    _check_space_values(config, space)
    overlap = set(config["objectives"]) & set(space.names)
    if overlap:
        raise ConfigError(f"objectives: {sorted(overlap)} are search-space parameters, not metrics")
    _check_objectives(config, space)
    arms = _check_arms(config)
    _check_arm_coordinates(arms, space)
    _check_training(config)
    _check_space_size(config, space)
    _check_warm_start(config, space)
    return Study(config=config, space=space, objectives=dict(config["objectives"]), arms=arms)


def load_config(path) -> Study:
    """Read and validate a config file (for use outside Snakemake)."""
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate_config(config)
