"""The wave profile with the test cluster's site values: what a user adapting it would do."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
WAVE_PROFILE = REPO / "profiles" / "wave" / "config.yaml"
TEST_OVERLAY = Path(__file__).resolve().parent / "profile" / "config.yaml"


def merged(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay``'s keys replaced, nested mappings merged key by key."""
    result = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def write_test_profile(folder: Path, **extra) -> Path:
    """Write the wave profile + the test overlay (+ ``extra`` keys) to ``folder``/config.yaml."""
    base = yaml.safe_load(WAVE_PROFILE.read_text())
    profile = merged(merged(base, yaml.safe_load(TEST_OVERLAY.read_text())), extra)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder
