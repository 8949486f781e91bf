"""Model FLOPs utilisation (MFU): achieved training FLOP/s over the device's peak, the nanoGPT / torchtitan convention.

FLOPs per trained-on token = 6 x (parameters - input embedding) + 12 x layers x heads x head_dim x sequence length:
forward and backward of every matmul, plus attention's scores and weighted values, at the row length (for packed
examples an upper bound: each example attends only to itself). Recomputation under gradient checkpointing is not
counted (it is not useful work).

The peak: on a GPU, its dense bf16 figure from the table below whatever the run's precision (an unknown GPU gives no
MFU); on a CPU, this process's dense matmul rate measured at start-up in the run's compute dtype (bf16 under bf16
autocast or with bf16 weights, else fp32; fp16 weights give no MFU), at its torch thread count: a CPU has no
published peak that matmuls reach, so MFU there says how far training is from the machine's own best matmul.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

# dense bf16 TFLOP/s; matched against torch.cuda.get_device_name, most specific first
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", None), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L4", 121.0), ("RTX 4090", 165.0))
# (m, k, n) of the start-up measurement: 0.02 s a call in fp32 on one thread, at the rate of 2048^3 (measured on an
# AMD EPYC: 1024^3 100 GFLOP/s, 2048^3 96), so that the best of several calls costs a launch little
STARTUP_MATMUL = (1024, 1024, 1024)
# Measured first; where it says STARTUP_MATMUL would take longer than STARTUP_SECONDS a call (bf16 on a CPU without
# native bf16: 0.3 GFLOP/s on an AVX2-only AMD EPYC, 4 minutes for the measurement), the probe's rate is the one used
PROBE_MATMUL = (256, 256, 256)
STARTUP_SECONDS = 1.0
# bf16 slower than this share of fp32 on a CPU: --bf16 slows the run down (said at start-up)
SLOW_BF16_SHARE = 0.5
MEASURED_CPU_DTYPES = (torch.float32, torch.bfloat16)  # fp16 matmuls on a CPU without fp16 units take minutes
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def hardware() -> str:
    """The accelerator or CPU a measurement ran on, for the reports."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return f"CPU: {cpu}, {os.cpu_count()} cores"


class CpuMatmul:
    """(m x k) @ (k x n) in one dtype on the CPU, its operands and output allocated once, to be timed call by call."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, int, int] = STARTUP_MATMUL):
        m, k, n = shape
        generator = torch.Generator().manual_seed(0)  # not the global generator: measuring must not change the run's
        self.a = torch.randn(m, k, generator=generator).to(dtype)
        self.b = torch.randn(k, n, generator=generator).to(dtype)
        self.out = torch.empty(m, n, dtype=dtype)
        self.flops = 2 * m * k * n

    def seconds(self) -> float:
        """One call's wall time, at the current torch thread count."""
        started = time.perf_counter()
        torch.matmul(self.a, self.b, out=self.out)
        return time.perf_counter() - started


def cpu_matmul_flops(dtype: torch.dtype, shape: tuple[int, int, int] = STARTUP_MATMUL, calls: int = 5) -> float:
    """This process's dense matmul rate on the CPU in FLOP/s: (m x k) @ (k x n) in `dtype` at the current torch
    thread count, one warm-up call, then the fastest of `calls` timed ones: on a busy machine (a launch's other
    processes starting up beside it) the fastest call is the least disturbed one, so MFU stays below 1."""
    matmul = CpuMatmul(dtype, shape)
    matmul.seconds()  # warm-up: the library's kernels chosen, the output's pages touched
    return matmul.flops / min(matmul.seconds() for _ in range(calls))


@functools.lru_cache(maxsize=None)
def _startup_cpu_matmul(dtype: torch.dtype, threads: int) -> tuple[float, tuple[int, int, int]]:
    probe = CpuMatmul(dtype, PROBE_MATMUL)
    probe.seconds()
    best = probe.flops / min(probe.seconds() for _ in range(5))  # the first calls of a process run slow
    m, k, n = STARTUP_MATMUL
    shape = PROBE_MATMUL if 2 * m * k * n / best > STARTUP_SECONDS else STARTUP_MATMUL  # too slow: the probe's
    return cpu_matmul_flops(dtype, shape), shape


def startup_cpu_matmul(dtype: torch.dtype) -> tuple[float, tuple[int, int, int]]:
    """(FLOP/s, shape): `cpu_matmul_flops` at the start-up shape, or at the probe's where that would be slow,
    measured once per process, dtype and thread count."""
    return _startup_cpu_matmul(dtype, torch.get_num_threads())


def startup_cpu_matmul_flops(dtype: torch.dtype) -> float:
    return startup_cpu_matmul(dtype)[0]


def compute_dtype(mixed_precision: str, model: torch.nn.Module) -> torch.dtype:
    """The dtype the run's matmuls run in: bf16 under bf16 autocast, else the weights' (--dtype)."""
    if mixed_precision == "bf16":
        return torch.bfloat16
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _peak_table_entry(device: torch.device) -> Optional[tuple[str, Optional[float]]]:
    name = torch.cuda.get_device_name(device)
    return next(((key, tflops) for key, tflops in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> Optional[float]:
    """The rate MFU is against, in FLOP/s, or None: a GPU's dense bf16 peak from the table (whatever `dtype`), a
    CPU's measured matmul rate in `dtype` (fp32 or bf16); None for a GPU not in the table, fp16 on a CPU, or another
    device."""
    if device.type == "cpu":
        return startup_cpu_matmul_flops(dtype) if dtype in MEASURED_CPU_DTYPES else None
    if device.type != "cuda":
        return None
    entry = _peak_table_entry(device)
    return None if entry is None or entry[1] is None else entry[1] * 1e12


def peak_remeasurer(device: torch.device, dtype: torch.dtype = torch.float32) -> Optional[Callable[[], float]]:
    """For a measured peak (a CPU's), a function that measures it again as at start-up; None for a table's."""
    if device.type != "cpu" or dtype not in MEASURED_CPU_DTYPES:
        return None
    shape = startup_cpu_matmul(dtype)[1]
    return lambda: cpu_matmul_flops(dtype, shape)


def peak_flops_source(device: torch.device, dtype: torch.dtype = torch.float32) -> Optional[str]:
    """What `peak_flops` is, for results.json: "measured cpu bf16 matmul", "table: H100 dense bf16", or None."""
    if peak_flops(device, dtype) is None:
        return None
    if device.type == "cpu":
        return f"measured cpu {DTYPE_NAMES[dtype]} matmul"
    return f"table: {_peak_table_entry(device)[0]} dense bf16"


def flops_per_token(model_config, num_parameters: int, embedding_parameters: int, sequence_length: int) -> float:
    layers = getattr(model_config, "num_hidden_layers", 0)
    heads = getattr(model_config, "num_attention_heads", 0)
    head_dim = getattr(model_config, "head_dim", None) or (getattr(model_config, "hidden_size", 0) // max(heads, 1))
    return 6 * (num_parameters - embedding_parameters) + 12 * layers * heads * head_dim * sequence_length


def slow_bf16_warning(dtype: torch.dtype) -> str:
    """A warning for the start-up line when this CPU runs bf16 matmuls far slower than fp32 (no AVX512-BF16 or AMX:
    bf16 is emulated), else ""."""
    if dtype != torch.bfloat16:
        return ""
    bf16, fp32 = startup_cpu_matmul_flops(torch.bfloat16), startup_cpu_matmul_flops(torch.float32)
    if bf16 >= SLOW_BF16_SHARE * fp32:
        return ""
    return (f"\nWARNING: this CPU runs bf16 matmuls at {bf16 / 1e9:,.1f} GFLOP/s against {fp32 / 1e9:,.0f} in fp32 "
            f"({torch.backends.cpu.get_cpu_capability()}, no native bf16): bf16 compute (--bf16 true, --dtype "
            "bfloat16) makes this run many times slower; drop it here (bf16 pays on CPUs with AVX512-BF16 or AMX, "
            "and on GPUs)")


def idle_cores_warning() -> str:
    """`accelerate launch` without a config file sets OMP_NUM_THREADS=1: one process then uses one core of many."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    import psutil  # accelerate's dependency; physical cores, as accelerate and torch count them

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if torch.get_num_threads() * processes_here >= cores:
        return ""
    return (f"\nwarning: {torch.get_num_threads()} thread(s) x {processes_here} process(es) on {cores} cores "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}): run with python, or give accelerate "
            f"launch --config_file accelerate_configs/cpu.yaml (or --num_cpu_threads_per_process {cores // processes_here})")


def mfu_note(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Said once at start-up."""
    peak = peak_flops(device, dtype)
    if device.type == "cpu":
        if peak is None:
            return f"no MFU: {DTYPE_NAMES.get(dtype, dtype)} matmuls on a CPU are not measured (fp32 and bf16 are)"
        m, k, n = startup_cpu_matmul(dtype)[1]
        shape = f"{m}^3" if m == k == n else f"{m}x{k}x{n}"
        note = (f"MFU against this CPU's measured {DTYPE_NAMES[dtype]} matmul rate ({peak / 1e9:,.1f} GFLOP/s, "
                f"{shape}, {torch.get_num_threads()} thread(s), measured at start-up)")
        return note + slow_bf16_warning(dtype) + idle_cores_warning()
    if device.type != "cuda":
        return f"no MFU on a {device.type} device"
    if peak is not None:
        return f"MFU against the {torch.cuda.get_device_name(device)}'s dense bf16 peak"
    return f"no MFU: {torch.cuda.get_device_name(device)} is not in the peak table (recipes/core/run/throughput.py)"
