# shellcheck shell=bash
# The runtime of every megatron-opd SLURM batch script: launchers/slurm.py inlines this file into
# the script it renders (compute nodes may not see the source tree), below `set -uo pipefail`.
# Functions only: nothing runs here but the traps. The rendered script sets what they read before
# calling any of them: LOGS, HEALTH_TIMEOUT, AUTH_HEADER, REQUEUE, ATTEMPT, MAX_REQUEUES,
# EXIT_STOPPED (and SLURM sets SLURM_JOB_ID). Checked by `bash -n` and, where it is installed,
# by shellcheck (tests/test_slurm_render.py).

log() { echo "[$(date +%H:%M:%S)] $*"; }

# slice_hosts HOSTLIST START COUNT: COUNT host names of a SLURM host list from START, comma-separated.
slice_hosts() {
    local -a hosts
    mapfile -t hosts < <(scontrol show hostnames "$1")
    local IFS=,
    echo "${hosts[*]:$2:$3}"
}

# wait_healthy PATH URL...: poll URL/PATH until every URL answers 200, or give up after
# HEALTH_TIMEOUT seconds (then the job fails before any training step).
wait_healthy() {
    local path=$1 url
    shift
    local deadline=$((SECONDS + HEALTH_TIMEOUT))
    for url in "$@"; do
        until curl -sf -o /dev/null --max-time 5 ${AUTH_HEADER:+-H "$AUTH_HEADER"} "$url$path"; do
            if ((SECONDS > deadline)); then
                log "$url$path did not answer within ${HEALTH_TIMEOUT}s; see the server logs in $LOGS"
                return 1
            fi
            if [[ -n ${STOP_REQUESTED:-} ]]; then return 1; fi
            sleep 2
        done
        log "ready: $url$path"
    done
}

# supervise NAME MAX_RESTARTS DELAY COMMAND...: run a server step; when it exits, start it again
# after DELAY seconds (a dead replica comes back; meanwhile clients and routers send its requests
# to the other replicas). SIGTERM stops the supervisor and its step (cleanup, when the script ends).
SUPERVISORS=()
supervise() {
    local name=$1 max=$2 delay=$3 restarts=0 rc child=""
    shift 3
    trap '' USR1  # the warning signal is for the trainer, not for servers
    trap 'if [[ -n $child ]]; then kill -TERM "$child" 2>/dev/null; wait "$child"; fi; exit 0' TERM
    while true; do
        "$@" &
        child=$!
        wait "$child"
        rc=$?
        child=""
        if ((restarts >= max)); then
            log "$name exited with status $rc after $restarts restarts; giving up on it"
            return "$rc"
        fi
        restarts=$((restarts + 1))
        log "$name exited with status $rc; restart $restarts of $max in $delay s"
        sleep "$delay"
    done
}

# On exit (or requeue) stop the servers first, so that no supervisor restarts one meanwhile.
cleanup() {
    if ((${#SUPERVISORS[@]})); then
        kill -TERM "${SUPERVISORS[@]}" 2>/dev/null
        wait "${SUPERVISORS[@]}" 2>/dev/null
    fi
}
trap cleanup EXIT

# A stop signal (SLURM's warning signal USR1, or TERM) is passed on to the trainer step, whose
# ranks save a checkpoint and stop; before the trainer runs, it just ends the job (requeued below).
STOP_REQUESTED=""
TRAINER_PID=""
on_stop() {
    STOP_REQUESTED=$1
    log "received SIG$1"
    if [[ -n $TRAINER_PID ]]; then
        log "asking the trainer to save a checkpoint and stop"
        kill -USR1 "$TRAINER_PID" 2>/dev/null || true
    fi
}
trap 'on_stop USR1' USR1
trap 'on_stop TERM' TERM

requeue_or_exit() {
    if [[ $REQUEUE == 1 ]] && ((ATTEMPT < MAX_REQUEUES)); then
        log "requeueing job $SLURM_JOB_ID (requeue $((ATTEMPT + 1)) of at most $MAX_REQUEUES); it resumes from the newest complete checkpoint"
        cleanup
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0  # SLURM ends this attempt and starts the script again
        fi
        log "scontrol requeue failed"
    fi
    log "stopped early and not requeued: resubmit the same script to resume"
    exit "$EXIT_STOPPED"
}

# A server or router did not come up: fail before training (or requeue if we were told to stop).
not_ready() {
    if [[ -n $STOP_REQUESTED ]]; then requeue_or_exit; fi
    log "not every server is ready; the job fails before any training step"
    exit 1
}
