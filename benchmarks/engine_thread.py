"""Why decoding runs on the thread that loaded the model: one sentence at a time, greedy, timed on
the main thread, then on a second thread of the same process (the old server's layout: the main
thread loaded the model, a worker thread decoded).

Each thread that starts OpenMP work gets a team of its own; with more OpenMP threads than cores,
libgomp stops spinning between parallel regions and every region pays a futex wake-up. Prints
the median time per sentence of each layout and their ratio.

    python benchmarks/engine_thread.py runs/multi30k-en-de/best.pt --sentences 50 --repeats 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from translator.checkpoint import load_checkpoint
from translator.decoding import DecodeOptions
from translator.runtime import keep_freed_memory
from translator.translate import Translator

CORPUS = Path(__file__).resolve().parents[2] / "shared/data/multi30k/test_2016_flickr.en.gz"


def per_sentence_ms(translator: Translator, sentences: list[str], repeats: int) -> float:
    """Median over repeats of the mean time to translate one sentence at a time."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for s in sentences:
            translator.translate([s])
        runs.append((time.perf_counter() - start) / len(sentences) * 1000)
    return statistics.median(runs)


def on_second_thread(fn):
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()), name="worker")
    worker.start()
    worker.join()
    return out[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--sentences", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        sentences = [line.strip() for _, line in zip(range(args.sentences), f)]
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer, DecodeOptions(beam_size=args.beam_size))
    translator.translate(sentences[:4])  # warm-up
    main_ms = per_sentence_ms(translator, sentences, args.repeats)

    def second() -> float:
        torch.set_num_threads(args.threads)
        translator.translate(sentences[:4])
        return per_sentence_ms(translator, sentences, args.repeats)

    worker_ms = on_second_thread(second)
    result = {"beam_size": args.beam_size, "threads": args.threads, "sentences": len(sentences),
              "main_thread_ms_per_sentence": round(main_ms, 2), "second_thread_ms_per_sentence": round(worker_ms, 2),
              "second_over_main": round(worker_ms / main_ms, 2)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
