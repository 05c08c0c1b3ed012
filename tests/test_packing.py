"""resources.trials_per_gpu: auto packs small models and leaves a model that fills the GPU alone."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from bench.shapes import LLAMA3, SHAPES
from loratune import packing

# The shapes of the measurement (issue 17): SmolLM2-135M, a Llama-3.2-1B and a Llama-3-8B shape.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
LLAMA_1B = {**SHAPES["llama3-1b"], "vocab_size": LLAMA3["vocab_size"]}
LLAMA_8B = {**SHAPES["llama3-8b"], "vocab_size": LLAMA3["vocab_size"]}
H200_GIB = 139.8


def model_folder(tmp_path, config, name="m"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize(
    "config, tokens, expected",
    [(SMOLLM2, 8 * 512, 8), (LLAMA_1B, 8 * 2048, 1), (LLAMA_8B, 4 * 2048, 1)],
    ids=["smollm2-8x512", "1b-8x2048", "8b-4x2048"],
)
def test_auto_packs_what_the_measurement_says_pays(tmp_path, config, tokens, expected):
    n, why = packing.resolve_trials_per_gpu("auto", model_folder(tmp_path, config), tokens, "nf4", H200_GIB, 16)
    assert n == expected, why
    assert 1.2e8 < packing.model_shape(model_folder(tmp_path, config, "again")).params < 9e9


def test_memory_cpu_and_a_fixed_number_limit_the_packing(tmp_path):
    smol = model_folder(tmp_path, SMOLLM2)
    assert packing.resolve_trials_per_gpu("auto", smol, 4096, "nf4", 10.0, 16)[0] == 2  # 10 GiB: two fit
    n, why = packing.resolve_trials_per_gpu("auto", smol, 4096, "nf4", H200_GIB, 3)
    assert (n, why) == (3, "3 CPU cores per GPU")
    assert packing.resolve_trials_per_gpu(5, smol, 4096, "nf4", H200_GIB, 16) == (5, "resources.trials_per_gpu")
    assert packing.resolve_trials_per_gpu("auto", smol, 4096, "nf4", None, 16)[0] == 1  # GPU size unknown
    assert packing.resolve_trials_per_gpu("auto", "meta-llama/x", 4096, "nf4", H200_GIB, 16)[0] == 1  # no folder


def test_parameters_come_from_the_safetensors_headers(tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOLLM2))
    header = json.dumps({"a": {"dtype": "BF16", "shape": [10, 20], "data_offsets": [0, 400]},
                         "__metadata__": {"format": "pt"}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(400))
    assert packing.model_shape(folder).params == 200


# ---- how many GPU jobs Snakemake's head runs at once (the `gpu_share` resource) ------------
REPO = Path(__file__).resolve().parents[1]


def study(trials_per_gpu="auto", gpus_per_trial=1, backend="qlora"):
    training = {"batch_size": 8, "max_seq_length": 512, "quantization": "nf4"}
    return {"backend": backend, "training": training,
            "resources": {"gpus_per_trial": gpus_per_trial, "trials_per_gpu": trials_per_gpu}}


def jobs_at_once(share: int) -> int:
    """What the local scheduler does with the profile's cap: as many jobs as fit in it."""
    return packing.SHARE_UNITS // share if share else float("inf")


@pytest.mark.parametrize(
    "gpus, config, exclusive, expected",
    [
        ("0", study(3), False, 1),  # no GPU: one trial at a time (it uses every core), as before
        ("1", study(1), False, 1),  # one trial per GPU: today's behaviour
        ("2", study(1), False, 2),
        ("2", study(3), False, 6),  # 3 slots on each of 2 GPUs
        ("8", study(8), False, 64),
        ("3", study(7), False, 21),
        ("2", study("auto"), False, 2),  # fake GPUs: their size unknown, so auto keeps one per GPU
        ("4", study(8, gpus_per_trial=2), False, 2),  # two GPUs per trial: 4 GPUs take two
        ("2", study(8), True, 2),  # an evaluation takes its GPU alone
        ("0", study(8), True, 1),
    ],
)
def test_the_default_profile_runs_as_many_gpu_jobs_as_the_gpus_take(gpus, config, exclusive, expected):
    share = packing.gpu_job_share(config, None, exclusive=exclusive, environ={"LORATUNE_GPUS": gpus})
    assert jobs_at_once(share) == expected


def test_jobs_without_a_gpu_and_slurm_jobs_ask_no_share():
    assert packing.gpu_job_share(study(backend="benchmark"), None, environ={"LORATUNE_GPUS": "2"}) == 0
    assert packing.gpu_job_share(study(gpus_per_trial=0), None, environ={"LORATUNE_GPUS": "2"}) == 0
    slurm = {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0", "LORATUNE_GPUS": "2"}
    assert packing.gpu_job_share(study(3), None, environ=slurm) == 0
    assert packing.study_trials_per_gpu(study(3), None, environ=slurm) == (1, "Slurm chose the GPU of this trial's job")


def test_a_head_inside_a_slurm_allocation_packs_the_allocations_gpus():
    """The head's allocation (loratune.devices.in_allocation) counts as a machine of its GPUs."""
    allocation = {"SLURM_JOB_ID": "7", "LORATUNE_SLURM_ALLOCATION": "7", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert packing.study_trials_per_gpu(study(3), None, environ=allocation) == (3, "resources.trials_per_gpu")
    assert jobs_at_once(packing.gpu_job_share(study(3), None, environ=allocation)) == 6
    assert jobs_at_once(packing.gpu_job_share(study(3), None, exclusive=True, environ=allocation)) == 2


def test_the_share_follows_the_model_once_it_is_prepared(tmp_path, monkeypatch):
    """`auto` with the prepared model: what the trial job will claim (study_trials_per_gpu)."""
    monkeypatch.setattr(packing, "gpu_memory_gib", lambda device: H200_GIB)  # no nvidia-smi here
    monkeypatch.setattr(packing, "cpus_per_gpu", lambda n_gpus: 16)
    smol, big = model_folder(tmp_path, SMOLLM2), model_folder(tmp_path, LLAMA_8B, "8b")
    env = {"LORATUNE_GPUS": "2"}
    assert packing.study_trials_per_gpu(study(), smol, env)[0] == 8
    assert jobs_at_once(packing.gpu_job_share(study(), smol, environ=env)) == 16
    assert jobs_at_once(packing.gpu_job_share(study(), big, environ=env)) == 2


def test_the_local_profile_caps_the_share_at_share_units():
    profile = yaml.safe_load((REPO / "profiles" / "local" / "config.yaml").read_text())
    assert profile["resources"] == [f"gpu_share={packing.SHARE_UNITS}"]


@pytest.mark.slow
def test_a_dry_run_gives_trial_jobs_their_slot_of_the_fake_gpus(tmp_path, monkeypatch):
    """The real DAG: after the pilot, `snakemake -n` on a machine of 2 (fake) GPUs with 3 trials
    per GPU gives each train_trial job a sixth of the GPUs, and the whole without GPUs."""
    from conftest import run_workflow, write_config
    from tiny_models import tiny_qlora_study

    config = tiny_qlora_study(tmp_path)
    config["resources"] = {"gpus_per_trial": 1, "trials_per_gpu": 3}
    configfile = write_config(tmp_path / "config.yaml", config)
    run_workflow(tmp_path, configfile, "results/tiny-qlora/seed0/pilot/round0/proposals.tsv")
    for gpus, share in (("2", packing.SHARE_UNITS // 6), ("0", packing.SHARE_UNITS)):
        monkeypatch.setenv("LORATUNE_GPUS", gpus)
        dry = run_workflow(tmp_path, configfile, "-n")
        trial_jobs = [job for job in dry.stdout.split("rule ")[1:] if job.startswith("train_trial:")]
        assert len(trial_jobs) == config["pilot"]["n"]
        assert all(f"gpu_share={share}," in job for job in trial_jobs), trial_jobs[0]
