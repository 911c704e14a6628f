"""What a small co-runner costs the decoder: offline decoding in length-sorted batches, alone and
beside a second process that takes a core in short bursts, as a server's front end does.

The co-runner spins `--busy-ms`, sleeps `--idle-ms`, and again (a quarter of one core by default:
about the share the gRPC front end's event loop takes under load), at the scheduling `--policy`
given (normal, nice 19, or SCHED_IDLE). Each repeat times the decoding alone, then beside the
co-runner. Prints the seconds of each, the median ratio beside / alone, and how many bursts a
second the co-runner got through (what it was given of the cores).

On two cores, a team of two OpenMP threads waits at the end of every parallel region for a member
the scheduler has handed to the co-runner, while one thread decodes beside it unhindered: compare
`--threads 2` with `--threads 1`.

    python benchmarks/corunner.py runs/multi30k-en-de/best.pt --threads 2 --repeats 3
    python benchmarks/corunner.py runs/multi30k-en-de/best.pt --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from translator.checkpoint import load_checkpoint
from translator.decoding import DecodeOptions
from translator.runtime import keep_freed_memory
from translator.translate import Translator

CORPUS = Path(__file__).resolve().parents[2] / "shared/data/multi30k/test_2016_flickr.en.gz"
POLICIES = ("normal", "nice19", "idle")


def corunner(stop, bursts, busy_s: float, idle_s: float, policy: str) -> None:
    """Spin busy_s, sleep idle_s, until stop; counts its bursts."""
    if policy == "nice19":
        os.nice(19)
    elif policy == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    while not stop.is_set():
        end = time.perf_counter() + busy_s
        while time.perf_counter() < end:
            pass
        bursts.value += 1
        time.sleep(idle_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--sentences", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--busy-ms", type=float, default=1.0)
    p.add_argument("--idle-ms", type=float, default=3.0)
    p.add_argument("--policy", choices=POLICIES, default="normal")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    ckpt = load_checkpoint(args.checkpoint)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer, DecodeOptions(beam_size=args.beam_size))
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        lines = [line.strip() for _, line in zip(range(args.sentences), f)]
    by_length = sorted(lines, key=lambda s: len(s.split()))
    translator.translate(by_length[:8])  # warm-up

    def decode_all() -> float:
        start = time.perf_counter()
        for k in range(0, len(by_length), args.batch_size):
            translator.translate(by_length[k : k + args.batch_size])
        return time.perf_counter() - start

    alone, beside, rates = [], [], []
    for _ in range(args.repeats):
        alone.append(decode_all())
        stop, bursts = mp.Event(), mp.Value("l", 0, lock=False)
        proc = mp.Process(target=corunner, args=(stop, bursts, args.busy_ms / 1000, args.idle_ms / 1000, args.policy))
        proc.start()
        time.sleep(0.2)
        first = bursts.value
        beside.append(decode_all())
        rates.append((bursts.value - first) / beside[-1])
        stop.set()
        proc.join()
    ratio = statistics.median(beside) / statistics.median(alone)
    out = {"threads": args.threads, "policy": args.policy, "busy_ms": args.busy_ms, "idle_ms": args.idle_ms,
           "alone_s": alone, "beside_s": beside, "corunner_bursts_per_s": rates, "beside_over_alone": ratio}
    print(f"{args.threads} thread(s), co-runner {args.busy_ms} ms busy / {args.idle_ms} ms idle, {args.policy}: "
          f"alone {[round(x, 3) for x in alone]} s, beside {[round(x, 3) for x in beside]} s, "
          f"median beside / alone {ratio:.2f}; co-runner bursts/s {[round(r) for r in rates]}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
