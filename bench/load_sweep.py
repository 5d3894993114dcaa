"""Load: a sweep of many tiny trials on a multi-node Ray cluster on this machine ends with every
trial exactly once in Ray's results and in MLflow; wall time and the driver's peak memory.

    .venv/bin/python bench/load_sweep.py [--trials 200] [--nodes 4] [--cpus-per-node 1]
                                         [--max-train-images 16] [--workdir DIR]

A Ray cluster of `--nodes` raylets is started here (`ray.cluster_utils.Cluster`:
a head and nodes-1 workers, each with `--cpus-per-node` CPUs, dashboard off).
A search space of `--trials` digits trials, each training 2 epochs (the least a
space allows: ASHA's grace period is at least 2 and at most the epochs, so
ASHA stops nothing) on the first `--max-train-images` images, is written to
the work folder, and the project's sweep CLI runs it against the cluster
(`--address`), with MLflow's default store (sqlite `mlflow.db` in the work
folder) and no final stage. Tune may place as many trials at once as the
cluster has CPUs (TUNE_MAX_PENDING_TRIALS_PG).

The driver is the CLI's process: its peak resident memory is read from
/proc/<pid>/status (VmHWM) while it runs, and from
its rusage (`os.wait4`) once it has exited (the Ray processes are not
children of the driver: they belong to the cluster started here).

Then Ray's folder and the MLflow store are counted: trial folders and their
ids, child runs per trial id, their status and logged epochs. Last line:
`load <trials in Ray> trials / <child runs in MLflow> runs / <duplicates> duplicates / <not FINISHED> not finished`;
exit status 0 when every trial is there exactly once and finished.
Takes several minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "orchestration" / "sweep.py"
NAME = "load"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--nodes", type=int, default=4, help="raylets, the head included (default 4)")
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--max-train-images", type=int, default=16, help="training images per trial (default 16)")
    p.add_argument("--workdir", help="where Ray's results and mlflow.db go (default: a temporary folder, removed)")
    return p.parse_args(argv)


def write_space(path: Path, trials: int, images: int) -> None:
    path.write_text(textwrap.dedent(f"""\
        # bench/load_sweep.py: many tiny trials
        dataset: digits
        search:
          scheme: [LL-R, LL-Ct, LL-Cp]
          delta_rel: {{low: 0.5, high: 4.0}}
          lr: {{low: 2.0e-4, high: 5.0e-3, log: true}}
        num_samples: {trials}
        epochs: 2
        search_seed: 0
        scheduler: {{grace_period: 2, reduction_factor: 2}}
        resources: {{cpus_per_trial: 1, gpus_per_trial: 0}}
        final_seeds: 0
        max_failures: 2
        train: {{num_workers: 0, max_train_images: {images}, stop_drop: null}}
        """))


def peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def ray_trials(exp_dir: Path) -> list[tuple[str, list[int]]]:
    """(trial id, epochs reported) per trial folder."""
    out = []
    for d in sorted(p for p in exp_dir.iterdir() if p.is_dir() and (p / "params.json").exists()):
        rows = [json.loads(ln) for ln in (d / "result.json").read_text().splitlines() if ln.strip()] \
            if (d / "result.json").exists() else []
        out.append((rows[0]["trial_id"] if rows else d.name, [int(r["epoch"]) for r in rows]))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="wsml-load-"))
    work.mkdir(parents=True, exist_ok=True)
    if (work / "ray_results" / NAME).exists() or (work / "mlflow.db").exists():
        print(f"error: {work} already holds a load sweep: pass an empty --workdir", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    space = work / "space.yaml"
    write_space(space, args.trials, args.max_train_images)
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node,
                                                            "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node)
        cluster.wait_for_nodes()
        print(f"cluster: {args.nodes} nodes x {args.cpus_per_node} CPU at {cluster.address} "
              f"({time.time() - t0:.0f} s to start)", flush=True)
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
            env.pop(k, None)
        env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true",
                   RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/",
                   TUNE_MAX_PENDING_TRIALS_PG=str(args.nodes * args.cpus_per_node))
        cmd = [sys.executable, str(SWEEP), "--dataset", "digits", "--space", str(space), "--name", NAME,
               "--address", cluster.address, "--results-dir", str(work / "results")]
        log_path = work / "driver.log"
        start = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
            peak = 0
            while True:
                peak = max(peak, peak_kib(proc.pid) or 0)
                # the driver's own rusage (and that of the few commands it ran and waited for)
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.5)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - start
        usage_peak = usage.ru_maxrss                                           # KiB on Linux
    finally:
        cluster.shutdown()
    tail = log_path.read_text().strip().splitlines()[-15:]
    if proc.returncode != 0:
        print("\n".join(tail))
        print(f"error: the sweep exited with status {proc.returncode} after {wall:.0f} s (log: {log_path})")
        return 1

    trials = ray_trials(work / "ray_results" / NAME)
    ray_ids = Counter(tid for tid, _ in trials)
    short = [tid for tid, epochs in trials if epochs != [1, 2]]

    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = c.get_experiment_by_name(NAME)
    runs = list(c.search_runs([exp.experiment_id], max_results=50000))
    children = [r for r in runs if r.data.tags.get("wsml.role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("wsml.role") == "sweep"]
    run_ids = Counter(r.data.tags.get("wsml.trial_id") for r in children)
    duplicates = sum(n - 1 for n in run_ids.values() if n > 1) + sum(n - 1 for n in ray_ids.values() if n > 1)
    unfinished = [r.info.run_id for r in children + parents if r.info.status != "FINISHED"]
    sample = children[: min(20, len(children))]             # each epoch logged once (a sample: one call per run)
    bad_history = [r.info.run_id for r in sample
                   if sorted(int(m.step) for m in c.get_metric_history(r.info.run_id, "val_map")) != [1, 2]]

    print(f"sweep: {args.trials} trials x 2 epochs, {args.max_train_images} training images each, "
          f"{args.nodes} nodes x {args.cpus_per_node} CPU")
    print(f"wall time {wall:.0f} s ({wall / max(1, len(trials)):.2f} s per trial)")
    print(f"driver peak memory {max(peak, usage_peak) / 1024:.0f} MiB (VmHWM sampled {peak / 1024:.0f} MiB, "
          f"wait4 ru_maxrss {usage_peak / 1024:.0f} MiB)")
    print(f"Ray: {len(trials)} trial folders, {len(ray_ids)} distinct trial ids, {len(short)} without epochs 1-2")
    print(f"MLflow: {len(parents)} sweep run, {len(children)} child runs, {len(run_ids)} distinct trial ids, "
          f"{len(unfinished)} not FINISHED; {len(sample) - len(bad_history)}/{len(sample)} sampled runs with "
          "val_map at steps 1, 2")
    ok = (len(trials) == len(ray_ids) == len(children) == len(run_ids) == args.trials and set(ray_ids) == set(run_ids)
          and not duplicates and not unfinished and not short and not bad_history and len(parents) == 1)
    print(f"load {len(trials)} trials / {len(children)} runs / {duplicates} duplicates / "
          f"{len(unfinished)} not finished")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
