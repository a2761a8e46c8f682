#!/usr/bin/env bash
# The GPU check: one command on a machine with a CUDA GPU that runs the CUDA tests and measures pruning speed and
# memory on LLaMA-2 shapes (side by side with the reference implementation when a checkout of it is there), the
# 13B shape offloaded, a beta search, and torch's 2:4 semi-structured Linears against dense ones. Everything it
# measures goes, as JSON, into $OUT/gpu_check.json (or ./gpu_check_out without $OUT), rewritten after every step,
# with the full log beside it in gpu_check.log. Each step runs under a time limit inside a total budget.
set -uo pipefail

usage() {
    cat <<'EOF'
Usage: bash scripts/gpu_check.sh [--dry-run] [--budget SECONDS] [--only STEP,STEP...] [-h|--help]

Steps, in order, with their time limits on a GPU (a step gets less when the total budget runs short, and is
skipped, recorded as such, when under a minute would be left for it):
  env                 GPU, driver, torch/transformers/CUDA versions, packages, reference checkout    (30 s)
  tests               python -m pytest tests/cuda (every CUDA test: pipeline fp16/bf16 x pruners and
                      allocations, --offload, --device_map auto, save/reload, compressed checkpoint,
                      zero-shot, CUDA vs CPU Wanda, 2:4 semi-structured Linears)               (100 s)
  speedup             bench_speedup.py --gpu: 2:4 semi-structured vs dense fp16/bf16 on the
                      LLaMA-2-7B block, 1 to 2048 tokens per call                               (60 s)
  prune_7b_wanda      bench_prune.py llama2-7b (32 blocks), Wanda, 128 x 2048 calibration, 64
                      eval windows, peak memory; the reference's Wanda and eval side by side      (120 s)
  prune_7b_sparsegpt  bench_prune.py llama2-7b widths, 4 blocks, SparseGPT, 128 x 2048, side by
                      side with the reference's SparseGPT (its 7B run takes ~340 s on an H100)    (110 s)
  prune_13b_offload   bench_prune.py llama2-13b --offload, Wanda, 128 x 2048: peak GPU memory     (90 s)
  search_7b           bench_prune.py llama2-7b --beta_search (golden, Wanda, 16 x 2048)          (75 s)
The total budget defaults to 450 s (GPU_CHECK_BUDGET_S), under the 8 minutes the check is sized for.

--dry-run runs the same steps with what needs no GPU: tiny shapes on the CPU (the reference adapter too, when
the checkout is there), the CUDA tests collected and skipped, the 2:4 rule checks; and it hides the packages the
GPU machine lacks (datasets, lm_eval) from Python, so a stray import shows up here first.

Environment:
  OUT                 output folder (default: ./gpu_check_out, from the folder the script is started in)
  ATP_REFERENCE_DIR   checkout of github.com/wzhuang-xmu/ATP (default: .reference/ATP, git-ignored); when it
                      is missing the JSON says "reference: not available" and only our figures are taken
  GPU_CHECK_WHEELS    folder of wheels to install first with pip --no-index --target (default: .whl), for
                      packages the GPU machine lacks (lm_eval and its dependencies for the zero-shot test)
  GPU_CHECK_BUDGET_S  total seconds for all steps (default 450)
  GPU_CHECK_COMMIT    this repository's commit, recorded when the tree has no .git
  PYTHON              interpreter (default: python3)
EOF
}

DRY_RUN=0
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --budget) shift; BUDGET_S=${1:?--budget needs seconds} ;;
        --only) shift; ONLY=${1:?--only needs step names} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$BUDGET_S" in ''|*[!0-9]*) echo "error: --budget must be whole seconds, got $BUDGET_S" >&2; exit 2 ;; esac

OUT_DIR=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
REF_DIR=${ATP_REFERENCE_DIR:-$REPO/.reference/ATP}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT   # every step's JSON ends up in $OUT/gpu_check.json
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/gpu_check.json"
STEPS_TSV="$WORK/steps.tsv"
: >"$LOG"
: >"$STEPS_TSV"
exec > >(tee -a "$LOG") 2>&1

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export ATP_SPARSE_KERNEL=off   # the CPU kernel is not measured here; never spend a minute compiling it
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check $(printf '%4d' "$(elapsed)") s] $*"; }

if [ "$DRY_RUN" = 1 ]; then
    # What the GPU machine lacks, hidden here: an import of these outside a lazy path fails in the dry run too.
    mkdir -p "$WORK/hide"
    cat >"$WORK/hide/sitecustomize.py" <<'PYEOF'
import sys

# `import datasets` then fails as on a machine without it, and importlib.util.find_spec returns None for it.
for name in ("datasets", "lm_eval"):
    sys.modules[name] = None
PYEOF
    export PYTHONPATH="$WORK/hide${PYTHONPATH:+:$PYTHONPATH}"
fi

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHEELS"/*.whl; then
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        say "wheel installation failed; continuing without them"
    fi
fi

REFERENCE_ARGS=()
if [ -f "$REF_DIR/lib/prune.py" ]; then
    REFERENCE_ARGS=(--reference "$REF_DIR")
else
    echo "[gpu_check] reference: not available (no $REF_DIR/lib/prune.py; set ATP_REFERENCE_DIR)"
fi

# summarize: merge every finished step's JSON into $SUMMARY (run after each step, so a kill keeps what was done)
summarize() {
    "$PY" - "$SUMMARY" "$STEPS_TSV" "$DRY_RUN" "$BUDGET_S" "$(elapsed)" "$REF_DIR" <<'PYEOF'
import json
import os
import sys

summary_path, steps_tsv, dry_run, budget, elapsed, ref_dir = sys.argv[1:7]
steps = {}
with open(steps_tsv, encoding="utf-8") as f:
    for line in f:
        name, status, seconds, limit, path = line.rstrip("\n").split("\t")
        step = {"status": status, "seconds": int(seconds), "limit_s": int(limit)}
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as g:
                    step["result"] = json.load(g)
            except ValueError as error:
                step["result_error"] = f"unreadable JSON: {error}"
        steps[name] = step


def result(name):
    return steps.get(name, {}).get("result") or {}


def target(value, limit, better, why_missing):
    if value is None:
        return {"value": None, "target": f"{better} {limit}", "met": None, "why": why_missing}
    if dry_run == "1":
        return {"value": value, "target": f"{better} {limit}", "met": None,
                "why": "dry run: tiny shapes on the CPU, not the target's setting"}
    met = value <= limit if better == "at most" else value >= limit
    return {"value": value, "target": f"{better} {limit}", "met": met}


wanda = result("prune_7b_wanda").get("reference_implementation") or {}
sgpt = result("prune_7b_sparsegpt").get("reference_implementation") or {}
offload = result("prune_13b_offload")
peaks = [offload.get("methods", {}).get("wanda", {}).get(k) for k in ("peak_gib_prune", "peak_gib_eval")]
peaks = [p for p in peaks if p is not None]
speed = result("speedup").get("target_check") or {}
no_ref = "reference: not available" if not wanda.get("status") else f"reference: {wanda.get('status')}"
targets = {
    "wanda_7b_prune_over_reference": target(wanda.get("ours_over_reference", {}).get("wanda_prune"), 0.6,
                                            "at most", no_ref),
    "sparsegpt_7b_prune_over_reference": target(sgpt.get("ours_over_reference", {}).get("sparsegpt_prune"), 0.2,
                                                "at most", no_ref),
    "offload_13b_peak_gib": target(max(peaks) if peaks else None, 6.0, "at most", "no CUDA peak measured"),
    "semi_structured_prefill_2048_bf16_speedup": target(speed.get("speedup"), 1.3, "at least",
                                                        "no GPU speedup measured"),
}
env = result("env")
record = {
    "check": "scripts/gpu_check.sh", "dry_run": dry_run == "1", "budget_s": int(budget), "elapsed_s": int(elapsed),
    "reference": (f"available: {ref_dir}" if os.path.isfile(os.path.join(ref_dir, "lib", "prune.py"))
                  else "not available"),
    "environment": env, "targets": targets, "steps": steps,
}
tmp = summary_path + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
os.replace(tmp, summary_path)
PYEOF
}

# run_step NAME LIMIT_S JSON_PATH COMMAND...: run under the limit (shrunk to what the budget has left), record it
run_step() {
    local name=$1 limit=$2 json=$3
    shift 3
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        return 0
    fi
    local left=$(( BUDGET_S - $(elapsed) ))
    if [ "$left" -lt 60 ] && [ "$name" != env ]; then
        say "SKIP $name: only ${left} s of the ${BUDGET_S} s budget left"
        printf '%s\tskipped: out of time (%s s left)\t0\t%s\t\n' "$name" "$left" "$limit" >>"$STEPS_TSV"
        summarize
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "== $name (limit ${limit} s) =="
    local t0 rc status
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@"
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit} s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    say "$name: $status in $(( $(date +%s) - t0 )) s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" "$json" >>"$STEPS_TSV"
    summarize
}

# ---------------------------------------------------------------- the steps
env_step() {
    "$PY" - "$WORK/env.json" "$REF_DIR" "$DRY_RUN" <<'PYEOF'
import importlib.util
import json
import os
import platform
import subprocess
import sys

out, ref_dir, dry = sys.argv[1:4]
import torch
import transformers

env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
       "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
       "packages": {m: importlib.util.find_spec(m) is not None for m in ("datasets", "lm_eval", "accelerate")}}

try:
    env["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
except (AttributeError, RuntimeError):
    env["cusparselt"] = None
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 2),
               compute_capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,temperature.gpu",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
except (OSError, subprocess.SubprocessError) as error:
    env["nvidia_smi"] = f"unavailable: {error}"
commit = os.environ.get("GPU_CHECK_COMMIT")
if not commit:
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = git.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
env["repo_commit"] = commit
ref = {"directory": ref_dir, "available": os.path.isfile(os.path.join(ref_dir, "lib", "prune.py"))}
if ref["available"] and os.path.isfile(os.path.join(ref_dir, "COMMIT")):
    ref["commit"] = open(os.path.join(ref_dir, "COMMIT"), encoding="utf-8").read().strip()
env["reference"] = ref if ref["available"] else "not available"
with open(out, "w", encoding="utf-8") as f:
    json.dump(env, f, indent=1)
print(json.dumps(env))
PYEOF
}

tests_step() {
    local status
    "$PY" -m pytest tests/cuda -q -rs -p no:cacheprovider --junitxml="$WORK/junit.xml"
    status=$?
    "$PY" - "$WORK/junit.xml" "$WORK/tests.json" "$status" <<'PYEOF'
import json
import sys
import xml.etree.ElementTree as ET

junit, out, status = sys.argv[1:4]
cases, counts, skips = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}, {}
try:
    root = ET.parse(junit).getroot()
except (OSError, ET.ParseError) as error:
    root = None
    counts["junit"] = f"unreadable: {error}"
for case in (root.iter("testcase") if root is not None else []):
    outcome, message = "passed", None
    for kind in ("failure", "error", "skipped"):
        node = case.find(kind)
        if node is not None:
            outcome = {"failure": "failed"}.get(kind, kind)
            message = (node.get("message") or node.text or "")[:600]
            break
    counts[outcome] += 1
    if outcome == "skipped":
        skips[message] = skips.get(message, 0) + 1
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                  "seconds": float(case.get("time") or 0), **({"message": message} if message else {})})
record = {"exit_status": int(status), "counts": counts, "skip_reasons": skips,
          "slowest": sorted(cases, key=lambda c: -c["seconds"])[:10],
          "not_passed": [c for c in cases if c["outcome"] in ("failed", "error")], "cases": cases}
with open(out, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
print(f"tests: {counts}")
PYEOF
    return $status
}

# bench_prune.py prints its JSON record on stdout too; the file (--json_out) is what is kept, the progress lines
# (stderr) go to the log
bench_prune() { "$PY" scripts/bench_prune.py "$@" >/dev/null; }
# the shell-function steps run under `timeout` through bash -c
export -f env_step tests_step bench_prune
export PY WORK REF_DIR DRY_RUN
BP=(bash -c 'bench_prune "$@"' bench_prune)
REF=(${REFERENCE_ARGS[@]+"${REFERENCE_ARGS[@]}"})
if [ "$DRY_RUN" = 1 ]; then
    say "dry run: tiny shapes on the CPU, CUDA tests skipped, packages the GPU lacks hidden ($OUT_DIR)"
    SMALL=(--shape tiny --device cpu --nsamples 8 --seqlen 64 --eval_windows 4 --calib_batch_size 4)
    run_step env 60 "$WORK/env.json" bash -c env_step
    run_step tests 300 "$WORK/tests.json" bash -c tests_step
    run_step speedup 120 "$WORK/speedup.json" "$PY" scripts/bench_speedup.py --gpu --dry-run --shapes small \
        --out "$WORK" --json_name speedup.json
    run_step prune_7b_wanda 120 "$WORK/prune_7b_wanda.json" "${BP[@]}" "${SMALL[@]}" --methods wanda \
        ${REF[@]+"${REF[@]}"} --json_out "$WORK/prune_7b_wanda.json"
    run_step prune_7b_sparsegpt 120 "$WORK/prune_7b_sparsegpt.json" "${BP[@]}" "${SMALL[@]}" --methods sparsegpt \
        ${REF[@]+"${REF[@]}"} --json_out "$WORK/prune_7b_sparsegpt.json"
    run_step prune_13b_offload 120 "$WORK/prune_13b_offload.json" "${BP[@]}" "${SMALL[@]}" --offload \
        --methods wanda --json_out "$WORK/prune_13b_offload.json"
    run_step search_7b 120 "$WORK/search_7b.json" "${BP[@]}" "${SMALL[@]}" --methods wanda --beta_search \
        --search_only --search_step 0.05 --search_eval_windows 2 --json_out "$WORK/search_7b.json"
else
    say "GPU check, budget ${BUDGET_S} s, output in $OUT_DIR, reference: ${REF[*]+${REF[*]}}"
    CALIB=(--nsamples 128 --seqlen 2048)
    run_step env 30 "$WORK/env.json" bash -c env_step
    run_step tests 100 "$WORK/tests.json" bash -c tests_step
    run_step speedup 60 "$WORK/speedup.json" "$PY" scripts/bench_speedup.py --gpu --out "$WORK" \
        --json_name speedup.json
    run_step prune_7b_wanda 120 "$WORK/prune_7b_wanda.json" "${BP[@]}" --shape llama2-7b --methods wanda \
        "${CALIB[@]}" --eval_windows 64 ${REF[@]+"${REF[@]}"} --json_out "$WORK/prune_7b_wanda.json"
    run_step prune_7b_sparsegpt 110 "$WORK/prune_7b_sparsegpt.json" "${BP[@]}" --shape llama2-7b --num_layers 4 \
        --methods sparsegpt "${CALIB[@]}" --eval_windows 16 ${REF[@]+"${REF[@]}"} \
        --json_out "$WORK/prune_7b_sparsegpt.json"
    run_step prune_13b_offload 90 "$WORK/prune_13b_offload.json" "${BP[@]}" --shape llama2-13b --offload \
        --methods wanda "${CALIB[@]}" --eval_windows 4 --json_out "$WORK/prune_13b_offload.json"
    run_step search_7b 75 "$WORK/search_7b.json" "${BP[@]}" --shape llama2-7b --methods wanda --nsamples 16 \
        --seqlen 2048 --eval_windows 8 --beta_search --search_only --search_step 0.004 --search_eval_windows 4 \
        --json_out "$WORK/search_7b.json"
fi

summarize
say "done in $(elapsed) s; summary in $SUMMARY"
"$PY" - "$SUMMARY" <<'PYEOF'
import json
import sys

record = json.load(open(sys.argv[1], encoding="utf-8"))
print(f"{'step':<20} {'status':<28} {'seconds':>7}")
for name, step in record["steps"].items():
    print(f"{name:<20} {step['status'][:28]:<28} {step['seconds']:>7}")
print(f"reference: {record['reference']}")
for name, t in record["targets"].items():
    value = "-" if t["value"] is None else f"{t['value']:.3f}"
    verdict = {True: "met", False: "NOT met", None: t.get("why", "")}[t["met"]]
    print(f"target {name:<44} {value:>8}  ({t['target']}) {verdict}")
PYEOF
