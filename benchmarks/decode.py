"""Decoding speed race on Multi30K test_2016_flickr: our search against Hugging Face `generate` and
CTranslate2 (float32 and int8) on exported copies of the same weights, and our model with torch
dynamic int8 Linear layers.

For every system, search (greedy, beam 5) and batch size (64, 1): target tokens per second (median
over --repeats passes over the sentences, after one warm-up batch), sacreBLEU, and the peak RSS of
the process that ran it: each run has a subprocess of its own, and the CTranslate2 runs never
import torch. All systems get the same length-sorted batches and the same length budget
(DecodeOptions' max_len_a * source length + max_len_b); each counts the tokens it emitted (EOS
excluded). Run it on an otherwise idle machine.

--workers N decodes N batches side by side, each on threads / N intra-op threads: for ours and
Hugging Face, N threads each translating whole batches (what `Translator(workers=N)` does); for
CTranslate2, inter_threads=N with its batches submitted asynchronously.

    python benchmarks/decode.py runs/multi30k-en-de/best.pt --repeats 3 --json decode.json
    python benchmarks/decode.py CKPT --batch-sizes 1 --limit-b1 100    # batch-1 beam is slow
    python benchmarks/decode.py CKPT --systems ours --beams 1 --batch-sizes 64 --profile
    python benchmarks/decode.py CKPT --beams 1,5 --batch-sizes 64 --breakdown   # our time, part by part
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

SYSTEMS = ("ours", "ours-int8", "hf", "ct2-fp32", "ct2-int8")
BatchFn = Callable[[list[str]], tuple[list[str], int]]  # texts -> (translations, target tokens)
RunFn = Callable[[list[list[str]]], tuple[list[str], int]]  # all batches, in order -> (translations, tokens)


# ---------------------------------------------------------------- workers: one system, one process


def output_budget(src_tokens: int, spec: dict) -> int:
    """Our output budget in steps (EOS included) for a source of src_tokens tokens (EOS included)."""
    a, b, cap = spec["max_len_a"], spec["max_len_b"], spec["max_len_cap"]
    return max(1, min(math.floor(a * src_tokens + b), cap))


def ours(spec: dict) -> BatchFn:
    import warnings

    import torch

    from translator.checkpoint import load_checkpoint
    from translator.decoding import DecodeOptions
    from translator.runtime import keep_freed_memory
    from translator.translate import Translator

    keep_freed_memory()  # as nmt-translate, nmt-evaluate and nmt-serve do
    torch.set_num_threads(spec["threads"] // spec["workers"])
    ckpt = load_checkpoint(spec["checkpoint"])
    model = ckpt.build_model()
    if spec["system"] == "ours-int8":
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated but still the eager API
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    # One search call per benchmark batch: no token limit splits it further.
    translator = Translator(model, ckpt.tokenizer, DecodeOptions(beam_size=spec["beam"]), max_batch_tokens=2**62)

    def run(texts: list[str]) -> tuple[list[str], int]:
        out = translator.translate(texts)
        return [t.text for t in out], sum(len(t.tokens) for t in out)

    return run


def hugging_face(spec: dict) -> BatchFn:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    torch.set_num_threads(spec["threads"] // spec["workers"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSeq2SeqLM.from_pretrained(spec["model_dir"]).eval()
    eos = model.generation_config.eos_token_id

    def run(texts: list[str]) -> tuple[list[str], int]:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        budget = output_budget(enc.input_ids.size(1), spec)
        with torch.inference_mode():
            out = model.generate(**enc, num_beams=spec["beam"], do_sample=False, max_new_tokens=budget)
        emitted = out[:, 1:]  # (B, T) without the decoder start token
        before_eos = (emitted == eos).cumsum(dim=1) == 0  # padding after EOS is excluded too
        return tokenizer.batch_decode(out, skip_special_tokens=True), int(before_eos.sum())

    return run


def ctranslate2_model(spec: dict) -> BatchFn:
    import ctranslate2
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=spec["spm"])
    translator = ctranslate2.Translator(
        spec["model_dir"], device="cpu", compute_type=spec["compute_type"],
        intra_threads=spec["threads"] // spec["workers"], inter_threads=spec["workers"],
    )

    def run(batches: list[list[str]]) -> tuple[list[str], int]:
        # Submitted asynchronously: with inter_threads > 1 batches run side by side.
        pending = []
        for texts in batches:
            pieces = sp.encode(texts, out_type=str)  # the model appends EOS itself
            budget = output_budget(max(map(len, pieces)) + 1, spec)
            pending.append(translator.translate_batch(
                pieces, beam_size=spec["beam"], max_decoding_length=budget, min_decoding_length=0,
                asynchronous=True,
            ))
        hyps = [r.result().hypotheses[0] for batch in pending for r in batch]
        return [sp.decode(h) for h in hyps], sum(map(len, hyps))

    return run


def over_batches(run: BatchFn, workers: int) -> RunFn:
    """run over every batch in order, on `workers` threads."""
    from concurrent.futures import ThreadPoolExecutor

    def run_all(batches: list[list[str]]) -> tuple[list[str], int]:
        if workers == 1:
            done = list(map(run, batches))
        else:
            with ThreadPoolExecutor(workers) as pool:
                done = list(pool.map(run, batches))
        return [h for hyps, _ in done for h in hyps], sum(n for _, n in done)

    return run_all


LOADERS: dict[str, Callable[[dict], BatchFn | RunFn]] = {
    "ours": ours, "ours-int8": ours, "hf": hugging_face, "ct2-fp32": ctranslate2_model, "ct2-int8": ctranslate2_model,
}


def worker_main(spec_path: str) -> int:
    """Translate spec["batches"] spec["repeats"] times; print one JSON line with times and outputs."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    load = LOADERS[spec["system"]]
    run = load(spec) if load is ctranslate2_model else over_batches(load(spec), spec["workers"])
    batches: list[list[str]] = spec["batches"]
    run(batches[: spec["workers"]])  # warm-up: first-call allocations, thread pools, lazy inits
    seconds = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        hyps, tokens = run(batches)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"hyps": hyps, "tokens": tokens, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))
    return 0


def peak_rss_mb() -> float:
    """This process' peak resident set. VmHWM, because ru_maxrss carries the forking parent's peak
    across exec and would credit every worker with the parent's torch."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # without /proc: KiB on Linux


# ---------------------------------------------------------------- the race


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def export_models(ckpt, systems: list[str], work: Path) -> dict[str, Path]:
    """Exported copies of the checkpoint that the chosen systems need, by system name."""
    from training.export import export_ct2, export_hf

    dirs: dict[str, Path] = {}
    if "hf" in systems:
        dirs["hf"] = export_hf(ckpt, work / "hf")
    if "ct2-fp32" in systems:
        dirs["ct2-fp32"] = export_ct2(ckpt, work / "ct2-fp32")
    if "ct2-int8" in systems:
        dirs["ct2-int8"] = export_ct2(ckpt, work / "ct2-int8", quantization="int8")
    return dirs


def run_worker(spec: dict, work: Path) -> dict:
    path = work / f"spec-{spec['system']}-beam{spec['beam']}-b{spec['batch_size']}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def race(args, ckpt, sources: list[str], refs: list[str], dirs: dict[str, Path], work: Path) -> list[dict]:
    from training.export import SPM_FILE
    from translator.decoding import DecodeOptions

    cfg, opts = ckpt.model_config, DecodeOptions()
    lengths = [len(ids) for ids in ckpt.tokenizer.encode(sources)]
    rows = []
    for batch_size in args.batch_sizes:
        limit = args.limit_b1 if batch_size == 1 and args.limit_b1 else len(sources)
        order = sorted(range(min(limit, len(sources))), key=lambda i: lengths[i])
        batches = [[sources[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
        sorted_refs = [refs[i] for i in order]
        for beam in args.beams:
            for system in args.systems:
                spec = {
                    "system": system, "beam": beam, "batch_size": batch_size, "threads": args.threads,
                    "workers": args.workers,
                    "repeats": args.repeats, "batches": batches, "checkpoint": str(args.checkpoint),
                    "model_dir": str(dirs.get(system, "")), "spm": str(dirs.get(system, Path()) / SPM_FILE),
                    "compute_type": "int8_float32" if system == "ct2-int8" else "float32",
                    "max_len_a": opts.max_len_a, "max_len_b": opts.max_len_b,
                    "max_len_cap": min(opts.max_len, cfg.max_positions - 1),
                }
                result = run_worker(spec, work)
                row = {"system": system, "beam": beam, "batch": batch_size, "workers": args.workers,
                       "sentences": len(order)}
                if "error" in result:
                    rows.append({**row, "error": result["error"]})
                    print(f"{system} beam {beam} batch {batch_size}: failed: {result['error']}", file=sys.stderr)
                    continue
                median = statistics.median(result["seconds"])
                rows.append({
                    **row, "tokens": result["tokens"], "seconds": round(median, 3),
                    "tok_s": round(result["tokens"] / median, 1),
                    "bleu": round(sacrebleu_score(result["hyps"], sorted_refs), 2),
                    "peak_rss_mb": round(result["peak_rss_mb"], 1),
                })
                print(f"{system} beam {beam} batch {batch_size}: {rows[-1]['tok_s']} tok/s", file=sys.stderr)
    for row in rows:
        ct2 = next((r for r in rows if r["system"] == "ct2-fp32" and r["beam"] == row["beam"]
                    and r["batch"] == row["batch"] and "tok_s" in r), None)
        if ct2 and "tok_s" in row:
            row["vs_ct2_fp32"] = round(row["tok_s"] / ct2["tok_s"], 3)
    return rows


def sacrebleu_score(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(hyps, [refs]).score


def markdown(rows: list[dict]) -> str:
    lines = [
        "| system | search | batch | workers | sentences | tok/s | vs CT2 fp32 | BLEU | peak RSS MB | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        search = "greedy" if r["beam"] == 1 else f"beam {r['beam']}"
        if "error" in r:
            lines.append(f"| {r['system']} | {search} | {r['batch']} | {r['workers']} | {r['sentences']} "
                         f"| failed: {r['error']} |||||")
            continue
        lines.append(
            f"| {r['system']} | {search} | {r['batch']} | {r['workers']} | {r['sentences']} | {r['tok_s']:.0f} | "
            f"{r.get('vs_ct2_fp32', float('nan')):.2f} | {r['bleu']:.2f} | {r['peak_rss_mb']:.0f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def headline(rows: list[dict], src_lang: str, tgt_lang: str) -> dict:
    """The figures tracked across runs: our speed, our speed over CTranslate2 fp32's, our beam-5 BLEU."""
    out: dict = {}
    for r in rows:
        if r["system"] != "ours" or "tok_s" not in r:
            continue
        search = "greedy" if r["beam"] == 1 else f"beam{r['beam']}"
        out[f"decode_{search}_b{r['batch']}_tok_s"] = r["tok_s"]
        if "vs_ct2_fp32" in r:
            out[f"decode_{search}_b{r['batch']}_vs_ct2_fp32"] = r["vs_ct2_fp32"]
    best = [r for r in rows if r["system"] == "ours" and r["beam"] == 5 and "bleu" in r]
    if best:
        widest = max(best, key=lambda r: r["sentences"])
        out[f"multi30k_{src_lang}_{tgt_lang}_test2016_bleu_beam5"] = widest["bleu"]
    return out


def profile_ours(ckpt, texts: list[str], beams: list[int], threads: int) -> None:
    """Top ops of our search by self CPU time, one batch per beam size."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from translator.decoding import DecodeOptions
    from translator.translate import Translator

    torch.set_num_threads(threads)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer, max_batch_tokens=2**62)
    for beam in beams:
        opts = DecodeOptions(beam_size=beam)
        translator.translate(texts, opts)  # warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            translator.translate(texts, opts)
        wall = time.perf_counter() - start
        ops = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        print(f"\n### ours, beam {beam}, {len(texts)} sentences: top ops by self CPU time\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        print(f"wall {wall:.3f} s under the profiler; inside ops {ops:.3f} s; between ops (Python, "
              f"dispatch, profiler) {wall - ops:.3f} s = {(wall - ops) / wall:.0%}")


def breakdown_ours(ckpt, batches: list[list[str]], beams: list[int], threads: int) -> None:
    """Wall time of each part of the model over all batches (one unprofiled pass each, after a
    warm-up batch), timed around the module calls; the rest is search bookkeeping, the cache,
    cross-attention keys/values, embeddings and the tokenizer."""
    from collections import Counter

    import torch

    from translator.decoding import DecodeOptions
    from translator.runtime import keep_freed_memory
    from translator.translate import Translator

    keep_freed_memory()
    torch.set_num_threads(threads)
    model = ckpt.build_model()
    spent: Counter[str] = Counter()

    def timed(module: torch.nn.Module, part: str) -> None:
        started: list[float] = []
        module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: spent.update({part: time.perf_counter() - started.pop()}))

    timed(model.encoder, "encoder")
    for layer in model.decoder.layers:
        for sublayer, part in zip(layer.sublayers, ("self-attention", "cross-attention", "feed-forward")):
            timed(sublayer, f"decoder {part} (with norm and residual)")
    timed(model.generator, "output projection")
    translator = Translator(model, ckpt.tokenizer, max_batch_tokens=2**62)
    for beam in beams:
        opts = DecodeOptions(beam_size=beam)
        translator.translate(batches[0], opts)  # warm-up
        spent.clear()
        start = time.perf_counter()
        for batch in batches:
            translator.translate(batch, opts)
        wall = time.perf_counter() - start
        spent["the rest"] = wall - sum(spent.values())
        print(f"\n### ours, beam {beam}, {sum(map(len, batches))} sentences: where the time goes\n")
        print("| part | seconds | share |\n| --- | ---: | ---: |")
        for part, seconds in spent.most_common():
            print(f"| {part} | {seconds:.2f} | {seconds / wall:.0%} |")
        print(f"| all | {wall:.2f} | 100% |")


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "ctranslate2", "sacrebleu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--src", type=Path, help="source sentences (default: Multi30K test_2016_flickr.SRC.gz)")
    p.add_argument("--ref", type=Path, help="reference translations (default: test_2016_flickr.TGT.gz)")
    p.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS), help=",".join(SYSTEMS))
    p.add_argument("--beams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5])
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[64, 1])
    p.add_argument("--limit", type=int, help="use only the first N sentences")
    p.add_argument("--limit-b1", type=int, help="use only the first N sentences in batch-1 runs")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per run; the median counts")
    p.add_argument("--threads", type=int, default=2, help="in all, shared by the workers")
    p.add_argument("--workers", type=int, default=1, help="batches decoded side by side (see above)")
    p.add_argument("--work-dir", type=Path, help="keep the exported models and run specs here")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of our search")
    p.add_argument("--breakdown", action="store_true",
                   help="print the wall time of each part of our model over the batches (no race)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.threads % args.workers:
        p.error(f"--workers ({args.workers}) must divide --threads ({args.threads})")
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        p.error(f"unknown system {unknown[0]} (known: {', '.join(SYSTEMS)})")

    from training.corpus import multi30k_dir
    from translator.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    data = ckpt.config.get("data", {})
    src_lang, tgt_lang = data.get("src_lang", "en"), data.get("tgt_lang", "de")
    folder = multi30k_dir() or Path("/work/shared/data/multi30k")
    sources = read_lines(args.src or folder / f"test_2016_flickr.{src_lang}.gz")
    refs = read_lines(args.ref or folder / f"test_2016_flickr.{tgt_lang}.gz")
    if len(sources) != len(refs):
        p.error(f"{len(sources)} source lines but {len(refs)} references")
    sources, refs = sources[: args.limit], refs[: args.limit]
    if args.breakdown:
        size = max(args.batch_sizes)
        lengths = [len(ids) for ids in ckpt.tokenizer.encode(sources)]
        order = sorted(range(len(sources)), key=lambda i: lengths[i])
        batches = [[sources[i] for i in order[k : k + size]] for k in range(0, len(order), size)]
        breakdown_ours(ckpt, batches, args.beams, args.threads)
        return 0

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="decode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        dirs = export_models(ckpt, args.systems, work)
        rows = race(args, ckpt, sources, refs, dirs, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(sources)} sentences of {args.src or 'Multi30K test_2016_flickr'} ({src_lang}-{tgt_lang}), "
          f"{args.threads} threads, median of {args.repeats} passes\n")
    print(markdown(rows))
    if args.json:
        result = {**headline(rows, src_lang, tgt_lang), "threads": args.threads, "repeats": args.repeats,
                  "checkpoint": str(args.checkpoint), "versions": versions(), "runs": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.profile:
        profile_ours(ckpt, sources[: max(args.batch_sizes)], args.beams, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
