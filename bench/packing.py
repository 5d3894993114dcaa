"""How many digits trials to pack per CPU (and per GPU), by measured aggregate throughput.

Each trial is a separate process that builds the trainer (`wsml.trainer.Trainer`,
digits, LL-R at delta_rel 2, the default small CNN) and runs its training loop
as `Trainer.train_epoch` does (batches of the in-memory mosaics, normalisation
and flips, forward, the large-loss rule, backward, Adam), from epoch 2 on so the
rule modifies entries. After a warm-up all trials of a setting start together
(a barrier) and count the images they train in the same window; the figure is
their sum (images/s). Evaluation is left out: it is a few percent of a digits
epoch and shares the cores the same way.

CPU settings (trials x torch threads each) share this machine's cores
differently: 1 x all cores, 1 x 1, N x 1 with N = the cores (one per core), and
2N x 1 (two per core, oversubscribed). Settings are measured in alternating
rounds (best of --rounds per setting), so a neighbour's load hits all of them.
Where CUDA exists, 1, 2 and 4 trials on one GPU (fractional packing, one CPU
thread each) are measured the same way.

Prints the table and the recommended `resources:` for search_spaces/digits.yaml:
the setting with the most images/s, preferring fewer concurrent trials when
within 5 % (ASHA sees results sooner). Last line:
`packing ratio <recommended setting / one trial with the whole device> (cpus_per_trial <x>, gpus_per_trial <y>)`
(the CPU figure where measured, else the GPU's).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time

WITHIN = 0.05       # a setting with fewer trials wins when within 5 % of the best


def _worker(device: str, threads: int, warmup: float, seconds: float, barrier, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from wsml.config import TrainConfig
    from wsml.data.loading import load_data
    from wsml.trainer import Trainer

    cfg = TrainConfig(dataset="digits", scheme="LL-R", delta_rel=2.0, device=device, num_workers=0).resolve()
    data = load_data(cfg)
    trainer = Trainer(cfg, data, torch.device(device), log=lambda _m: None)
    trainer.model.train()
    cuda = device.startswith("cuda")
    n, bs = len(data.train.labels), cfg.batch_size

    def batches():
        """Endless epochs of (index, images, flips), as train_epoch draws them (epoch 2 on)."""
        epoch = 2
        while True:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g).numpy()
            flips = torch.rand(n, generator=g) < 0.5
            order = [np.sort(perm[i:i + bs]) for i in range(0, n, bs)]
            for b, (index, images) in enumerate(trainer.loader(data.train.images, order)):
                yield epoch, index, images, flips[b * bs: b * bs + len(index)]
            epoch += 1

    def step(item) -> int:
        epoch, index, images, flip = item
        x = trainer.to_input(images, flip)
        trainer._step(x, index.to(trainer.device, non_blocking=True), epoch)
        return len(index)

    stream = batches()
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        step(next(stream))
    if cuda:
        torch.cuda.synchronize()
    barrier.wait()
    count, steps, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += step(next(stream))
        steps += 1
        if cuda and steps % 8 == 0:       # keep the clock honest: no more than 8 steps queued
            torch.cuda.synchronize()
    if cuda:
        torch.cuda.synchronize()
    queue.put(count / (time.perf_counter() - start))


def measure(device: str, trials: int, threads: int, warmup: float, seconds: float) -> float:
    """Aggregate training images/s of `trials` processes with `threads` torch threads each."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(trials), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(device, threads, warmup, seconds, barrier, queue))
             for _ in range(trials)]
    for p in procs:
        p.start()
    try:
        rates = [queue.get(timeout=warmup + seconds + 300) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return sum(rates)


def pick(rows: list[tuple[int, int, float]]) -> tuple[int, int, float]:
    """Most images/s; among settings within WITHIN of it, the one with fewest trials."""
    best = max(r[2] for r in rows)
    return min((r for r in rows if r[2] >= (1 - WITHIN) * best), key=lambda r: (r[0], -r[2]))


def fmt_cpus(x: float) -> str:
    return f"{x:g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="timing window per setting")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of training before the window")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; best of them per setting")
    p.add_argument("--cores", type=int, default=None, help="cores to share (default: this machine's)")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--skip-gpu", action="store_true")
    args = p.parse_args(argv)

    import torch

    cores = args.cores or os.cpu_count() or 1
    cpu_name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"digits trials (small CNN, batch 32, LL-R): training images/s summed over concurrent trials; "
          f"{args.warmup:g} s warm-up, {args.seconds:g} s window, best of {args.rounds} alternating rounds")
    print(f"machine: {cores} cores ({cpu_name}), torch {torch.__version__}, load average {load:.1f} at start")

    cpu_pick = gpu_pick = None
    ratio = None
    if not args.skip_cpu:
        settings = sorted({(1, cores), (1, 1), (cores, 1), (2 * cores, 1)})
        best: dict[tuple[int, int], float] = {}
        for r in range(args.rounds):
            order = settings if r % 2 == 0 else settings[::-1]
            for trials, threads in order:
                rate = measure("cpu", trials, threads, args.warmup, args.seconds)
                best[(trials, threads)] = max(best.get((trials, threads), 0.0), rate)
        rows = [(t, th, best[(t, th)]) for t, th in settings]
        alone = best[(1, 1)]
        print(f"\nCPU ({cores} cores)")
        print(f"{'trials x threads':>17} {'images/s':>9} {'per trial':>10} {'vs 1 x 1':>9}")
        for t, th, rate in rows:
            print(f"{f'{t} x {th}':>17} {rate:9.0f} {rate / t:10.0f} {rate / alone:8.2f}x")
        # candidates use every core (1 x 1 leaves the others idle: it is the per-trial reference);
        # Ray gives a trial OMP_NUM_THREADS = floor(cpus_per_trial), at least 1
        whole = best[(1, cores)]
        t, th, rate = pick([r for r in rows if r[0] * r[1] >= cores])
        cpus = cores / t
        cpu_pick = (t, th, rate, cpus)
        print(f"recommended: {t} trial(s) x {th} thread(s) on {cores} cores -> cpus_per_trial {fmt_cpus(cpus)} "
              f"({rate:.0f} images/s, {rate / whole:.2f}x one trial with all {cores} cores)")
        ratio = rate / whole

    if not args.skip_gpu:
        if not torch.cuda.is_available():
            print("\nGPU: no CUDA device here (nothing measured); run this on a GPU machine for gpus_per_trial")
        else:
            print(f"\nGPU: {torch.cuda.get_device_name()} (1 CPU thread per trial)")
            settings = [1, 2, 4]
            best_g: dict[int, float] = {}
            for r in range(args.rounds):
                for trials in (settings if r % 2 == 0 else settings[::-1]):
                    rate = measure("cuda", trials, 1, args.warmup, args.seconds)
                    best_g[trials] = max(best_g.get(trials, 0.0), rate)
            print(f"{'trials':>7} {'images/s':>9} {'per trial':>10} {'vs 1':>6}")
            for t in settings:
                print(f"{t:7d} {best_g[t]:9.0f} {best_g[t] / t:10.0f} {best_g[t] / best_g[1]:5.2f}x")
            t, _, rate = pick([(t, 1, best_g[t]) for t in settings])
            gpu_pick = (t, rate, 1.0 / t)
            print(f"recommended: {t} trial(s) per GPU -> gpus_per_trial {1.0 / t:g} ({rate:.0f} images/s)")
            if ratio is None:
                ratio = rate / best_g[1]

    cpus = fmt_cpus(cpu_pick[3]) if cpu_pick else "-"
    gpus = f"{gpu_pick[2]:g}" if gpu_pick else "-"
    print(f"packing ratio {ratio:.2f} (cpus_per_trial {cpus}, gpus_per_trial {gpus})" if ratio is not None
          else "packing ratio - (nothing measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
