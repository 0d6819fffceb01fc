#!/usr/bin/env bash
# Launch `evoformer train` with torchrun on one node or many (c10d rendezvous).
#
# usage: launch/torchrun.sh [OPTIONS] [--] [CONFIG.yaml ...] [key=value ...]
#
# Run it once per node with the same arguments. Options (each also read from the environment):
#   --nnodes N            nodes in the job                        NNODES          (1)
#   --nproc-per-node N    processes per node, one per GPU         NPROC_PER_NODE  (visible GPUs, else 1)
#   --master-addr HOST    rendezvous host, reachable by all nodes MASTER_ADDR     (needed if nnodes > 1)
#   --master-port PORT    rendezvous port on that host            MASTER_PORT     (29500)
#   --node-rank R         fix this node's rank: static rendezvous NODE_RANK       (unset: c10d assigns
#                         instead of c10d, node 0 = MASTER_ADDR                    ranks on arrival)
#   --rdzv-id ID          run id shared by the nodes              RDZV_ID         ($SLURM_JOB_ID)
#   --shutdown-timeout S  seconds workers get to save a checkpoint SHUTDOWN_TIMEOUT (300)
#                         after a stop signal, then SIGKILL
#   --dry-run             print the torchrun command and exit
# Also: PYTHON (interpreter, default python), TORCHRUN_ARGS (extra torchrun flags, split on
# spaces), MAX_RESTARTS (torchrun worker-group restarts, default 0).
#
# With one node and no MASTER_ADDR the rendezvous is torchrun --standalone (a free local port).
# A user error (bad config, missing file) reads as its one line, printed once, and exit 2.
# SIGTERM, SIGINT and SIGUSR1 reach every worker; the trainer saves a checkpoint at the next step
# boundary and exits 0 (status.json: interrupted). This script then exits 0 as well; it exits
# non-zero, naming the last complete checkpoint, when training failed.
#
# Examples:
#   launch/torchrun.sh --nproc-per-node 8 configs/quickstart.yaml train.max_steps=1000
#   # on each of 4 nodes:
#   launch/torchrun.sh --nnodes 4 --nproc-per-node 8 --master-addr node001 run.output_dir=/shared/run1

set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$here/lib.sh"
EVO_LOG_NAME=torchrun.sh

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# Visible GPUs: CUDA_VISIBLE_DEVICES if set (Slurm sets it per task), else nvidia-smi, else 1.
default_nproc() {
  local ids n
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    n=${#ids[@]}
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  echo $((${n:-0} > 0 ? n : 1))
}

nnodes=${NNODES:-1}
nproc=${NPROC_PER_NODE:-}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
node_rank=${NODE_RANK:-}
rdzv_id=${RDZV_ID:-${SLURM_JOB_ID:-evoformer}}
shutdown_timeout=${SHUTDOWN_TIMEOUT:-300}
dry_run=0

while (($#)); do
  case $1 in
    --) shift; break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --*=*) opt=${1%%=*}; val=${1#*=}; shift ;;
    --*) opt=$1; (($# >= 2)) || { evo_log "$1 needs a value"; exit 2; }; val=$2; shift 2 ;;
    *) break ;;
  esac
  case $opt in
    --nnodes) nnodes=$val ;;
    --nproc-per-node | --nproc_per_node) nproc=$val ;;
    --master-addr | --master_addr) master_addr=$val ;;
    --master-port | --master_port) master_port=$val ;;
    --node-rank | --node_rank) node_rank=$val ;;
    --rdzv-id | --rdzv_id) rdzv_id=$val ;;
    --shutdown-timeout) shutdown_timeout=$val ;;
    *) evo_log "unknown option $opt (see --help)"; exit 2 ;;
  esac
done
nproc=${nproc:-$(default_nproc)}

# evoformer.torchrun is torchrun with a short failure report: a user error reads as one line
# (exit 2), any other failure as one line per failed rank.
cmd=("${PYTHON:-python}" -m evoformer.torchrun
  --nnodes="$nnodes" --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-0}"
  # torchrun's default list lacks SIGUSR1 (the scheduler's early warning): without it the agent
  # dies of the signal and takes the workers with it, unsaved.
  "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
  --shutdown-timeout="$shutdown_timeout")
if [[ $nnodes == 1 && -z $master_addr ]]; then
  cmd+=(--standalone)
elif [[ -z $master_addr ]]; then
  evo_log "--nnodes $nnodes needs --master-addr (or MASTER_ADDR): the host all nodes meet at"
  exit 2
elif [[ -n $node_rank ]]; then
  cmd+=(--node-rank="$node_rank" --master-addr="$master_addr" --master-port="$master_port")
else
  cmd+=(--rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port" --rdzv-id="$rdzv_id")
fi
if [[ -n ${TORCHRUN_ARGS:-} ]]; then
  read -ra extra <<<"$TORCHRUN_ARGS"
  cmd+=("${extra[@]}")
fi
cmd+=(-m evoformer train "$@")

if ((dry_run)); then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi

# torchrun runs in its own session, so a Ctrl-C at the terminal reaches it once, through the
# handler below. A second signal while it shuts workers down would make it abandon them.
# Inside a Slurm step, slurmstepd already signals every process of the step (torchrun and the
# workers included): forwarding there would be that second signal.
stop_signal=""
interrupts=0
# shellcheck disable=SC2317  # run by the traps below
on_signal() {
  # A Ctrl-C while only waiting for the workers' checkpoint (below) means: stop waiting.
  if [[ $1 == INT ]] && ((++interrupts > 1)) && ! kill -0 "$child" 2>/dev/null; then
    evo_log "interrupted again: not waiting for the workers' checkpoint"
    exit 130
  fi
  stop_signal=$1
  if [[ -z ${SLURM_STEP_ID:-} ]]; then
    kill -s "$1" "$child" 2>/dev/null || true
  fi
}
start=$(date +%s)
setsid "${cmd[@]}" &
child=$!
for sig in TERM INT USR1 HUP QUIT; do
  # shellcheck disable=SC2064  # expand $sig now, once per trap
  trap "on_signal $sig" "$sig"
done
while kill -0 "$child" 2>/dev/null; do
  wait "$child" || true # returns early when a trapped signal arrives
done
rc=0
wait "$child" || rc=$?
if ((rc == 0)); then
  exit 0
fi
if ((rc == 2)) && [[ -z $stop_signal ]]; then
  exit 2 # a user error: its one line is printed already
fi

out_dir=$(evo_output_dir "$@")
if [[ -z $out_dir ]]; then
  evo_log "torchrun exited with status $rc (run directory unknown: pass run.output_dir=...)"
  exit "$rc"
fi
if [[ -n $stop_signal ]]; then
  # torchrun itself exits 1 after forwarding a signal, even when every worker saved and exited 0,
  # and a second signal (Slurm may send SIGTERM twice) makes it leave without waiting for them.
  # The trainer's status.json says when the checkpoint is complete: rank 0, maybe on another
  # node, writes it right after. Wait for it as long as torchrun would have.
  deadline=$((SECONDS + shutdown_timeout))
  while read -r state step max < <(evo_run_state "$out_dir" "$start"); [[ $state == none ]]; do
    ((SECONDS < deadline)) || break
    sleep 0.5
  done
  if [[ $state == interrupted ]]; then
    evo_log "stopped by SIG$stop_signal at step $step/$max;" \
      "checkpoint $(evo_latest_checkpoint "$out_dir")"
    exit 0
  elif [[ $state == finished ]]; then
    evo_log "finished at step $step/$max (SIG$stop_signal came too late to matter)"
    exit 0
  fi
fi
ckpt=$(evo_latest_checkpoint "$out_dir")
if [[ $ckpt == none ]]; then
  resume="No complete checkpoint in $out_dir yet: a rerun starts from step 0."
else
  resume="Last complete checkpoint: $ckpt; rerun with checkpoint.load=auto to resume from it."
fi
evo_log "training FAILED: torchrun exited with status $rc${stop_signal:+ after SIG$stop_signal}." \
  "$resume"
exit "$rc"
