#!/usr/bin/env bash
# Runs the private-upload grid on MNIST with the MLP: the per-parameter
# budget epsilon/c in {0.01, 0.1, 1, 10, 100} against theta_u in {1, 0.1,
# 0.01}, plus the same federations without noise (threshold and largest
# selection) and one run with both baselines, then prints a Markdown table.
#
# Usage: scripts/privacy-table.sh DATA_DIR [OUTPUT_DIR]
#
# Every cell is a full simulation (a real server and 30 participant
# processes over gRPC on loopback) written to OUTPUT_DIR/<cell>/. A cell
# whose summary.json exists is not run again, so an interrupted grid
# resumes where it stopped. EPOCHS (default 60) and PARTICIPANTS (default
# 30) change the setting for every cell; DSSGD_PARTICIPANT_BIN picks the
# participant binary (its dssgd-server must sit next to it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || ! -d $1 ]]; then
    echo "usage: $0 DATA_DIR [OUTPUT_DIR]: DATA_DIR must be a folder with the MNIST files" >&2
    exit 2
fi
DATA_DIR=$1
OUT=${2:-runs/privacy}
EPOCHS=${EPOCHS:-60}
PARTICIPANTS=${PARTICIPANTS:-30}
BIN=${DSSGD_PARTICIPANT_BIN:-target/release/dssgd-participant}
if [[ ! -x $BIN ]]; then
    echo "$BIN is missing: run scripts/setup.sh first" >&2
    exit 2
fi
command -v jq > /dev/null || { echo "jq is required to build the table (apt-get install jq)" >&2; exit 2; }

mkdir -p "$OUT"
THETAS=(1 0.1 0.01)
BUDGETS=(0.01 0.1 1 10 100)

run_cell() {
    local name=$1
    shift
    local dir=$OUT/$name
    if [[ -f $dir/summary.json ]]; then
        echo "cell $name: done earlier, kept" >&2
        return
    fi
    echo "cell $name: running $*" >&2
    # A cell that did not finish leaves ledgers behind; a fresh simulated
    # federation starts from empty ones.
    rm -rf "$dir"
    "$BIN" simulate --data-dir "$DATA_DIR" --no-download --output "$dir" \
        --participants "$PARTICIPANTS" --epochs "$EPOCHS" --eval-every "$EPOCHS" "$@" \
        > "$dir.out" 2>&1 || { echo "cell $name failed: see $dir.out" >&2; return 1; }
    tail -n 12 "$dir.out" | grep -E "collaborative|privacy" >&2 || true
}

run_cell baselines --theta-u 0.1
for theta in "${THETAS[@]}"; do
    run_cell "plain-threshold-$theta" --skip-baselines --theta-u "$theta" --selection threshold
    run_cell "plain-largest-$theta" --skip-baselines --theta-u "$theta"
    for budget in "${BUDGETS[@]}"; do
        run_cell "private-$theta-$budget" --skip-baselines --theta-u "$theta" \
            --epsilon-per-parameter "$budget"
    done
done

accuracy() { jq -r '.global_accuracy | . * 10000 | round / 10000' "$OUT/$1/summary.json"; }
field() { jq -r "$2" "$OUT/$1/summary.json"; }

echo
echo "| theta_u | $(printf 'eps/c = %s | ' "${BUDGETS[@]}")no noise, threshold | no noise, largest |"
echo "|---|$(printf -- '---|%.0s' "${BUDGETS[@]}")---|---|"
for theta in "${THETAS[@]}"; do
    row="| $theta |"
    for budget in "${BUDGETS[@]}"; do
        row+=" $(accuracy "private-$theta-$budget") |"
    done
    row+=" $(accuracy "plain-threshold-$theta") | $(accuracy "plain-largest-$theta") |"
    echo "$row"
done
echo
echo "Standalone mean: $(field baselines '.standalone_mean | . * 10000 | round / 10000');" \
    "centralized: $(field baselines '.centralized | . * 10000 | round / 10000')."
echo
echo "| theta_u | c | $(printf 'eps/c = %s | ' "${BUDGETS[@]}")"
echo "|---|---|$(printf -- '---|%.0s' "${BUDGETS[@]}")"
for theta in "${THETAS[@]}"; do
    c=$(field "private-$theta-${BUDGETS[0]}" '.privacy.c')
    row="| $theta | $c |"
    for budget in "${BUDGETS[@]}"; do
        per_epoch=$(field "private-$theta-$budget" '.privacy.epsilon_per_epoch * 100 | round / 100')
        total=$(field "private-$theta-$budget" '.privacy.run_epsilon_max * 100 | round / 100')
        row+=" $per_epoch per epoch, $total in total |"
    done
    echo "$row"
done
