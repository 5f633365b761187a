"""A cost model on paper for the shipped studies: GPU-hours, trials per GPU-hour, wall time at 1/8/64 GPUs.

    python benchmarks/cost_model.py            # a Markdown table (docs/cluster.md holds its output)

Every count (configurations, seeds, epochs, batch size, GPUs per trial) is read from the study
files with ``load_study``; the seconds come from measurements, scaled as each constant below
says. Nothing here was run on the studies' GPUs: treat the result as an estimate within a
factor of about two, and replace a constant when a real run has measured it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Synthetic studies, seconds per seed per epoch, everything included (training, the per-epoch
#: evaluation, the latency measurement, the backbone's pre-training amortised): the quickstart's
#: six trials on a 2-core CPU, 50.7-87.7 s for 2 seeds x 40 epochs (reports/quickstart, mean 70.8 s).
#: These deep-MLP and small-Transformer regressors are launch-bound; a GPU is taken to run them at
#: the CPU core's speed (DESIGN: at batch 1 a GPU is launch-bound), four trials a GPU
#: (gpus_per_trial = 0.25). A CPU measurement used as is: the largest uncertainty here.
SYNTHETIC_SEED_EPOCH_S = 70.8 / (2 * 40)

#: Qwen2.5-0.5B, bf16, batch 8 x 512 on one H200 (DESIGN, `qlsearch profile`): forward with PEFT
#: LoRA 42 ms; a training step is taken as 3 forwards (backward ~ 2 forwards).
QWEN05_FORWARD_S = 0.042
#: Decoding on the H200 at batch 1: 37 tokens/s (queryable); a batch of 8 is taken to decode at
#: the same step rate (launch-bound at this size).
DECODE_STEP_S = 1 / 37
#: Other backbones: the Qwen2.5-0.5B times scaled by parameter count (same tokens, compute-bound).
PARAMS = {"Qwen/Qwen2.5-0.5B-Instruct": 0.494e9, "mistralai/Mistral-7B-v0.1": 7.24e9}

#: Split sizes (train, validation, test) and answer choices of the text tasks, from their
#: Hugging Face dataset cards; a missing split reuses the test split's size.
DATASETS = {
    "arc_challenge": (1119, 299, 1172, 4),
    "gpqa_diamond": (198, 198, 198, 4),   # one 198-question split: an upper bound
    "hellaswag": (39905, 10042, 10042, 4),
    "openbookqa": (4957, 500, 500, 4),
    "race": (87866, 4887, 4934, 4),
    "superglue_boolq": (9427, 3270, 3270, 2),
    "boolq": (9427, 3270, 3270, 2),
    "gsm8k": (7473, 1319, 1319, 0),
    "math": (7500, 5000, 5000, 0),
    "numina_math": (859494, 100, 100, 0),
    "orca_math": (200035, 1000, 1000, 0),
}

GPUS = (1, 8, 64)


def config_seconds(study) -> float:
    """GPU seconds (of a whole GPU's time share) for one configuration on every seed."""
    seeds, train, task = len(study.seeds), study.train, study.task
    if task.kind == "synthetic":
        return seeds * train.epochs * SYNTHETIC_SEED_EPOCH_S
    n_train, n_val, n_test, choices = DATASETS[task.name]
    forward = QWEN05_FORWARD_S * PARAMS.get(task.backbone, PARAMS["Qwen/Qwen2.5-0.5B-Instruct"]) / 0.494e9
    batches = math.ceil(n_train / train.batch_size)
    training = train.epochs * batches * 3 * forward
    losses = train.epochs * math.ceil((n_train + n_val + n_test) / train.batch_size) * forward
    scored = math.ceil((n_val + n_test) / train.batch_size)
    scoring = scored * (choices * forward if choices else task.max_new_tokens * DECODE_STEP_S)
    return seeds * (training + losses + scoring)


def rows(paths: list[Path]):
    from qlsearch.study import load_study

    for path in paths:
        study = load_study(path)
        configurations = study.num_trials + len(study.baselines)
        share = study.resources.gpus_per_trial or 1.0  # a CPU study: its core counted as a GPU
        seconds = config_seconds(study)
        gpu_hours = configurations * seconds * share / 3600
        walls = []
        for gpus in GPUS:
            at_once = max(1, int(gpus / share))
            walls.append(math.ceil(configurations / at_once) * seconds / 3600)
        yield study, configurations, share, seconds, gpu_hours, walls


def _hours(h: float) -> str:
    return f"{h:,.0f} h" if h >= 10 else f"{h:.1f} h"


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from qlsearch.study import study_files

    folders = sorted(p for p in (ROOT / "studies").iterdir() if p.is_dir() and not p.name.endswith("-as-in-paper"))
    groups = [[p] for p in sorted((ROOT / "studies").glob("*.toml")) if "as-in-paper" not in p.name]
    groups += [study_files(folder) for folder in folders]
    print("| study | configurations x seeds | epochs | GPU per trial | GPU-h per trial | trials per GPU-h "
          "| GPU-hours | wall, 1 GPU | wall, 8 GPUs | wall, 64 GPUs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for files in groups:
        found = list(rows(files))
        study = found[0][0]
        label = files[0].parent.name + "/ (" + f"{len(files)} studies)" if len(files) > 1 else files[0].stem
        configurations = sum(r[1] for r in found)
        total = sum(r[4] for r in found)
        per_trial = total / configurations  # the family's mean
        walls = [sum(r[5][i] for r in found) for i in range(len(GPUS))]  # studies one after another
        device = f"{found[0][2]:g}" if study.resources.gpus_per_trial else "none (1 CPU core)"
        print(f"| {label} | {configurations} x {len(study.seeds)} | {study.train.epochs} | {device} | "
              f"{per_trial:.3g} | {1 / per_trial:.3g} | {total:,.0f} | "
              + " | ".join(_hours(w) for w in walls) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
