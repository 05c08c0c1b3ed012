"""What the chat template changes, and what one trial's lm-eval evaluation costs.

Two real trials of the default study's settings (SmolLM2-135M-Instruct, NF4, the builtin
instructions, its held-out split, max_steps 30) that differ only in ``dataset.template``: auto
(the model's chat template) and alpaca (the 2024 study's ``### Instruction:`` headers). Their
eval losses are over different token sets (the chat template learns the end-of-turn token
``<|im_end|>`` where alpaca learns the tokenizer's EOS, and the answer follows a different
prompt), so they compare renderings, not adapters. Then the chat-template adapter is evaluated
with lm-eval (``loratune_instruct``), timed. Both trials must count the same answer tokens
(``eval_tokens``: each answer and one end token) under every transformers version.

    python bench/chat_template.py --out bench/results/chat_template_cpu.json [--device cpu] [--limit 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from loratune.evaluation.harness import OFFLINE_ENVIRONMENT

# Offline before the Hugging Face libraries are imported (they read these at import), as the job.
os.environ.update(OFFLINE_ENVIRONMENT)

import yaml  # noqa: E402

from loratune.files import atomic_write_json  # noqa: E402
from loratune.evaluation import evaluate_adapter  # noqa: E402
from loratune.training import (  # noqa: E402
    DatasetSpec,
    ModelSpec,
    TrainingSettings,
    prepare_dataset,
    prepare_model,
    run_trial,
)

REPO = Path(__file__).resolve().parents[1]
HPARAMS = {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 1e-3, "lora_dropout": 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/loratune-chat-template")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=20, help="lm-eval documents")
    parser.add_argument("--max-steps", type=int, default=30)
    args = parser.parse_args()
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    work = Path(args.work)
    model_path = prepare_model(ModelSpec(**default.get("model", {})), work / "models")
    settings = TrainingSettings(
        **{**default["training"], "max_steps": args.max_steps, "keep_adapter": True, "device": args.device}
    )
    import transformers

    from loratune.training.models import SOURCE_FILE

    result = {
        "hparams": HPARAMS,
        "max_steps": args.max_steps,
        "machine": platform.node(),
        "transformers": transformers.__version__,
        # The converted tokenizer's special tokens (transformers 5.17 once made EOS <|im_start|>).
        "special_tokens": json.loads((Path(model_path) / SOURCE_FILE).read_text()).get("special_tokens"),
        "trials": {},
    }
    for template in ("auto", "alpaca"):
        data_dir = work / f"data-{template}"
        prepare_dataset(DatasetSpec(**{**default["dataset"], "template": template}), data_dir)
        metrics = run_trial(HPARAMS, settings, model_path, data_dir, work / f"trial-{template}", seed=0)
        result["trials"][template] = {
            k: metrics.get(k) for k in ("status", "eval_loss", "train_loss", "eval_tokens", "train_time", "device")
        }
        print(template, result["trials"][template], flush=True)
    started = time.perf_counter()
    evaluation = {"tasks": ["loratune_instruct"], "include_path": None, "limit": args.limit, "batch_size": 8}
    record = evaluate_adapter(
        model_path, work / "trial-auto" / "adapter", work / "data-auto", evaluation, device=args.device
    )
    record.pop("traceback", None)
    result["evaluation"] = {**record, "wall_time": time.perf_counter() - started, "limit": args.limit}
    print(json.dumps(result, indent=1))
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
