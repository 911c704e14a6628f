"""The serving engine under closed-loop load without gRPC: what the batcher and the searches deliver
on their own, set against offline decoding in the same process.

`TranslationService` with its engine on the main thread (as `nmt-serve` runs it) and C clients as
coroutines on an event loop thread (as the gRPC front end runs them) that each send one sentence,
await its answer and send the next. No network, no protobuf, no load generator process: what this
loses against offline decoding in batches of C is the engine's own (joins, bookkeeping, batch
occupancy); what `benchmarks/load.py` loses beyond it is the front end's and the transport's.

Also prints, for the served and the offline runs alike, the mean rows per decoder step, the
sentences per encoder pass, and the milliseconds per sentence spent in decoder steps, in the
encoder and in everything else (search and batcher bookkeeping, waiting), timed on the model's
calls, and the decoder cache's drops of finished rows (how many, milliseconds each, and the
engine thread's CPU milliseconds each: the rest is waiting, for the GIL; part of everything
else): where the engine loses against offline decoding.

    python benchmarks/engine_load.py runs/bench/best.pt --concurrency 32 --repeats 3
    python benchmarks/engine_load.py runs/bench/best.pt --concurrency 32 --set max_join_delay_ms=5
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from translator.batcher import BatcherConfig
from translator.cache import DecoderCache
from translator.checkpoint import load_checkpoint
from translator.decoding import DecodeOptions
from translator.model_info import ModelIdentity
from translator.requests import RequestOptions
from translator.runtime import keep_freed_memory
from translator.service import TranslationService
from translator.translate import Translator

CORPUS = Path(__file__).resolve().parents[2] / "shared/data/multi30k/test_2016_flickr.en.gz"


class Counts:
    """Decoder steps, their rows and encoder passes, counted and timed on one model's calls; and
    the decoder cache's drops of finished rows (every cache's, while these counts live)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.reset()
        decode_step, encode, drop = model.decode_step, model.encode, DecoderCache.drop

        def counted_step(tgt_new, cache, record_alignment=False):
            start = time.perf_counter()
            out = decode_step(tgt_new, cache, record_alignment)
            self.step_s += time.perf_counter() - start
            self.steps += 1
            self.rows += tgt_new.size(0)
            return out

        def counted_encode(src):
            start = time.perf_counter()
            out = encode(src)
            self.encode_s += time.perf_counter() - start
            self.encodes += 1
            self.encoded += src.size(0)
            return out

        def counted_drop(cache, keep):
            start, cpu = time.perf_counter(), time.thread_time()
            out = drop(cache, keep)
            self.drop_s += time.perf_counter() - start
            self.drop_cpu_s += time.thread_time() - cpu
            self.drops += 1
            return out

        model.decode_step, model.encode = counted_step, counted_encode
        DecoderCache.drop = counted_drop

    def reset(self) -> None:
        self.steps = self.rows = self.encodes = self.encoded = self.drops = 0
        self.step_s = self.encode_s = self.drop_s = self.drop_cpu_s = 0.0

    def per_sentence(self, sentences: int, seconds: float) -> dict:
        """Milliseconds per sentence in decoder steps, in the encoder and in everything else."""
        step, encode = 1000 * self.step_s / sentences, 1000 * self.encode_s / sentences
        return {"rows_per_step": self.rows / max(self.steps, 1), "sentences_per_encoder_pass": self.encoded / max(
                self.encodes, 1), "decoder_ms": step, "encoder_ms": encode,
                "rest_ms": 1000 * seconds / sentences - step - encode,
                "drops": self.drops, "ms_per_drop": 1000 * self.drop_s / max(self.drops, 1),
                "cpu_ms_per_drop": 1000 * self.drop_cpu_s / max(self.drops, 1)}


def closed_loop(service: TranslationService, sentences: list[str], clients: int, beam: int) -> dict:
    """Run the engine here while `clients` coroutines on a loop thread send every sentence once."""
    latencies: list[float] = []
    todo = iter(sentences)
    options = RequestOptions(beam_size=beam)

    async def client() -> None:
        for s in todo:
            start = time.perf_counter()
            await service.translate_async([s], options)
            latencies.append(time.perf_counter() - start)

    async def all_clients() -> None:
        await asyncio.gather(*(client() for _ in range(clients)))

    def on_loop() -> None:
        try:
            asyncio.run(all_clients())
        finally:
            service.stop()

    start = time.perf_counter()
    cpu = time.process_time()
    loop_thread = threading.Thread(target=on_loop, name="clients")
    loop_thread.start()
    service.run_engine()
    loop_thread.join()
    seconds = time.perf_counter() - start
    latencies.sort()
    return {"sentences_per_s": len(sentences) / seconds, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "cpu_ms_per_sentence": 1000 * (time.process_time() - cpu) / len(sentences)}


def offline_in_batches(translator: Translator, sentences: list[str], size: int, counts: Counts) -> dict:
    """Length-sorted batches of at most `size`, as benchmarks/load.py decodes them offline."""
    by_length = sorted(sentences, key=lambda s: len(s.split()))
    counts.reset()
    start = time.perf_counter()
    for k in range(0, len(by_length), size):
        translator.translate(by_length[k : k + size])
    seconds = time.perf_counter() - start
    return {"sentences_per_s": len(sentences) / seconds, **counts.per_sentence(len(sentences), seconds)}


def parse_set(items: list[str]) -> dict:
    fields = {f.name: f.type for f in dataclasses.fields(BatcherConfig)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {key}: not a batching setting ({', '.join(fields)})")
        out[key] = value.lower() == "true" if fields[key] in (bool, "bool") else float(value)
        if fields[key] in (int, "int"):
            out[key] = int(out[key])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--sentences", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="batching setting, repeatable")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        sentences = [line.strip() for _, line in zip(range(args.sentences), f)]
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer, DecodeOptions(beam_size=args.beam_size))
    counts = Counts(translator.model)
    translator.translate(sentences[:8])  # warm-up
    batching = BatcherConfig(**parse_set(args.set))
    runs = []
    for _ in range(args.repeats):
        offline = offline_in_batches(translator, sentences, args.concurrency, counts)
        service = TranslationService(translator, ModelIdentity("bench", "", "", ""), batching=batching,
                                     engine_thread=False)
        counts.reset()
        start = time.perf_counter()
        served = closed_loop(service, sentences, args.concurrency, args.beam_size)
        served.update(counts.per_sentence(len(sentences), time.perf_counter() - start))
        served["vs_c"] = served["sentences_per_s"] / offline["sentences_per_s"]
        served.update({f"offline_{k}": v for k, v in offline.items()})
        runs.append(served)
        print(json.dumps({k: round(v, 3) for k, v in served.items()}), flush=True)
    summary = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    result = {"concurrency": args.concurrency, "beam_size": args.beam_size, "batching": dataclasses.asdict(batching),
              "median": summary, "runs": runs}
    print(json.dumps({"median": summary}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
