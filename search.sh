#!/usr/bin/env bash
# Sweep the ATP rate beta = STEP, 2*STEP, ... (one main.py run per trial) until main.py reports an illegal
# beta (exit code 3), then print the best. Stdout carries only the trial results and the final
# "Best LLM ppl = <ppl> when beta=<beta>" line; main.py's own output goes to stderr and/or the log directory.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: search.sh [options] [-- extra main.py flags]

Sweep beta = STEP, 2*STEP, ... with one main.py run per trial; stop at the first beta main.py rejects as
illegal (exit code 3); print each trial and finally "Best LLM ppl = <ppl> when beta=<beta>".

Options (environment variable in brackets):
  --model M            model name or path passed to main.py [MODEL]; not needed with --demo
  --prune_method P     wanda | sparsegpt | magnitude [METHOD] (default wanda)
  --sparsity_ratio S   target average sparsity [SPARSITY] (default 0.7)
  --step X             beta step [STEP] (default 0.002; 0.02 with --demo tiny, about 10 trials, 3-4 minutes
                       on a 2-core CPU)
  --max_trials N       stop after N trials, 0 = no limit [MAX_TRIALS] (default 0)
  --include_zero       also try beta=0 (uniform sparsity) first [INCLUDE_ZERO=1]
  --log_dir DIR        keep each trial's stdout/stderr and a summary.tsv in DIR [LOG_DIR]
  --quiet              do not stream main.py's stderr; on failure its tail is shown [QUIET=1]
  --demo [tiny|real]   pass --demo to main.py (tiny offline model, or SmolLM2: real) [DEMO=1, DEMO_KIND]
  -h, --help           show this help
  -- FLAGS...          pass FLAGS to every main.py run [EXTRA_ARGS, split on spaces]

Programs: PYTHON (default python) runs ATP_MAIN (default main.py next to this script).
Exit status: 0 after a sweep with a finite best; non-zero when a trial fails (any exit other than 0 or 3,
or no "wikitext perplexity" line), when the first beta is already illegal, or when no trial is finite.
EOF
}

die() { echo "search.sh: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
ATP_MAIN="${ATP_MAIN:-$here/main.py}"
MODEL="${MODEL:-}"
METHOD="${METHOD:-wanda}"
SPARSITY="${SPARSITY:-0.7}"
STEP="${STEP:-}"
MAX_TRIALS="${MAX_TRIALS:-0}"
INCLUDE_ZERO="${INCLUDE_ZERO:-0}"
LOG_DIR="${LOG_DIR:-}"
QUIET="${QUIET:-0}"
DEMO="${DEMO:-0}"
DEMO_KIND="${DEMO_KIND:-tiny}"
read -r -a extra <<< "${EXTRA_ARGS:-}"

# "--opt value" and "--opt=value" are both accepted.
while (($#)); do
    opt="$1"
    value=""
    has_inline=0
    if [[ "$opt" == --*=* ]]; then
        value="${opt#*=}"
        opt="${opt%%=*}"
        has_inline=1
    fi
    case "$opt" in
        -h | --help) usage; exit 0 ;;
        --include_zero) INCLUDE_ZERO=1; shift; continue ;;
        --quiet) QUIET=1; shift; continue ;;
        --demo)
            DEMO=1
            if [[ "${2:-}" == tiny || "${2:-}" == real ]]; then DEMO_KIND="$2"; shift; fi
            shift; continue ;;
        --) shift; extra+=("$@"); break ;;
        --model | --prune_method | --sparsity_ratio | --step | --max_trials | --log_dir)
            if ((has_inline)); then
                shift
            else
                (($# >= 2)) || die "$opt needs a value (see --help)"
                value="$2"
                shift 2
            fi
            case "$opt" in
                --model) MODEL="$value" ;;
                --prune_method) METHOD="$value" ;;
                --sparsity_ratio) SPARSITY="$value" ;;
                --step) STEP="$value" ;;
                --max_trials) MAX_TRIALS="$value" ;;
                --log_dir) LOG_DIR="$value" ;;
            esac
            ;;
        *) die "unknown option '$1' (see --help; main.py flags go after --)" ;;
    esac
done

if [[ -z "$STEP" ]]; then
    STEP=0.002
    [[ "$DEMO" == 1 && "$DEMO_KIND" == tiny ]] && STEP=0.02  # the 4-block demo's legal range is wide: 10 trials
fi

is_number() { awk -v x="$1" 'BEGIN { exit !(x ~ /^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$/) }'; }
is_number "$STEP" && awk -v x="$STEP" 'BEGIN { exit !(x + 0 > 0) }' || die "--step must be a positive number, got '$STEP'"
is_number "$SPARSITY" || die "--sparsity_ratio must be a number, got '$SPARSITY'"
[[ "$MAX_TRIALS" =~ ^[0-9]+$ ]] || die "--max_trials must be a non-negative integer, got '$MAX_TRIALS'"
[[ "$DEMO" == 1 || -n "$MODEL" ]] || die "give --model (or MODEL=...), or --demo for the tiny offline model"
[[ -f "$ATP_MAIN" ]] || die "main script not found: $ATP_MAIN (set ATP_MAIN)"

base_cmd=("$PYTHON" "$ATP_MAIN")
[[ -n "$MODEL" ]] && base_cmd+=(--model "$MODEL")
[[ "$DEMO" == 1 ]] && base_cmd+=(--demo "$DEMO_KIND")
base_cmd+=(--prune_method "$METHOD" --sparsity_ratio "$SPARSITY")

if [[ -n "$LOG_DIR" ]]; then
    mkdir -p "$LOG_DIR"
    work="$LOG_DIR"
    printf 'beta\tppl\tseconds\n' > "$work/summary.tsv"
else
    work="$(mktemp -d)"
    keep_work=0  # a failed trial's output is kept for the user to read
    trap '[[ "$keep_work" == 1 ]] || rm -rf "$work"' EXIT
fi

best_ppl=""
best_beta=""
trials=0
k=$([[ "$INCLUDE_ZERO" == 1 ]] && echo 0 || echo 1)
stop_reason="max_trials reached"
while :; do
    if ((MAX_TRIALS > 0 && trials >= MAX_TRIALS)); then
        break
    fi
    # k * step printed with 10 significant digits: 3 * 0.002 gives 0.006, not 0.006000000000000001.
    beta=$(awk -v k="$k" -v s="$STEP" 'BEGIN { printf "%.10g", k * s }')
    out="$work/beta_$beta.out"
    err="$work/beta_$beta.err"
    echo "search.sh: trial $((trials + 1)): beta=$beta" >&2
    start=$SECONDS
    rc=0
    if [[ "$QUIET" == 1 ]]; then
        "${base_cmd[@]}" --beta "$beta" "${extra[@]}" > "$out" 2> "$err" || rc=$?
    else
        # The illegal-beta line that ends every sweep is expected: keep it in the log, not on the console.
        "${base_cmd[@]}" --beta "$beta" "${extra[@]}" > "$out" \
            2> >(tee "$err" | grep -v --line-buffered '^error: --beta .* is illegal' >&2) || rc=$?
    fi
    seconds=$((SECONDS - start))

    if ((rc == 3)); then
        stop_reason="beta=$beta is above the largest legal beta for this model (the sweep's normal end)"
        break
    fi
    if ((rc != 0)); then
        [[ "$QUIET" == 1 ]] && tail -n 20 "$err" >&2
        keep_work=1
        echo "search.sh: trial beta=$beta failed with exit code $rc (its output is kept in $out and $err)" >&2
        exit "$rc"
    fi
    ppl=$(sed -n 's/^wikitext perplexity[[:space:]]\{1,\}\([^[:space:]]\{1,\}\).*$/\1/p' "$out" | tail -n 1)
    if [[ -z "$ppl" ]]; then
        [[ "$QUIET" == 1 ]] && tail -n 20 "$err" >&2
        keep_work=1
        echo "search.sh: trial beta=$beta printed no 'wikitext perplexity' line (output in $out)" >&2
        exit 1
    fi

    echo "beta=$beta ppl=$ppl"
    [[ -n "$LOG_DIR" ]] && printf '%s\t%s\t%s\n' "$beta" "$ppl" "$seconds" >> "$work/summary.tsv"
    # Non-finite perplexities (nan, inf) are reported but never become the best.
    if is_number "$ppl" && { [[ -z "$best_ppl" ]] || awk -v a="$ppl" -v b="$best_ppl" 'BEGIN { exit !(a + 0 < b + 0) }'; }; then
        best_ppl="$ppl"
        best_beta="$beta"
    fi
    trials=$((trials + 1))
    k=$((k + 1))
done

if ((trials == 0)); then
    reason=$(grep '^error: ' "$err" 2>/dev/null | tail -n 1 || true)
    if [[ "$reason" == "error: --beta "* ]]; then
        die "no trial ran: the first beta ($beta) is already illegal; use a smaller --step or --include_zero"
    fi
    die "no trial ran: main.py rejected the settings: ${reason#error: }"
fi
echo "search.sh: stopped after $trials trial(s): $stop_reason" >&2
[[ -n "$best_ppl" ]] || die "no trial gave a finite perplexity"
echo "Best LLM ppl = $best_ppl when beta=$best_beta"
