#!/bin/bash
# Entry point of the participant image.
#
#   collaborate [FLAGS]  train as one participant (the default command)
#   report               wait for the participants, then print the summary
#   any other arguments  passed to dssgd-participant unchanged
#
# A participant's index selects its shard and its default identifier
# (p000, p001, ...). It comes from DSSGD_INDEX when that is set. Otherwise
# the index is the replica number of the container minus one. Docker's
# embedded DNS server names a container on a user-defined network after the
# container. Compose names replicas PROJECT_SERVICE_N (Compose v1) or
# PROJECT-SERVICE-N (Compose v2), with N from 1. So
# `docker-compose up --scale participant=3` gives the indices 0, 1 and 2,
# and a restarted container keeps its index.
set -euo pipefail

# Prints the replica number (from 1) of this container, found through the
# reverse DNS name of its own address, or nothing.
replica_number() {
    local address name
    address=$(getent hosts "$(hostname)" | awk '{ print $1; exit }') || return 0
    [[ -n $address ]] || return 0
    name=$(getent -s dns hosts "$address" | awk '{ print $2; exit }') || return 0
    name=${name%%.*}
    if [[ $name =~ [_-]([0-9]+)$ ]]; then
        echo "${BASH_REMATCH[1]}"
    fi
}

if [[ ${1:-} == report ]]; then
    shift
    exec dssgd-report "$@"
fi

if [[ ${1:-} == collaborate ]]; then
    if [[ -z ${DSSGD_INDEX:-} ]]; then
        replica=$(replica_number)
        if [[ -z $replica ]]; then
            echo "dssgd-participant-entrypoint: DSSGD_INDEX is not set and the container" \
                "name gives no replica number; set DSSGD_INDEX to a number in" \
                "0..DSSGD_PARTICIPANTS-1" >&2
            exit 2
        fi
        DSSGD_INDEX=$((10#$replica - 1))
        export DSSGD_INDEX
        echo "dssgd-participant-entrypoint: replica $replica, so DSSGD_INDEX=$DSSGD_INDEX" >&2
    fi
    # Metrics go to the shared runs volume, one file per participant, where
    # the reporter reads them.
    if [[ -z ${DSSGD_METRICS:-} && -d /runs/metrics && -w /runs/metrics ]]; then
        if [[ -n ${DSSGD_PARTICIPANT_ID:-} ]]; then
            DSSGD_METRICS=/runs/metrics/$DSSGD_PARTICIPANT_ID.json
        elif [[ $DSSGD_INDEX =~ ^[0-9]+$ ]]; then
            DSSGD_METRICS=/runs/metrics/$(printf 'p%03d' "$((10#$DSSGD_INDEX))").json
        fi
        [[ -z ${DSSGD_METRICS:-} ]] || export DSSGD_METRICS
    fi
fi

exec dssgd-participant "$@"
