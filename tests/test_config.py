"""The config schema: the model, dataset and training sections come from their dataclasses."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml
from conftest import REPO, load_test_config

from loratune.config import ConfigError, dataclass_schema, load_schema, validate_config
from loratune.training.settings import DatasetSpec, ModelSpec, TrainingSettings

SECTIONS = {"model": ModelSpec, "dataset": DatasetSpec, "training": TrainingSettings}


@pytest.mark.parametrize("section", SECTIONS)
def test_schema_section_lists_every_dataclass_field_with_its_default_and_help(section):
    cls = SECTIONS[section]
    entry = load_schema()["properties"][section]
    assert entry["additionalProperties"] is False and entry["type"] == "object"
    assert list(entry["properties"]) == [f.name for f in dataclasses.fields(cls)]
    instance = cls()
    for spec in dataclasses.fields(cls):
        generated = entry["properties"][spec.name]
        assert generated["description"] == spec.metadata["help"]
        default = getattr(instance, spec.name)
        assert generated["default"] == (list(default) if isinstance(default, tuple) else default)


def test_choice_lists_become_enums_and_types_follow_the_annotations():
    training = load_schema()["properties"]["training"]["properties"]
    assert training["scheduler"]["enum"] == ["cosine", "linear", "constant"]
    assert training["max_steps"]["type"] == ["integer", "null"]
    assert training["target_modules"]["type"] == ["array", "string"]
    assert training["target_modules"]["items"] == {"type": "string"}
    assert training["gradient_checkpointing"]["type"] == ["boolean", "string"]
    assert "enum" not in training["batch_size"]
    dataset = load_schema()["properties"]["dataset"]["properties"]
    assert dataset["format"]["enum"][0] == "auto"


def test_a_field_added_to_a_dataclass_reaches_the_schema_with_no_other_edit():
    @dataclasses.dataclass(frozen=True)
    class Extended(TrainingSettings):
        eval_every: int | None = dataclasses.field(default=None, metadata={"help": "Evaluate every N steps."})
        select: str = dataclasses.field(default="best", metadata={"help": "best or last.", "choices": ("best", "last")})

    properties = dataclass_schema(Extended)["properties"]
    assert properties["eval_every"] == {
        "type": ["integer", "null"],
        "description": "Evaluate every N steps.",
        "default": None,
    }
    assert properties["select"]["enum"] == ["best", "last"] and properties["select"]["default"] == "best"


def test_a_field_without_help_is_refused_when_the_schema_is_built():
    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        steps: int = 3

    with pytest.raises(TypeError, match="Undocumented.steps: a config field needs metadata"):
        dataclass_schema(Undocumented)


TYPOS = [("model", "nmae"), ("dataset", "fromat"), ("training", "lerning_rate")]


@pytest.mark.parametrize("backend", ["benchmark", "qlora"])
@pytest.mark.parametrize("section, typo", TYPOS)
def test_a_typo_in_a_dataclass_section_is_refused_with_one_line_naming_it(section, typo, backend):
    config = load_test_config("tiny_benchmark.yaml")
    config["backend"] = backend
    if backend == "qlora":
        config["objectives"] = {"eval_loss": "min"}
    config[section] = {typo: 1}
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    message = str(error.value)
    assert message.startswith(f"{section}.{typo}: unknown setting"), message
    assert "\n" not in message


def test_a_bad_value_in_a_dataclass_section_is_refused_for_the_benchmark_backend_too():
    config = load_test_config("tiny_benchmark.yaml")
    config["training"] = {"scheduler": "cosine-restarts"}
    with pytest.raises(ConfigError, match=r"^training\.scheduler: 'cosine-restarts' is not one of"):
        validate_config(copy.deepcopy(config))


def test_the_shipped_configs_validate_with_the_generated_schema():
    for path in [
        REPO / "config" / "config.yaml",
        *sorted((REPO / "config" / "experiments").glob("*.yaml")),
        *sorted((REPO / "tests" / "configs").glob("*.yaml")),
    ]:
        config = yaml.safe_load(path.read_text())
        # The tests fill these in with a tiny model and data of their own.
        for section, key, builtin in (("model", "name", "builtin:smollm2-135m"), ("dataset", "path", "builtin:instructions")):
            if config.get(section, {}).get(key) == "SET-BY-TEST":
                config[section][key] = builtin
        study = validate_config(config)
        assert study.config["training"]["batch_size"] >= 1, path


@pytest.mark.parametrize("proposer, options", [("botorch", {}), ("optuna", {"sampler": "gp"})])
def test_lora_coordinates_on_a_space_without_a_learning_rate_are_refused_before_any_job(proposer, options):
    config = load_test_config("tiny_benchmark.yaml")
    arm = {"proposer": proposer, "rounds": 1, "batch_size": 2, "options": {**options, "coordinates": "lora"}}
    config["arms"] = {"lora-arm": arm}
    validate_config(copy.deepcopy(config))  # the space has rank, alpha and learning rate
    config["search_space"]["learning_rate"] = {"type": "fixed", "value": 1.0e-4}
    with pytest.raises(ConfigError) as error:
        validate_config(copy.deepcopy(config))
    message = str(error.value)
    expected = "arms.lora-arm.options.coordinates: proposer coordinates lora: needs learning_rate"
    assert message.startswith(expected), message
    assert "\n" not in message
