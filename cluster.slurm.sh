#!/bin/bash
# A sweep on a SLURM allocation: Ray on the allocated nodes, the sweep driver on the first.
#
#   sbatch cluster.slurm.sh                                   # the defaults below
#   sbatch -p gpu -t 2-00:00:00 --nodes=4 --gpus-per-node=4 --cpus-per-task=32 \
#       --export=ALL,DATASET=cub,WSML_SHARED=/shared/$USER/wsml cluster.slurm.sh --num-samples 48
#
# Submit from the repo root, on a filesystem every node sees (the nodes run the
# code from there). sbatch's own options (partition, time, nodes, GPUs, CPUs)
# override the #SBATCH lines; the variables below are set with
# `--export=ALL,NAME=value,...`; arguments after the script go to
# orchestration/sweep.py (--num-samples, --epochs, --final-seeds, --space, ...).
#
# Before anything costs the allocation's time, the job checks what would fail
# every trial: the venv (built on the login node by scripts/setup.sh: compute
# nodes may have no internet), that its Python runs here, that nothing must be
# downloaded (orchestration/offline.py: weights, data) and, on every node, that
# the NVIDIA driver fits torch's build (orchestration/gpu_check.py). Each
# failure is one `error:` line with its fix. Then it starts Ray with the CPUs
# and GPUs SLURM granted (a head on the first node, a worker on each other
# node), runs orchestration/sweep.py against it and exits with its status. SLURM's warning signal before the
# time limit (--signal) stops the sweep as Ctrl-C does: its runs end KILLED in
# MLflow and the driver prints how to continue. Submit the same command again
# (or let --requeue restart the job) and the sweep continues with --resume:
# the job finds <storage>/<SWEEP_NAME>/wsml_sweep.json. A new sweep needs a new
# SWEEP_NAME.
#
#SBATCH --job-name=wsml-sweep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log

set -euo pipefail

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit it with sbatch cluster.slurm.sh"
# The site's set-up (module load, conda activate), first: the settings below may use what it sets, and
# every srun step inherits its environment (PATH, LD_LIBRARY_PATH a module's Python needs at run time).
if [ -n "${WSML_ENV_SETUP:-}" ]; then
  [ -f "$WSML_ENV_SETUP" ] || die "WSML_ENV_SETUP=$WSML_ENV_SETUP: no such file (give the path of your site's set-up file)"
  set +eu                        # module and conda scripts read unset variables and return non-zero
  # shellcheck disable=SC1090    # the site's file
  source "$WSML_ENV_SETUP"
  set -eu
fi

# ----------------------------------------------------------------- settings
DATASET=${DATASET:-digits}                    # a data set of search_spaces/
SWEEP_NAME=${SWEEP_NAME:-$DATASET-slurm}      # same name again = continue that sweep
WSML_DIR=${WSML_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}          # the repo (on shared storage)
WSML_SHARED=${WSML_SHARED:-${SCRATCH:+$SCRATCH/wsml}}    # shared folder for what the sweep writes: the
WSML_SHARED=${WSML_SHARED:-$WSML_DIR}                    #   site's $SCRATCH where it has one, else the repo
WSML_STORAGE=${WSML_STORAGE:-$WSML_SHARED/ray_results}   # Ray Tune's results and checkpoints
WSML_RESULTS=${WSML_RESULTS:-$WSML_SHARED/results}       # the aggregated tables and figures
WSML_DATA_ROOT=${WSML_DATA_ROOT:-$WSML_SHARED/data}      # data sets: <root>/<dataset>
MLFLOW_URI_GIVEN=${WSML_MLFLOW_URI:+1}
WSML_MLFLOW_URI=${WSML_MLFLOW_URI:-sqlite:///$WSML_SHARED/mlflow.db}  # or an MLflow server http://...
# SQLite advises against network file systems (NFS, Lustre, GPFS: locks and reads from other hosts are not
# safe): there, unless WSML_MLFLOW_URI names a store, the job serves its SQLite store through an `mlflow server`
# on the head, the one process that opens the file. auto: by the shared folder's file system; 1: always; 0: never.
WSML_MLFLOW_SERVER=${WSML_MLFLOW_SERVER:-auto}
WSML_SHARED_CACHE=${WSML_SHARED_CACHE:-$WSML_SHARED/cache}   # compact image caches: built once, read by every node
WSML_CACHE=${WSML_CACHE:-/tmp/$(id -un)/wsml-cache}       # raw image caches: each node's own disk, same path on all
TORCH_HOME=${TORCH_HOME:-$WSML_SHARED/torch}             # ImageNet weights (orchestration/offline.py fetch puts them)
PYTHON=${PYTHON:-python3.11}                  # the Python .venv was built from (scripts/setup.sh), for the fix lines
RAY_PORT=${RAY_PORT:-auto}                    # the head's GCS port (auto: a free one)
WSML_RAY_TMP=${WSML_RAY_TMP:-/tmp/ray-$(id -un)-${SLURM_JOB_ID:-0}}  # node-local Ray session files
WSML_RAY_WAIT=${WSML_RAY_WAIT:-300}           # seconds for every node to join Ray

for arg in "$@"; do
  case $arg in
    --dataset|--dataset=*|--name|--name=*|--storage|--storage=*|--address|--address=*|--mlflow-uri|--mlflow-uri=*|--resume|--results-dir|--results-dir=*|--data-root|--data-root=*)
      die "$arg: set it with --export=ALL,DATASET=...,SWEEP_NAME=...,WSML_SHARED=... (see the top of cluster.slurm.sh); the script passes it to the sweep";;
  esac
done
[[ $SWEEP_NAME =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "SWEEP_NAME=$SWEEP_NAME: use letters, digits, '.', '_' and '-'"
[ -f "$WSML_DIR/orchestration/sweep.py" ] || die "$WSML_DIR is not the project's folder: submit from the repo root or set WSML_DIR"
cd "$WSML_DIR"

# ---------------------------------------------------------------- the venv
# Built on the login node, never here: compute nodes may have no internet, and an install would cost the
# allocation's time. The same check the login node's scripts/setup.sh makes (requirements, TORCH_CUDA).
bash scripts/setup.sh --check ||
  die ".venv is missing or not up to date with requirements.txt: build it on the login node, in $WSML_DIR: PYTHON=$PYTHON TORCH_CUDA=<cu130|cu128|cu126|cpu, for the nodes' driver> bash scripts/setup.sh (docs/slurm.md)"
PY=$WSML_DIR/.venv/bin/python
RAY=$WSML_DIR/.venv/bin/ray
# the standard library's C modules too: a module's Python started without its module may find another
# libpython (the system's) and fail only when these load
pyerr=$("$PY" -c 'import ctypes, sqlite3, ssl' 2>&1) ||
  die "$PY does not run on ${SLURMD_NODENAME:-$(hostname)} (${pyerr##*$'\n'}): load the Python it was built from ($(grep -m1 '^home' .venv/pyvenv.cfg)) in the file WSML_ENV_SETUP names (docs/slurm.md)"
"$PY" -c 'import sys; from wsml.config import DATASETS; sys.exit(sys.argv[1] not in DATASETS)' "$DATASET" ||
  die "DATASET=$DATASET: unknown data set; choose one of $("$PY" -c 'from wsml.config import DATASETS; print(*DATASETS)')"
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
export WSML_SHARED_CACHE WSML_CACHE TORCH_HOME
# Ray 2.60's token authentication: one secret per job, in the environment of
# every srun step (srun passes the environment on) and of the driver.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN
# `ray start --block` drains a node for 30 s on SIGTERM (for Ray Serve); nothing to drain here
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

# -------------------------------------------- the sweep's arguments, and what its trials need
SWEEP=(--dataset "$DATASET" --name "$SWEEP_NAME" --storage "$WSML_STORAGE" --mlflow-uri "$WSML_MLFLOW_URI"
       --results-dir "$WSML_RESULTS")
[ "$DATASET" = digits ] || SWEEP+=(--data-root "$WSML_DATA_ROOT/$DATASET")
if [ -f "$WSML_STORAGE/$SWEEP_NAME/wsml_sweep.json" ]; then
  say "sweep $SWEEP_NAME exists in $WSML_STORAGE (restart ${SLURM_RESTART_COUNT:-0}): continuing it with --resume"
  SWEEP+=(--resume)
fi
# Nothing to download (ImageNet weights in TORCH_HOME, the data set prepared); prints the GPUs per trial
GPUS_PER_TRIAL=$("$PY" -m orchestration.offline check "${SWEEP[@]}" "$@") || exit 2   # it said why

# --------------------------------------------------------------- the nodes
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${SLURMD_NODENAME:-${NODES[0]}}           # the batch shell runs on the allocation's first node
WORKERS=()
for n in "${NODES[@]}"; do [ "$n" = "$HEAD" ] || WORKERS+=("$n"); done

# SLURM's address of a node (NodeAddr), as an IPv4 address: Ray binds to it.
# Exported for the srun steps, which run it for their own node.
node_ip() {
  local addr
  addr=$(scontrol show node "$1" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  getent ahostsv4 "${addr:-$1}" | awk 'NR == 1 { print $1 }'
}
export -f node_ip
HEAD_IP=$(node_ip "$HEAD")
[ -n "$HEAD_IP" ] || die "no IPv4 address for node $HEAD (scontrol show node $HEAD: NodeAddr)"
# Free ports on the head (this node) for the GCS and for the two servers
# `ray start --head` always starts (Ray Client, the API server), whose fixed
# defaults would collide with another job's Ray on a shared node.
read -r FREE1 FREE2 FREE3 FREE4 < <("$PY" -c '
import socket, sys
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind((sys.argv[1], 0))
print(*(s.getsockname()[1] for s in socks))' "$HEAD_IP")
[ "$RAY_PORT" != auto ] || RAY_PORT=$FREE1
ADDRESS=$HEAD_IP:$RAY_PORT
export WSML_RAY_TMP RAY

# ------------------------------------------------------------ the MLflow store
MLFLOW_PID=
fs=$(stat -f -c %T "$WSML_SHARED" 2>/dev/null || echo unknown)
case $WSML_MLFLOW_SERVER:$fs in
  1:*|auto:nfs*|auto:lustre|auto:gpfs|auto:beegfs*|auto:cifs|auto:smb*|auto:ceph|auto:fuse*) serve=1 ;;
  *) serve= ;;
esac
if [ -n "$serve" ] && [ -z "$MLFLOW_URI_GIVEN" ]; then
  db=${WSML_MLFLOW_URI#sqlite:///}
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$WSML_DIR/.venv/bin/mlflow" server --host "$HEAD_IP" --port "$FREE4" \
    --backend-store-uri "$WSML_MLFLOW_URI" --default-artifact-root "$(dirname "$db")/mlartifacts" --workers 1 \
    --allowed-hosts "$HEAD_IP:*,$HEAD:*,localhost:*,127.0.0.1:*" >"$WSML_RAY_TMP-mlflow.log" 2>&1 &
  MLFLOW_PID=$!       # its own process group (setsid): the server and its workers end together
  WSML_MLFLOW_URI=http://$HEAD_IP:$FREE4
  "$PY" - "$WSML_MLFLOW_URI/health" "$MLFLOW_PID" <<'PY' || die "mlflow server did not start on $HEAD: $(tail -n 3 "$WSML_RAY_TMP-mlflow.log" | tr '\n' ' ')"
import os, sys, time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        sys.exit(0)
    except OSError:
        os.kill(int(sys.argv[2]), 0)      # the server exited: fail at once
        time.sleep(0.5)
sys.exit(1)
PY
  for i in "${!SWEEP[@]}"; do [ "${SWEEP[i]}" != --mlflow-uri ] || SWEEP[i + 1]=$WSML_MLFLOW_URI; done
  say "MLflow: $db (shared folder on $fs, WSML_MLFLOW_SERVER=$WSML_MLFLOW_SERVER) served by mlflow server on $HEAD at $WSML_MLFLOW_URI; to watch from the login node while the job runs: ssh -N -L 5000:$HEAD_IP:$FREE4 $HEAD, then http://127.0.0.1:5000"
fi

say "job $SLURM_JOB_ID: nodes ${NODES[*]} (head $HEAD, $ADDRESS); sweep $SWEEP_NAME of $DATASET"
say "storage $WSML_STORAGE; MLflow $WSML_MLFLOW_URI; image caches $WSML_SHARED_CACHE (shared), $WSML_CACHE (each node)"

# A node's Ray: the CPUs and GPUs SLURM granted on it, bound to its address,
# no dashboard. Runs under srun, as the step's only task.
RAY_NODE='exec "$RAY" start --block --node-ip-address="$(node_ip "$SLURMD_NODENAME")" \
  --num-cpus="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}" --num-gpus="${SLURM_GPUS_ON_NODE:-0}" \
  --temp-dir="$WSML_RAY_TMP" --disable-usage-stats "$@"'

# Each Ray step takes the CPUs of its node's task (srun from SLURM 22.05 on
# does not inherit --cpus-per-task from sbatch) and, by default, its GPUs.
STEP_CPUS=()
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || STEP_CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

STEP_PIDS=()          # the srun processes of the Ray steps: head first
stop_ray() {
  # SIGTERM to the tasks of a Ray step (`ray start --block`) stops that node's
  # Ray processes; workers first, then the head. A step that is still there
  # after 60 s is ended by ending its srun (SLURM kills what the step left).
  # Never `ray stop`: it stops every Ray of this user on a shared node.
  local pid i step name
  for ((i = ${#STEP_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${STEP_PIDS[i]}
    kill -0 "$pid" 2>/dev/null || continue
    name=$([ "$i" -eq 0 ] && echo ray-head || echo ray-workers)
    step=$(squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' | awk -v n="$name" '$2 == n { print $1 }')
    [ -z "$step" ] || scancel --signal=TERM "$step" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  STEP_PIDS=()
}

# Wait for N alive Ray nodes; stop early when a Ray step has exited.
wait_for_ray() {
  local n=$1 waiter pid
  "$PY" -m orchestration.ray_nodes --address "$ADDRESS" --nodes "$n" --timeout "$WSML_RAY_WAIT" &
  waiter=$!
  while kill -0 "$waiter" 2>/dev/null; do
    for pid in "${STEP_PIDS[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        kill "$waiter" 2>/dev/null || true
        die "Ray exited on a node before the cluster was up: see its \`ray start\` output above"
      fi
    done
    sleep 1
  done
  wait "$waiter" || exit 1      # it said why
}

DRIVER=
STOPPING=
on_signal() {
  say "received SIG$1: stopping the sweep (SIGINT to the driver, as Ctrl-C)"
  STOPPING=$1
  [ -z "$DRIVER" ] || kill -INT "$DRIVER" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
stop_mlflow() {   # after the sweep and Ray: the driver's last writes went through it
  [ -z "$MLFLOW_PID" ] || { kill -TERM -- "-$MLFLOW_PID" 2>/dev/null; wait "$MLFLOW_PID" 2>/dev/null || true; }
  MLFLOW_PID=
}
trap 'stop_ray; stop_mlflow' EXIT

# Every node's driver against torch's CUDA build, before Ray: a mismatch fails every GPU trial
if ! checked=$(srun --nodes=${#NODES[@]} --ntasks=${#NODES[@]} --ntasks-per-node=1 "${STEP_CPUS[@]}" --overlap \
                 --job-name=gpu-check "$PY" -m orchestration.gpu_check --gpus-per-trial "$GPUS_PER_TRIAL" 2>&1); then
  line=$(grep -m1 '^error: ' <<<"$checked" || true)
  [ -n "$line" ] || line="error: the GPU check failed on a node: ${checked//$'\n'/ | }"
  die "${line#error: }"
fi
while read -r line; do say "$line"; done < <(grep '^gpu check: ' <<<"$checked")

srun --nodes=1 --ntasks=1 "${STEP_CPUS[@]}" -w "$HEAD" --overlap --job-name=ray-head \
  bash -c "$RAY_NODE" ray-node --head --port="$RAY_PORT" --ray-client-server-port="$FREE2" \
  --include-dashboard=false --dashboard-host=127.0.0.1 --dashboard-port="$FREE3" &
STEP_PIDS+=($!)
wait_for_ray 0                 # the head's GCS port answers
if [ ${#WORKERS[@]} -gt 0 ]; then
  srun --nodes=${#WORKERS[@]} --ntasks=${#WORKERS[@]} --ntasks-per-node=1 "${STEP_CPUS[@]}" \
    -w "$(IFS=,; echo "${WORKERS[*]}")" --overlap --job-name=ray-workers \
    bash -c "$RAY_NODE" ray-node --address="$ADDRESS" &
  STEP_PIDS+=($!)
fi
wait_for_ray ${#NODES[@]}

# ---------------------------------------------------------------- the sweep
SWEEP+=(--address "$ADDRESS")
if [ -n "$STOPPING" ]; then
  say "stopped by SIG$STOPPING before the sweep started; submit the same command again to run it"
  exit 130
fi
say "sweep: orchestration/sweep.py ${SWEEP[*]} $*"
"$PY" orchestration/sweep.py "${SWEEP[@]}" "$@" &
DRIVER=$!
while kill -0 "$DRIVER" 2>/dev/null; do wait "$DRIVER" || true; done
status=0
wait "$DRIVER" || status=$?
DRIVER=
say "sweep exited with status $status; stopping Ray (SIGTERM to its steps: srun reports them ending)"
stop_ray
say "Ray stopped"
[ "$status" -ne 130 ] || say "the sweep was stopped: submit the same sbatch command again to continue it"
exit "$status"
