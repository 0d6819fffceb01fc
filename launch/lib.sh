# shellcheck shell=bash
# Shared by launch/torchrun.sh and launch/slurm.sbatch (sourced, not run): where a run writes,
# and what its status.json says. Needs bash only; Python only to resolve a config without
# run.output_dir=... on the command line.

# evo_output_dir [CONFIG.yaml ...] [key=value ...]: the run.output_dir `evoformer train` would use.
# Prints nothing when it cannot tell (evoformer not importable here, e.g. it lives in a container).
evo_output_dir() {
  local arg dir=""
  for arg in "$@"; do
    if [[ $arg == run.output_dir=* ]]; then dir=${arg#run.output_dir=}; fi
  done
  if [[ -n $dir ]]; then
    printf '%s\n' "$dir"
    return 0
  fi
  "${PYTHON:-python}" - "$@" 2>/dev/null <<'EOF' || true
import sys

from evoformer.cli import find_config, split_args
from evoformer.config import load_config

files, overrides = split_args(sys.argv[1:])
print(load_config(files or [find_config("configs/quickstart.yaml")], overrides).run.output_dir)
EOF
}

# evo_run_state DIR SINCE: "STATE STEP MAX_STEPS" from DIR/status.json when the file was written
# at or after SINCE (seconds since the epoch), so a status left by an earlier run never counts.
# STATE is finished | interrupted | hung (written by the trainer), or none (no fresh status).
evo_run_state() {
  local file=$1/status.json since=$2 json state=none step=0 max=0
  if [[ -f $file ]] && (($(stat -c %Y "$file") >= since)); then
    json=$(<"$file")
    [[ $json =~ \"state\":\ *\"([a-z]+)\" ]] && state=${BASH_REMATCH[1]}
    [[ $json =~ \"step\":\ *([0-9]+) ]] && step=${BASH_REMATCH[1]}
    [[ $json =~ \"max_steps\":\ *([0-9]+) ]] && max=${BASH_REMATCH[1]}
  fi
  printf '%s %s %s\n' "$state" "$step" "$max"
}

# evo_latest_checkpoint DIR: the newest complete checkpoint of the run in DIR, or "none".
evo_latest_checkpoint() {
  local latest=$1/checkpoints/latest name
  if [[ -f $latest ]]; then
    name=$(<"$latest")
    if [[ -d $1/checkpoints/$name ]]; then
      printf '%s\n' "$1/checkpoints/$name"
      return 0
    fi
  fi
  printf 'none\n'
}

# evo_hang_retry DIR: after a run in DIR ended "hung" (the watchdog or a failed collective),
# say whether to requeue. A hang that came after a newer checkpoint than the previous hang's is
# taken for a transient fault (a stuck link, a bad node) and retried; a second hang with no new
# checkpoint in between would repeat forever, so it is not. DIR/.hang_checkpoint remembers the
# checkpoint of the last retried hang. Prints "retry CHECKPOINT" or "stop CHECKPOINT".
evo_hang_retry() {
  local mark=$1/.hang_checkpoint latest previous=""
  latest=$(evo_latest_checkpoint "$1")
  [[ -f $mark ]] && previous=$(<"$mark")
  if [[ $latest == none || $latest == "$previous" ]]; then
    printf 'stop %s\n' "$latest"
    return 0
  fi
  printf '%s\n' "$latest" >"$mark.tmp" && mv -f "$mark.tmp" "$mark"
  printf 'retry %s\n' "$latest"
}

# evo_log MESSAGE...: one line on stderr, prefixed with the time, the script and the host.
evo_log() {
  printf '%s %s [%s]: %s\n' "$(date +%H:%M:%S)" "${EVO_LOG_NAME:-evoformer-launch}" \
    "$(hostname -s 2>/dev/null || hostname)" "$*" >&2
}
