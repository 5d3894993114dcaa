"""How fast one trial trains and evaluates, per device: the table `--dry-run` estimates from.

Two workloads are in the table, the two the shipped space files run:

* `resnet50`: the benchmarks' ResNet-50 at 448 x 448, batch 16, bf16 autocast +
  channels_last on a GPU. The **H200 is measured** (`bench/gpu.py`,
  docs/performance.md): the eager step 692 images/s, the whole step as one CUDA graph
  (`train: {cuda_graph: true}`) 937 images/s for one trial alone in its process,
  and an epoch read from the image cache through the trainer's real input
  pipeline kept 90 % of its synthetic-input rate (849 of 938 images/s).
  Evaluation (a forward pass, no backward, no optimizer) has not been measured
  yet: it is taken as 3x the eager step (a forward pass is about a third of a
  training step's arithmetic); `bench/gpu.py` now prints it, so the next GPU
  run replaces the estimate. **Every other GPU is estimated** from the H200's
  figures scaled by the ratio of dense bf16 tensor-core TFLOP/s in NVIDIA's
  datasheets (H200/H100 SXM 989, A100 312, L40S 362, L4 121, A10 125; the A10G
  of AWS's g5 instances has no datasheet of its own and is taken as the A10).
  That ratio is pessimistic for slower GPUs: the H200 runs this step at about
  5 % of its peak (launch- and memory-bound), so a slower GPU loses less than
  its TFLOP/s say. Other image sizes are scaled by the pixel count.
* `smallcnn`: the built-in digits' small CNN at 32 x 32 on CPU cores, measured
  by `bench/packing.py` on a 2-core Xeon VM: one single-threaded trial 996
  training images/s, one trial with 2 threads 1,777; evaluation, not measured,
  3x training as above.

A GPU measured with `bench/gpu.py` (its last lines print the row) goes into
`GPUS` with `measured=True` and its own figures.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestration.common import SweepError

REFERENCE = "H200"
FORWARD_SHARE = 3.0     # evaluation images/s per training images/s: a forward pass is ~1/3 of a step


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float          # dense bf16 tensor-core TFLOP/s (NVIDIA datasheet)
    source: str
    measured: bool = False


GPUS = {g.name: g for g in (
    Gpu("H200", 989, "measured with bench/gpu.py (docs/performance.md)", measured=True),
    Gpu("H100", 989, "estimated: H200 figures x 989/989 dense bf16 TFLOP/s (H100 SXM datasheet)"),
    Gpu("A100", 312, "estimated: H200 figures x 312/989 dense bf16 TFLOP/s (A100 datasheet)"),
    Gpu("L40S", 362, "estimated: H200 figures x 362/989 dense bf16 TFLOP/s (L40S datasheet)"),
    Gpu("L4", 121, "estimated: H200 figures x 121/989 dense bf16 TFLOP/s (L4 datasheet)"),
    Gpu("A10", 125, "estimated: H200 figures x 125/989 dense bf16 TFLOP/s (A10 datasheet)"),
    Gpu("A10G", 125, "estimated: H200 figures x 125/989 dense bf16 TFLOP/s (the A10's datasheet: AWS's A10G "
                     "has none of its own)"),
)}
DEFAULT_GPU = "A10G"        # cluster.yaml's GPU workers (g5 instances)

# ResNet-50, 448 px, batch 16, bf16 + channels_last, on the H200 (bench/gpu.py, docs/performance.md).
H200_STEP_EAGER = 692.0         # images/s, synthetic input
H200_STEP_GRAPH = 937.0         # images/s, CUDA graph, one trial alone in its process
PIPELINE_SHARE = 849.0 / 938.0  # an epoch through the real input pipeline vs synthetic input
# The digits' small CNN on CPU cores (bench/packing.py, 2-core Xeon VM, torch 2.14).
CPU_ONE_THREAD = 996.0          # images/s, one trial, one thread
CPU_TWO_THREADS = 1777.0        # images/s, one trial, two threads


@dataclass(frozen=True)
class Rate:
    """What one trial gets on one device (or its share of it)."""

    device: str                 # "H200", "A10G", ... or "CPU"
    train: float                # training images/s (an epoch through the input pipeline)
    evaluate: float             # evaluation images/s
    source: str


def gpu_names() -> list[str]:
    return list(GPUS)


def find_gpu(name: str) -> Gpu | None:
    """The table's GPU for a device name as CUDA or Ray report it ("NVIDIA H200", "A10G", "NVIDIA A100-SXM4-80GB")."""
    upper = name.upper().replace("NVIDIA", "").replace("-", " ").replace("_", " ").split()
    for token in upper:
        if token in GPUS:
            return GPUS[token]
    return None


def gpu_rate(gpu: str, arch: str, image_size: int, cuda_graph: bool) -> Rate:
    """A trial's rate on a whole GPU of the table (SweepError naming the table when it is not there)."""
    if arch != "resnet50":
        raise SweepError(f"no GPU throughput for the {arch} model in orchestration/cost/throughput.py: only resnet50 "
                         "is measured on GPUs; measure it with bench/gpu.py")
    g = GPUS.get(gpu)
    if g is None:
        raise SweepError(f"GPU {gpu!r} is not in the throughput table (orchestration/cost/throughput.py): pass "
                         f"--gpu-type one of {', '.join(GPUS)}, or measure it with bench/gpu.py")
    scale = g.bf16_tflops / GPUS[REFERENCE].bf16_tflops * (448 / image_size) ** 2
    step = H200_STEP_GRAPH if cuda_graph else H200_STEP_EAGER
    source = g.source + ("" if image_size == 448 else f"; scaled from 448 to {image_size} px by pixel count")
    source += "; evaluation estimated as 3x the eager step"
    return Rate(device=g.name, train=step * PIPELINE_SHARE * scale,
                evaluate=H200_STEP_EAGER * FORWARD_SHARE * scale, source=source)


def cpu_rate(arch: str, cpus: float) -> Rate:
    """A CPU trial's rate with `cpus` cores (SweepError for a model not measured on CPUs)."""
    if arch != "smallcnn":
        raise SweepError(f"no CPU throughput for the {arch} model in orchestration/cost/throughput.py: a {arch} sweep "
                         "needs GPUs (gpus_per_trial > 0)")
    # below one core, trials share it (4 one-thread trials on 2 cores: 1,824 images/s together)
    train = CPU_ONE_THREAD * min(cpus, 1.0) if cpus <= 1 else CPU_TWO_THREADS / 2 * cpus
    return Rate(device="CPU", train=train, evaluate=train * FORWARD_SHARE,
                source="measured with bench/packing.py on a 2-core Xeon VM (training; evaluation estimated as 3x)")
