"""On a machine with NVIDIA GPUs: training and evaluation throughput, MFU, and arms in parallel.

    .venv/bin/python -m bench.gpu [--steps 20] [--peak-tflops 989]   # needs CUDA; skips cleanly without
    .venv/bin/python -m bench.gpu --cpu-check                       # the same code on a tiny model, on a CPU

Measured, on a randomly initialised model of the seed recipe's size (GPT-2 medium: 24 layers, width
1024, 355M parameters; throughput does not depend on the weights, and the machine needs no Hub
access), with the seed's shapes (512-token rows, batch 4 x grad-accum 8) and bf16 autocast:
- training tokens/s of a full and a LoRA arm, through the arms' own code (ftcore.training.train_arm),
  and their model FLOPs utilisation: MFU = FLOPs per token x tokens/s / the GPU's peak bf16 FLOP/s,
  with 6N + 12 L d T FLOPs per trained token for full fine-tuning (N parameters, L layers, width d,
  T tokens of context; PaLM, Chowdhery et al. 2022, appendix B) and 4N + 12 L d T for LoRA (the
  frozen weights need no weight gradients; the adapters' own FLOPs are negligible);
- evaluation tokens/s (ftcore.perplexity.score_rows, batch 8, bf16);
- with 3 or more GPUs: three arms (full, full with the replay arm's shape, LoRA) each in its own
  process on its own GPU, as the subprocess executor runs them, against the slowest of them alone:
  the wall-time ratio says how close the arms come to running for free in parallel.
Results go to bench/results/gpu.json (BENCHMARKS.md, section 10).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import Clock, record

# Dense bf16 peak FLOP/s per GPU (vendor datasheets, without sparsity); --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0}
SEED_SHAPE = {"n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257, "n_positions": 1024}
TINY_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512, "n_positions": 128}


def build_model(root: Path, shape: dict) -> Path:
    """A random GPT-2 of `shape` and a word-level tokenizer of its vocabulary, saved under root/model."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = root / "model"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(out)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t1")
    tokenizer.save_pretrained(out)
    return out


def write_rows(root: Path, n: int, length: int, vocab: int) -> str:
    """Random training rows (every token in the loss) as the tokenize step writes them."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(2, vocab, length).tolist() for _ in range(n)]
    pd.DataFrame({"input_ids": ids, "completion_mask": [[1] * length] * n}).to_parquet(root / "train.parquet")
    return "train.parquet"


def plan_for(root: Path, model_dir: Path, method: str, steps: int, length: int, device: str, tiny: bool):
    from ftcore.config import LoraSpec, TrainSpec
    from ftcore.plan import ArmPlan, ModelRef

    batch, accum = (2, 2) if tiny else (4, 8)
    train = TrainSpec(batch_size=batch, grad_accum=accum, max_steps=steps, logging_steps=steps, save_steps=10**6,
                      warmup_ratio=0.0)
    rows = write_rows(root, batch * accum * steps, length, 512 if tiny else SEED_SHAPE["vocab_size"])
    lora = LoraSpec() if method == "lora" else None
    return ArmPlan(name=method, label=method, seed=0, method=method, replay_ratio=0.0, lora=lora, train=train,
                   learning_rate=lora.learning_rate if lora else train.learning_rate, chunk_len=length,
                   precision="fp32" if tiny else "bf16", device=device, trackers=(),
                   model=ModelRef(source="local", name=str(model_dir), path=str(model_dir), digest="bench"),
                   train_rows=rows, replay_rows=None, key="bench", dir=f"train-{method}")


def train_throughput(method: str, steps: int, tiny: bool, device: str) -> dict:
    """Tokens/s of one arm's training loop (ftcore.training.train_arm), in a scratch directory."""
    from ftcore import training

    shape = TINY_SHAPE if tiny else SEED_SHAPE
    length = 64 if tiny else 512
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_model(root, shape)
        clock = Clock()
        started = time.perf_counter()
        training.train_arm(plan_for(root, model_dir, method, steps, length, device, tiny), root, callbacks=[clock])
        wall = time.perf_counter() - started
        params = _param_count(model_dir)
    tokens_per_s = clock.tokens / clock.seconds
    attention = 12 * shape["n_layer"] * shape["n_embd"] * length
    flops_per_token = (6 if method == "full" else 4) * params + attention
    return {"method": method, "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
            "params": params, "train_loop_s": clock.seconds, "wall_s": wall}


def _param_count(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def eval_throughput(tiny: bool, device: str) -> float:
    """Tokens/s of the study's scoring code on 512-token rows, batch 8, bf16 (fp32 for the CPU check)."""
    from transformers import AutoModelForCausalLM

    from ftcore import perplexity

    shape = TINY_SHAPE if tiny else SEED_SHAPE
    length, n = (64, 16) if tiny else (512, 64)
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(build_model(Path(tmp), shape)).to(device)
    rng = np.random.default_rng(1)
    rows = [(ids, ids, length) for ids in (rng.integers(2, shape["vocab_size"], length).tolist() for _ in range(n))]
    perplexity.score_rows(model, rows[:8], 8, 0, "fp32" if tiny else "bf16")  # warm-up
    started = time.perf_counter()
    perplexity.score_rows(model, rows, 8, 0, "fp32" if tiny else "bf16")
    return n * length / (time.perf_counter() - started)


def arms_in_parallel(steps: int) -> dict:
    """Three arms, each in its own process on its own GPU, against the slowest of them alone (walls in s)."""
    methods = ("full", "full", "lora")

    def launch(method: str, gpu: int) -> subprocess.Popen:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        return subprocess.Popen([sys.executable, "-m", "bench.gpu", "--one", method, "--steps", str(steps)],
                                env=env, stdout=subprocess.PIPE, text=True)

    started = time.perf_counter()
    procs = [launch(m, i) for i, m in enumerate(methods)]
    alone_walls = [json.loads(p.communicate()[0].strip().splitlines()[-1])["wall_s"] for p in procs]
    parallel = time.perf_counter() - started
    slowest = methods[int(np.argmax(alone_walls))]
    started = time.perf_counter()
    launch(slowest, 0).communicate()
    alone = time.perf_counter() - started
    return {"arms": list(methods), "parallel_wall_s": parallel, "slowest": slowest, "slowest_alone_wall_s": alone,
            "ratio": parallel / alone}


def peak_flops(override: float | None) -> float | None:
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name(0)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when it is not in PEAK_TFLOPS")
    parser.add_argument("--cpu-check", action="store_true", help="run the code on a tiny model on the CPU (records nothing)")
    parser.add_argument("--one", choices=("full", "lora"), help=argparse.SUPPRESS)  # a child of arms_in_parallel
    args = parser.parse_args()
    if args.one:
        print(json.dumps(train_throughput(args.one, args.steps, tiny=False, device="cuda")))
        return 0
    if args.cpu_check:
        result = {m: train_throughput(m, 2, tiny=True, device="cpu") for m in ("full", "lora")}
        result["eval_tokens_per_s"] = eval_throughput(tiny=True, device="cpu")
        print(json.dumps(result, indent=2))
        return 0
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device on this machine; nothing measured (run it where there are GPUs)")
        return 0
    peak = peak_flops(args.peak_tflops)
    result = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "peak_bf16_tflops":
              peak / 1e12 if peak else None}
    for method in ("full", "lora"):
        run = train_throughput(method, args.steps, tiny=False, device="cuda")
        run["mfu"] = run["flops_per_token"] * run["tokens_per_s"] / peak if peak else None
        result[method] = run
    result["eval_tokens_per_s"] = eval_throughput(tiny=False, device="cuda")
    if torch.cuda.device_count() >= 3:
        result["three_arms"] = arms_in_parallel(args.steps)
    record("gpu", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
