#!/bin/bash
# The compose federation's reporter (installed as dssgd-report in the
# participant image). It waits until DSSGD_PARTICIPANTS participants have
# written their metrics to the runs volume, evaluates the final global model
# on the server, trains the centralized baseline, then prints a summary in
# the layout of `dssgd-participant simulate` and writes it as JSON.
#
# Environment: the participants' settings (DSSGD_PARTICIPANTS, DSSGD_SERVER,
# DSSGD_MODEL, DSSGD_DATA_DIR and the training settings, which the
# centralized baseline reuses), and
#   DSSGD_RUNS_DIR                 runs volume (default /runs); metrics are
#                                  read from metrics/, results go to report/
#   DSSGD_REPORT_TIMEOUT_SECONDS   maximum wait for the participants
#                                  (default 3600)
#   DSSGD_REPORT_CENTRALIZED       train the centralized baseline (default
#                                  true; false prints "skipped")
#
# Only metrics files written after the reporter started count, so files left
# in the volume by an earlier run are ignored.
set -euo pipefail

RUNS=${DSSGD_RUNS_DIR:-/runs}
METRICS=$RUNS/metrics
REPORT=$RUNS/report
PARTICIPANTS=${DSSGD_PARTICIPANTS:-30}
TIMEOUT=${DSSGD_REPORT_TIMEOUT_SECONDS:-3600}
CENTRALIZED=${DSSGD_REPORT_CENTRALIZED:-true}

log() {
    echo "dssgd-report: $*" >&2
}

started=$(date +%s)
marker=$(mktemp)
mkdir -p "$METRICS" "$REPORT"

# Prints the metrics files written since the reporter started.
fresh_metrics() {
    find "$METRICS" -maxdepth 1 -name '*.json' -newer "$marker" | sort
}

log "waiting for $PARTICIPANTS participants to write their metrics to $METRICS"
reported=-1
while :; do
    count=$(fresh_metrics | wc -l)
    if ((count >= PARTICIPANTS)); then
        break
    fi
    if ((count != reported)); then
        log "$count of $PARTICIPANTS participants finished"
        reported=$count
    fi
    if (($(date +%s) - started > TIMEOUT)); then
        log "timed out after $TIMEOUT s with $count of $PARTICIPANTS participants finished;" \
            "see the participants' logs (docker-compose logs participant)"
        exit 1
    fi
    sleep 2
done
mapfile -t files < <(fresh_metrics)
log "all $PARTICIPANTS participants finished: ${files[*]##*/}"

dssgd-participant evaluate --metrics "$REPORT/global.json"
if [[ $CENTRALIZED == true ]]; then
    dssgd-participant centralized --metrics "$REPORT/centralized.json"
else
    rm -f "$REPORT/centralized.json"
fi

jq -s \
    --slurpfile global "$REPORT/global.json" \
    --argjson centralized "$(jq '.final_accuracy' "$REPORT/centralized.json" 2>/dev/null || echo null)" \
    --argjson wall "$(($(date +%s) - started))" '
    def mean: if length == 0 then null else add / length end;
    (map(.final_accuracy)) as $finals
    | (map(.standalone_accuracy)) as $alone
    | {
        participants: length,
        model: .[0].model,
        ordering: (env.DSSGD_ORDERING // "asynchronous"),
        theta_u: .[0].config.sharing.theta_u,
        theta_d: .[0].config.sharing.theta_d,
        epochs: .[0].config.training.epochs,
        global_accuracy: $global[0].accuracy,
        global_version: $global[0].version,
        collaborative_mean: ($finals | mean),
        collaborative_min: ($finals | min),
        collaborative_max: ($finals | max),
        standalone_mean: (if any($alone[]; . == null) then null else ($alone | mean) end),
        centralized: $centralized,
        bytes_sent: (map(.bytes_sent) | add),
        bytes_received: (map(.bytes_received) | add),
        stopped_early: [.[] | select(.stopped_early != null)
                        | "\(.participant): \(.stopped_early)"],
        wall_seconds: $wall,
        participant_metrics: [.[] | {participant, final_accuracy, standalone_accuracy,
                                     epochs: (.epochs | length)}]
      }' "${files[@]}" >"$REPORT/summary.json.tmp"
mv "$REPORT/summary.json.tmp" "$REPORT/summary.json"

# Prints a number with four decimals, or "skipped" for a missing value.
decimal() {
    if [[ $1 == null ]]; then echo skipped; else printf '%.4f' "$1"; fi
}
summary=$REPORT/summary.json
field() {
    jq -r ".$1" "$summary"
}
echo
echo "$(field participants) participants, $(field model), $(field ordering) ordering," \
    "theta_u $(field theta_u), theta_d $(field theta_d), $(field epochs) epochs ($(field wall_seconds) s)"
echo "  collaborative (final global model)   $(decimal "$(field global_accuracy)")  (version $(field global_version))"
echo "  participants at their finish (mean)  $(decimal "$(field collaborative_mean)")" \
    " [min $(decimal "$(field collaborative_min)"), max $(decimal "$(field collaborative_max)")]"
echo "  standalone (mean of participants)    $(decimal "$(field standalone_mean)")"
echo "  centralized (union of the shards)    $(decimal "$(field centralized)")"
printf '  traffic: %.1f MB sent, %.1f MB received by all participants\n' \
    "$(jq -r '.bytes_sent / 1e6' "$summary")" "$(jq -r '.bytes_received / 1e6' "$summary")"
jq -r '.stopped_early[] | "  stopped early: \(.)"' "$summary"
log "summary written to $summary"
