"""This CPU's matrix-multiply throughput in fp32 and under bf16 autocast, and what precision 'auto' picks.

    .venv/bin/python -m bench.precision [--size 2048] [--repeats 5]

A linear layer of `--size` inputs and outputs applied to `--size` rows (2·size³ FLOPs per call), in
fp32 and under bf16 autocast (what ftstudy's training and evaluation use), median of `--repeats`
calls after one warm-up, in GFLOP/s. The bf16 figure is the peak the per-stage shares in
BENCHMARKS.md are taken against on a CPU with native bf16 (AVX512-BF16 or AMX); without it bf16 is
emulated, and ftcore.hardware.resolve_precision('auto', 'cpu') keeps such a CPU in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import record
from ftcore.hardware import cpu_has_native_bf16, resolve_precision


def gflops(fn, flops: float, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.size
    layer, x = torch.nn.Linear(n, n), torch.randn(n, n)

    def bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    def fp32():
        with torch.inference_mode():
            return layer(x)

    flops = 2.0 * n**3
    fp32_rate, bf16_rate = gflops(fp32, flops, args.repeats), gflops(bf16, flops, args.repeats)
    record("precision", {"threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(), "size": n,
                         "fp32_gflops": round(fp32_rate, 1), "bf16_autocast_gflops": round(bf16_rate, 1),
                         "bf16_over_fp32": round(bf16_rate / fp32_rate, 3),
                         "auto_picks": resolve_precision("auto", "cpu")})


if __name__ == "__main__":
    main()
