# Shared body of slurm/pretrain.sh and slurm/adapter.sh (sourced, not run). See docs/slurm.md.
#
# megamem_run CONFIG [--deepspeed DS_JSON] [--section.key VALUE ...]
#   1. sources the environment hook (MEGAMEM_ENV_SETUP, default slurm/env.sh if present)
#   2. checks the config and overrides (one `error:` line and exit 2 on bad input, before any rank starts)
#   3. records the resolved config, git commit and job log in OUTPUT_DIR/slurm/JOB_ID/
#   4. resumes from OUTPUT_DIR/checkpoints/latest when it exists (a requeued or resubmitted run)
#   5. starts one process per task: `srun` (default) or DeepSpeed's launcher (MEGAMEM_LAUNCHER=deepspeed)
#      running scripts/train.py; a progressive config (training.mode layerwise|blockwise|fused) instead runs
#      tools/progressive.py in this shell, which launches each phase the same way (finished phases skipped,
#      an interrupted one resumed from its checkpoint; steps 4 and the check are then the tool's, per phase)
#   6. on USR1 (SLURM's --signal=B:USR1@120, or scancel --signal=USR1 --batch) forwards it to the ranks
#      (through tools/progressive.py for a schedule), which checkpoint after the current step and exit
#      with 75; the job then requeues itself.
#      A run that reaches max_steps exits 0 and is not requeued; any other failure is not requeued.

PREEMPTED_EXIT_CODE=75   # scripts/train.py's exit code after a checkpoint on a preemption signal

say() { echo "[megamem $(date +%H:%M:%S)] $*"; }

megamem_run() {
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: not inside a SLURM job; submit with: sbatch $0 CONFIG [--section.key VALUE ...]" >&2
    exit 2
  fi
  if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "error: the first argument must be the config file: sbatch $0 CONFIG [--section.key VALUE ...]" >&2
    exit 2
  fi
  local config=$1
  shift
  cd "$MEGAMEM_ROOT"
  local restart=${SLURM_RESTART_COUNT:-0}

  # USR1 may come at any moment, even before the ranks exist: remember it, forward it once they do
  PREEMPT_REQUESTED=0
  LAUNCH_PID=""
  PROGRAM=train   # or progressive: a schedule of phases (set by the config check below)
  RESEND_PID=""
  trap on_usr1 USR1

  # 1. environment: modules, venv, conda ... (a file the user writes; sourced in this shell)
  local hook=${MEGAMEM_ENV_SETUP:-$MEGAMEM_ROOT/slurm/env.sh}
  if [ -n "${MEGAMEM_ENV_SETUP:-}" ] && [ ! -f "$hook" ]; then
    echo "error: MEGAMEM_ENV_SETUP=$hook does not exist" >&2
    exit 2
  fi
  if [ -f "$hook" ]; then
    # shellcheck disable=SC1090
    source "$hook"
  fi
  local py=${MEGAMEM_PYTHON:-}
  if [ -z "$py" ]; then
    if [ -x "$MEGAMEM_ROOT/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
      py=$MEGAMEM_ROOT/.venv/bin/python
    else
      py=$(command -v python3 || command -v python)
    fi
  fi
  export PYTHONPATH="$MEGAMEM_ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  export MEGAMEM_NO_PROGRESS=${MEGAMEM_NO_PROGRESS:-1}          # no progress bars in log files
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}  # threads per rank = its CPUs
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails the job, not hangs it
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
  else
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}   # CPU-only cluster: one rank per core, gloo
  fi

  # 2-3. check the arguments, record the resolved config in the run folder
  local prepared out
  prepared=$("$py" -m megamem.parallel.slurm prepare "$SLURM_JOB_ID" --config "$config" "$@") || exit 2
  out=${prepared%$'\n'*}
  PROGRAM=${prepared##*$'\n'}
  local run_dir=$out/slurm/$SLURM_JOB_ID
  exec > >(tee -a "$run_dir/job.log") 2>&1   # the job's log, next to its outputs (appended by requeues)
  {
    echo "commit: $(git -C "$MEGAMEM_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    git -C "$MEGAMEM_ROOT" status --porcelain --untracked-files=no 2>/dev/null | sed 's/^/modified: /' || true
  } > "$run_dir/git.txt"
  echo "$(date -Is) start job=$SLURM_JOB_ID restart=$restart nodes=$SLURM_JOB_NODELIST tasks=${SLURM_NTASKS:-?}" \
    >> "$out/slurm/history.txt"

  # 4. a checkpoint in this output_dir means: continue it (requeue, time limit, or a resubmission)
  local args=(--config "$config" "$@")
  if [ "$PROGRAM" = progressive ]; then
    say "a progressive schedule (training.mode): tools/progressive.py runs its phases," \
        "skipping finished ones and resuming an interrupted one"
  elif [ -f "$out/checkpoints/latest" ]; then
    say "resuming from $out/checkpoints/$(cat "$out/checkpoints/latest")"
    args+=(--training.resume_from_checkpoint latest)
  elif [ "$restart" != 0 ] && [ -f "$out/metrics.jsonl" ] && [ ! -d "$out/final" ]; then
    # a requeued attempt that died before its first checkpoint: start again, keep its log aside
    # (megamem refuses an output_dir holding another run's metrics.jsonl)
    mv "$out/metrics.jsonl" "$out/metrics.jsonl.attempt-$((restart - 1))"
    say "restart $restart without a checkpoint: starting again (the last attempt's log is metrics.jsonl.attempt-$((restart - 1)))"
  fi

  # everything the ranks would refuse at start-up (layout at this world size, tokenizer, data, output_dir),
  # checked once here, before srun starts every rank on it (a schedule: per phase, by the tool)
  if [ "$PROGRAM" = train ]; then
    "$py" "$MEGAMEM_ROOT/scripts/train.py" "${args[@]}" --check || exit 2
  fi

  # 5. rendezvous: the first allocated host and a port derived from the job id
  eval "$("$py" -m megamem.parallel.slurm rendezvous)"
  say "job $SLURM_JOB_ID restart $restart: ${SLURM_NTASKS:-?} ranks on $SLURM_JOB_NODELIST," \
      "rendezvous $MASTER_ADDR:$MASTER_PORT, launcher ${MEGAMEM_LAUNCHER:-srun}, output $out"
  local launch
  case "${MEGAMEM_LAUNCHER:-srun}" in
    srun)  # one task per GPU/core; each maps SLURM_PROCID/LOCALID/NTASKS to RANK/LOCAL_RANK/WORLD_SIZE.
      # --kill-on-bad-exit=0: after a preemption every rank exits 75 on its own; none is killed mid-exit
      launch=(srun --kill-on-bad-exit=0 "$py" -m megamem.parallel.slurm exec -- "$py") ;;
    deepspeed)  # DeepSpeed's own multi-node launcher (pdsh by default) over a generated hostfile
      local slots=${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
      launch=("$py" -m deepspeed.launcher.runner --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
      if [ "${SLURM_JOB_NUM_NODES:-1}" = 1 ]; then
        launch+=(--num_gpus "$slots")   # one node: DeepSpeed's local launcher, no ssh to ourselves
      else
        "$py" -m megamem.parallel.slurm hostfile "$run_dir/hostfile" "$slots"
        launch+=(--hostfile "$run_dir/hostfile" --launcher "${MEGAMEM_DS_LAUNCHER:-pdsh}")
      fi
      ;;
    *) echo "error: MEGAMEM_LAUNCHER must be srun or deepspeed, not '$MEGAMEM_LAUNCHER'" >&2; exit 2 ;;
  esac
  if [ "$PROGRAM" = train ]; then
    launch+=(scripts/train.py "${args[@]}")
  else  # each phase: `<the launcher above> scripts/train.py --config OUTPUT/phase_p.yaml`, checked here first
    launch=("$py" tools/progressive.py --launcher "${launch[*]@Q}" --check-phases "${args[@]}")
  fi

  local rc=$PREEMPTED_EXIT_CODE
  if [ "$PREEMPT_REQUESTED" = 0 ]; then
    if [ "$PROGRAM" = train ]; then
      "${launch[@]}" &
    else  # the tool ignores USR1 until its handler is in place (the resend below repeats a notice it missed)
      ( trap '' USR1; exec "${launch[@]}" ) &
    fi
    LAUNCH_PID=$!
    # a trapped signal interrupts `wait`: wait again until the launcher has really exited
    while kill -0 "$LAUNCH_PID" 2>/dev/null; do wait "$LAUNCH_PID" || true; done
    rc=0
    wait "$LAUNCH_PID" || rc=$?
  fi
  [ -z "$RESEND_PID" ] || kill "$RESEND_PID" 2>/dev/null || true

  # 6. preempted → requeue (the next run resumes from latest); finished or failed → done
  if [ "$rc" = "$PREEMPTED_EXIT_CODE" ]; then
    say "preempted: checkpoint saved, requeueing job $SLURM_JOB_ID"
    echo "$(date -Is) preempted job=$SLURM_JOB_ID restart=$restart" >> "$out/slurm/history.txt"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "$(date -Is) exit job=$SLURM_JOB_ID restart=$restart code=$rc" >> "$out/slurm/history.txt"
  say "training exited with code $rc"
  exit "$rc"
}

on_usr1() {
  say "USR1: asking the ranks to checkpoint and stop"
  if [ "$PREEMPT_REQUESTED" = 0 ]; then
    # a rank still starting up ignores the notice (before scripts/train.py installs its handler):
    # repeat it every 15 s until the ranks have stopped; a rank that already stops is unaffected
    ( while sleep 15; do kill -USR1 $$ 2>/dev/null || exit 0; done ) &
    RESEND_PID=$!
  fi
  PREEMPT_REQUESTED=1
  [ -n "$LAUNCH_PID" ] || return 0
  if [ "${MEGAMEM_LAUNCHER:-srun}" = srun ] || [ "$PROGRAM" = progressive ]; then
    # srun forwards it to every task; tools/progressive.py to the running phase's ranks (either launcher)
    kill -USR1 "$LAUNCH_PID" 2>/dev/null || true
  else
    # DeepSpeed's launchers die on USR1: signal only the training processes below this shell
    # (the ranks on this node; one rank's request stops every rank after the current step).
    # The launchers' own command lines name scripts/train.py too, after -m deepspeed.launcher...
    local pid cmd
    for pid in $(descendants "$LAUNCH_PID"); do
      cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)
      case "$cmd" in
        *deepspeed.launcher*) ;;
        *scripts/train.py*) kill -USR1 "$pid" 2>/dev/null || true ;;
      esac
    done
  fi
}

descendants() {
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "$child"
    descendants "$child"
  done
}
