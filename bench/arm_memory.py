"""An arm's resident memory and speed step by step, curve points and checkpoints included, under each heap setting.

    .venv/bin/python -m bench.arm_memory [--preset demo-base] [--arm replay] [--steps 20] [--every 5]
                                         [--save-every 10] [--ballast-gb 0]
                                         [--variants default keep-freed short] [--out arm-memory]

Each variant trains the preset's arm for `--steps` optimizer steps, a curve point every `--every` steps and a
checkpoint every `--save-every`, in its own process, into a temporary directory (the tokenized data is prepared once
under bench-artifacts/ or $FTSTUDY_BENCH_ARTIFACTS): `default`, glibc's own settings; `keep-freed`, no mmap and no
trim (tasks.heap.keep_freed_memory), as arm processes ran until the memory fix; `short`, the same with the callback
arms now train with, which gives freed pages back whenever the available memory runs short
(tasks.heap.give_back_when_short). `--ballast-gb` holds that much memory, written, in this process while the
variants run, as the study's process does beside an arm (up to 5.9 GB in demo-base), so that memory runs short.
After every step and checkpoint the child records its resident memory (/proc/self/statm), glibc's heap (mallinfo2:
in use, free) and the memory available (tasks.heap.available_memory). Reported: each step's seconds, the peak and
last resident memory, minor page faults, the training loss and curve points (the heap settings change no number),
and for `short` the steps in (or right after) which it gave memory back.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import ARTIFACTS, record, run_child

VARIANTS = ("default", "keep-freed", "short")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_mb() -> dict[str, float]:
    """Resident memory and glibc's main heap now, in MiB: rss; in_use (allocated, heap and mmap); free (free in
    the heap: resident or not)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    mib = 2**20
    return {"rss": round(pages * os.sysconf("SC_PAGE_SIZE") / mib),
            "in_use": round((info.uordblks + info.hblkhd) / mib), "free": round(info.fordblks / mib)}


def child(preset: str, arm: str, steps: int, every: int, save_every: int, variant: str) -> None:
    from transformers import TrainerCallback

    from ftcore import study, training
    from ftcore.config_files import load_config
    from ftcore.curves import read_points
    from ftcore.inputs import check_inputs
    from tasks import heap

    class Record(TrainerCallback):
        def __init__(self):
            self.rows, self.last, self.step = [], None, 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.step = state.global_step + 1

        def on_train_begin(self, args, state, control, **kwargs):
            self._row(state, "begin")

        def on_step_end(self, args, state, control, **kwargs):
            self._row(state, "step")

        def on_save(self, args, state, control, **kwargs):
            self._row(state, "save")

        def _row(self, state, event):
            now = time.perf_counter()
            available = heap.available_memory()
            self.rows.append({"step": state.global_step, "event": event,
                              "seconds": round(now - self.last, 2) if self.last else None, **heap_mb(),
                              "available": round(available[0] / 2**20) if available else None})
            self.last = now

    base = load_config(preset)
    cfg = load_config(preset, artifacts_dir=str(ARTIFACTS),
                      train={**base.train.model_dump(), "max_steps": steps, "logging_steps": 1,
                             "save_steps": save_every},
                      eval={**base.eval.model_dump(), "every_steps": every})
    p = study.prepare(check_inputs(cfg, arms_in_process=True))
    plan = next(x for x in study.plan_arms(p) if x.name == arm)
    if variant != "default" and not heap.keep_freed_memory("cpu"):
        raise SystemExit(f"{variant}: glibc's mallopt refused")
    rec = Record()
    given = []  # the steps in (or right after) which the variant `short` gave freed memory back

    def give_back() -> bool:
        given.append(rec.step)
        return heap.give_back_freed_memory()

    callbacks = [heap.give_back_when_short(give_back=give_back)] if variant == "short" else []
    with tempfile.TemporaryDirectory() as out:
        summary = training.train_arm(plan.model_copy(update={"dir": out}), p.root, callbacks=[*callbacks, rec])
        points = [{k: pt[k] for k in ("step", "set", "ppl")} for pt in read_points(out)]
    steps_s = [r["seconds"] for r in rec.rows if r["event"] == "step" and r["step"] % every and r["seconds"]]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"variant": variant, "given_back_in_steps": given, "train_loss": summary["train_loss"],
                      "points": points, "median_step_s": statistics.median(steps_s) if steps_s else None,
                      "peak_rss_mb": round(usage.ru_maxrss / 1024), "last_rss_mb": rec.rows[-1]["rss"],
                      "minor_faults": usage.ru_minflt, "rows": rec.rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo-base")
    parser.add_argument("--arm", default="replay")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="optimizer steps between curve points")
    parser.add_argument("--save-every", type=int, default=10, help="optimizer steps between checkpoints")
    parser.add_argument("--ballast-gb", type=float, default=0.0, help="memory held beside the arm, in GB")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", default="arm-memory", help="bench/results/OUT.json")
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    shape = ["--preset", args.preset, "--arm", args.arm, "--steps", str(args.steps), "--every", str(args.every),
             "--save-every", str(args.save_every)]
    if args.child:
        return child(args.preset, args.arm, args.steps, args.every, args.save_every, args.child)
    ballast = bytearray(b"\x01") * int(args.ballast_gb * 1e9)  # written: resident, as a process's data is
    runs = {}
    for name in args.variants:
        try:
            runs[name] = run_child("bench.arm_memory", [*shape, "--child", name])
        except SystemExit as failed:  # killed for memory, say: what the variant did
            runs[name] = {"variant": name, "failed": str(failed)[-2000:], "rows": []}
    del ballast
    for name, r in runs.items():
        print(name, r.get("given_back_in_steps"), "steps:", " ".join(
            f"{x['step']}{x['event'][0]}:{x['rss']}/{x['in_use']}/{x['free']}/{x['available']}"
                                       for x in r["rows"]))
    record(args.out, {"preset": args.preset, "arm": args.arm, "steps": args.steps, "every": args.every,
                      "save_every": args.save_every, "ballast_gb": args.ballast_gb,
                      "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9, 1),
                      "runs": runs})


if __name__ == "__main__":
    main()
