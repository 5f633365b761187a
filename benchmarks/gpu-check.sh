#!/usr/bin/env bash
# The GPU check: what a short loan of one GPU machine must show, in at most 6 minutes on one GPU.
#
#   1. the real-shape profile: the Qwen2.5-0.5B config (random weights), every registered method,
#      every phase (forward, decode, training step, FLOPs, peak memory), bf16, batch 1 x 128;
#   2. one trial on the GPU (synthetic Levy task, deep MLP, queryable adapter);
#   3. a sweep of 4 trials through Ray Tune at 0.25 GPU per trial (the four share the GPU).
#
# It writes into OUT (default benchmarks/results/gpu-check/): profile-<tag>.json/.md, trial.json
# (the trial's record), sweep-status.json (the study after the sweep) and gpu-check.log; it exits
# non-zero when a step fails or a result is missing.
#
#   benchmarks/gpu-check.sh [--out DIR]            on the GPU machine, from the repository root
#   benchmarks/gpu-check.sh --dry-run [--out DIR]  the same steps on CPU at toy sizes (CI runs it)
#   benchmarks/gpu-check.sh --targets [--dry-run] [--out DIR]
#                                                  instead, what the check leaves out (a second
#                                                  call, up to 10 minutes): at batch 8 x 512, the
#                                                  forward, training step and peak memory of LoRA and
#                                                  queryable, then their forward compiled (with the
#                                                  seconds compiling takes); targets-*.json/.md
#   benchmarks/gpu-check.sh --wheels [DIR]         on a machine with a package index: the wheels
#                                                  the GPU machine lacks, into DIR (default .whl)
#
# A borrowed GPU machine starts bare: its own torch (2.11 when last seen), transformers, peft,
# safetensors, pandas and matplotlib, but no optuna, ray (nor the pydantic that Ray Tune imports) or
# datasets, and no package index.
# What is missing travels along as wheels: `--wheels` downloads, for CPython 3.12 on manylinux
# x86-64 and at the versions installed here, exactly the packages listed in MISSING below (never
# torch: the machine's own CUDA build stays). On the GPU machine, when qlsearch's dependencies do
# not import, the script installs every wheel under WHEELS (default .whl) with
# `pip install --no-index --no-deps --target /tmp/site` and puts /tmp/site on PYTHONPATH.
# Ray's wheel (79 MB for ray 2.60) is larger than the 64 MiB a device call may carry, so
# `--wheels` splits wheels over 30 MB into DIR/<wheel>.part-* files; carry those in two calls
# (one to land the first parts, the machine staying warm), and this script joins them first.
set -euo pipefail
cd "$(dirname "$0")/.."

MISSING="optuna alembic sqlalchemy mako colorlog greenlet ray jsonschema jsonschema-specifications
referencing rpds-py tensorboardx datasets dill multiprocess pydantic pydantic-core annotated-types
typing-inspection typing-extensions"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
DRY=0
TARGETS=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --targets) TARGETS=1 ;;
        --out) OUT="$2"; shift ;;
        --wheels)
            dir="${2:-.whl}"
            mkdir -p "$dir"
            pins=$("$PYTHON" -m pip list --format=freeze 2>/dev/null | tr 'A-Z_' 'a-z-' |
                   grep -E "^($(echo $MISSING | tr ' ' '|'))==" || true)
            # shellcheck disable=SC2086
            "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 --platform any -d "$dir" $pins
            for whl in "$dir"/*.whl; do
                if [ "$(stat -c %s "$whl")" -gt 31457280 ]; then
                    split -b 30M "$whl" "$whl.part-" && rm "$whl"
                fi
            done
            ls -la "$dir"
            exit 0 ;;
        -h|--help) sed -n 2,30p "$0"; exit 0 ;;
        *) echo "gpu-check.sh: unknown argument $1; allowed: --dry-run, --targets, --out DIR, --wheels [DIR]" >&2
           exit 2 ;;
    esac
    shift
done

OUT="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/gpu-check.log"
: >"$LOG"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "[gpu-check $(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

# ---- what this machine lacks, from the carried wheels ---------------------------------------
NEEDED="optuna, ray.tune, datasets, transformers, peft"
[ "$TARGETS" = 1 ] && NEEDED="transformers, peft"  # --targets only profiles: no Optuna, Ray or datasets
if ! "$PYTHON" -c "import $NEEDED" 2>/dev/null; then
    [ -d "$WHEELS" ] || { say "qlsearch's dependencies do not import and there is no $WHEELS/: run --wheels where pip works and carry it"; exit 1; }
    for first in "$WHEELS"/*.part-aa; do
        [ -e "$first" ] || continue
        whl="${first%.part-aa}"
        cat "$whl".part-* >"$whl" && rm "$whl".part-*
    done
    say "installing the carried wheels from $WHEELS into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
qlsearch() { "$PYTHON" -m qlsearch.cli "$@"; }

# ---- sizes: the real ones on the GPU, toy ones for the dry run ------------------------------
if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    MODEL="$WORK/toy-qwen2"
    "$PYTHON" - "$MODEL" <<'EOF'
import sys
from transformers import Qwen2Config
# widths divisible by VB-LoRA's vector length (64)
Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2).save_pretrained(sys.argv[1])
EOF
    PROFILE_SIZE=(--batch 1 --seq 8 --new-tokens 3 --repeats 1 --warmup 1 --threads 1)
    TARGET_SIZE=(--batch 2 --seq 16 --repeats 1 --threads 1)
    EPOCHS=1 PRETRAIN_EPOCHS=1 SWEEP_CONCURRENT=2 TAG=dry-run
    # the same 0.25-GPU study on CPU: without a GPU it is refused unless it allows the fallback
    CPU_FALLBACK="cpu_fallback = true"
else
    DEVICE=cuda
    MODEL=benchmarks/configs/qwen2.5-0.5b
    PROFILE_SIZE=(--batch 1 --seq 128 --new-tokens 16 --repeats 8 --warmup 2)
    TARGET_SIZE=(--batch 8 --seq 512 --repeats 8)
    EPOCHS=20 PRETRAIN_EPOCHS=60 SWEEP_CONCURRENT=4 TAG="" CPU_FALLBACK=""
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'" 2>>"$LOG" ||
        { say "no GPU visible to torch $("$PYTHON" -c 'import torch; print(torch.__version__)'); use --dry-run on CPU"; exit 1; }
fi
METHODS=$("$PYTHON" -c "from qlsearch.adapters import list_methods; print(','.join(m.name for m in list_methods()))")
say "torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), device $DEVICE, methods $METHODS"

# ---- --targets: batch 8 x 512 eager (memory), then compiled --------------------------------
if [ "$TARGETS" = 1 ]; then
    say "targets 1/2: batch 8 x 512 (toy: 2 x 16), eager: forward, training step, kernels, peak memory"
    qlsearch profile --model "$MODEL" --methods lora,queryable,instr-queryable --device "$DEVICE" \
        --dtype bfloat16 "${TARGET_SIZE[@]}" --warmup 2 --skip decode --out "$WORK/targets" \
        --tag "targets-eager${TAG:+-$TAG}" 2>>"$LOG" | tee -a "$LOG"
    say "targets 2/2: the same forward compiled (warm-up 2: the first call compiles, timed apart)"
    qlsearch profile --model "$MODEL" --methods lora,queryable --device "$DEVICE" --dtype bfloat16 \
        "${TARGET_SIZE[@]}" --warmup 2 --compile --skip decode,train,flops --out "$WORK/targets" \
        --tag "targets-compiled${TAG:+-$TAG}" 2>>"$LOG" | tee -a "$LOG"
    cp "$WORK"/targets/* "$OUT/"
    "$PYTHON" - "$OUT" "$DEVICE" "$TAG" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
out, device, tag = sys.argv[1:]
suffix = f"-{tag}" if tag else ""
eager = json.load(open(f"{out}/targets-eager{suffix}.json"))["methods"]
compiled = json.load(open(f"{out}/targets-compiled{suffix}.json"))["methods"]
for name in ("queryable", "instr-queryable"):
    row = eager[name]
    memory = row["peak_memory_ratio"]
    assert memory is not None or device != "cuda", f"targets: {name} has no peak memory"
    print(f"eager {name:16s} forward x LoRA {row['forward_ratio']:.3f} (<= 1.00)  train x LoRA "
          f"{row['train_ratio']:.3f} (<= 1.05)  peak memory x LoRA {memory or float('nan'):.3f}  "
          f"(kernels x LoRA: forward {row['kernels_ratio']:.3f}, train {row['train_kernels_ratio']:.3f})")
for name in ("frozen", "lora", "queryable"):
    row = compiled[name]
    assert row["forward_compile_s"], f"targets: {name} has no compile time"
    print(f"compiled {name:10s} forward over the compiled frozen model {100 * (row['forward_ratio_frozen'] - 1):+.1f} % "
          f"(queryable: <= +25 %)  compiling {row['forward_compile_s']:.1f} s (<= 60 s)")
print(f"gpu-check --targets ({device}): both profiles completed")
EOF
    say "done: results in $OUT"
    exit 0
fi

# ---- 1. the profile: every method, every phase, bf16 ----------------------------------------
say "1/3 profile $MODEL"
qlsearch profile --model "$MODEL" --methods "$METHODS" --device "$DEVICE" --dtype bfloat16 \
    "${PROFILE_SIZE[@]}" --out "$WORK/profile" ${TAG:+--tag "$TAG"} 2>>"$LOG" | tee -a "$LOG"
for f in "$WORK"/profile/*; do cp "$f" "$OUT/profile-$(basename "$f")"; done

# ---- 2. one trial ---------------------------------------------------------------------------
# the trial's and the sweep's task and training (TOML tables, last in each file)
TASK_AND_TRAIN="[task]
kind = \"synthetic\"
name = \"levy\"
backbone = \"mlp\"
[train]
epochs = $EPOCHS
pretrain_epochs = $PRETRAIN_EPOCHS
lr = 5e-3"
cat >"$WORK/trial.toml" <<EOF
method = "queryable"
knobs = {r = 8, num_atoms = 8, top_k = 2, num_blocks = 4, d_k = 16}
device = "$DEVICE"
cache_dir = "$WORK/cache"
$TASK_AND_TRAIN
EOF
say "2/3 trial on $DEVICE"
qlsearch trial "$WORK/trial.toml" --out "$OUT/trial.json" 2>>"$LOG" | tee -a "$LOG"

# ---- 3. a sweep of 4 trials at 0.25 GPU each ------------------------------------------------
cat >"$WORK/gpu-check.toml" <<EOF
name = "gpu-check"
seeds = [0]
num_trials = 4
sampler = "random"
objectives = ["val_mse", "forward_ms", "trainable_params"]
[resources]
cpus_per_trial = 1
gpus_per_trial = 0.25
max_concurrent = $SWEEP_CONCURRENT
$CPU_FALLBACK
[space.queryable]
r = [4, 8]
num_atoms = [4, 8]
top_k = [1, 2]
num_blocks = 4
d_k = 16
$TASK_AND_TRAIN
EOF
say "3/3 sweep: 4 trials at 0.25 GPU each"
qlsearch sweep "$WORK/gpu-check.toml" --root "$WORK/runs" --quiet 2>>"$LOG" | tee -a "$LOG"
qlsearch status gpu-check --root "$WORK/runs" --json >"$OUT/sweep-status.json" 2>>"$LOG"

# ---- every result is there and says what it should ------------------------------------------
"$PYTHON" - "$OUT" "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, sys
out, device = sys.argv[1:]
(profile_path,) = glob.glob(f"{out}/profile-*.json")
profile = json.load(open(profile_path))
rows = profile["methods"]
# prefill_ms: the decode phase ran; its tokens/s can be null at toy sizes (t(N) - t(1) <= 0 in noise)
phases = ("forward_ms", "prefill_ms", "train_step_ms", "flops", "kernels") + (("decode_tokens_per_s",) if device == "cuda" else ())
for name, row in rows.items():
    # nothing to train in the frozen model or the merged LoRA row: no training step there
    missing = [p for p in phases if row[p] is None and not (p == "train_step_ms" and not row["trainable_params"])]
    assert not missing, f"profile: {name} has no {missing}"
    if device == "cuda":
        assert row["peak_memory_bytes"], f"profile: {name} has no peak memory"
    print(f"{name:16s} forward x LoRA {row['forward_ratio']:.3f}  x frozen {row['forward_ratio_frozen']:.3f}  "
          f"decode x frozen {row['decode_ratio_frozen'] or float('nan'):.3f}  train x LoRA {row['train_ratio'] or float('nan'):.3f}  "
          f"(kernels x LoRA: forward {row['kernels_ratio']:.3f}, train {row['train_kernels_ratio'] or float('nan'):.3f})")
trial = json.load(open(f"{out}/trial.json"))
assert trial["status"] == "completed", f"trial: {trial['status']}: {trial.get('failure')}"
if device == "cuda":
    assert trial["profile"]["peak_memory_source"].startswith("torch.cuda"), "trial: did not run on the GPU"
status = json.load(open(f"{out}/sweep-status.json"))
states = [t["state"] for t in status["trials"]]
assert states.count("COMPLETE") == 4, f"sweep: trial states {states}"
print(f"gpu-check ({device}): profile of {len(rows)} models, 1 trial, 4 sweep trials: all completed")
EOF
say "done: results in $OUT"
