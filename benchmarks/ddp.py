"""Data-parallel training throughput: `nmt-train` in 1 process and in N gloo processes under
torchrun, on the same corpus and model, in target tokens per second.

Each run trains `--warmup + --steps` steps with a log record per step; a run's figure is the
median per-step rate after the warmup, and the reported figure is the median over `--repeats`
runs. The CPU cores are split evenly between the processes (train.threads = cores / processes).
The tokenizer is fitted at the start of every run and is not timed. Run it on an otherwise idle
machine; a quick check of the script itself:

    python benchmarks/ddp.py --pairs 300 --steps 3 --warmup 1 --repeats 1 \\
        model.d_model=32 model.n_heads=2 model.n_layers=1 model.d_ff=64 data.vocab_size=500

The real measurement uses the cpu preset's shapes on the whole Multi30K train split:

    python benchmarks/ddp.py --config cpu --steps 20 --repeats 3 --json ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from training.config import load_config
from training.corpus import load_pairs
from training.distributed import local_launch_command

ROOT = Path(__file__).resolve().parents[1]
VALID_PAIRS = 16  # the one validation at the end of a run is not timed; keep it short


def write_tsv(path: Path, src: list[str], tgt: list[str]) -> str:
    with path.open("w", encoding="utf-8") as f:
        for s, t in zip(src, tgt):
            f.write(f"{s.replace(chr(9), ' ')}\t{t.replace(chr(9), ' ')}\n")
    return f"file:{path}"


def one_run(work: Path, nproc: int, cores: int, steps: int, warmup: int, args: list[str]) -> float:
    """Median target tokens/s over the timed steps of one `nmt-train` run in nproc processes."""
    out = Path(tempfile.mkdtemp(prefix=f"ddp{nproc}-", dir=work))
    train_args = [
        "--out", str(out), "--no-test", *args, f"train.threads={max(cores // nproc, 1)}",
        f"train.max_steps={warmup + steps}", "train.log_every=1", f"train.valid_every={warmup + steps}",
        "train.valid_bleu_sentences=4",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        local_launch_command(nproc, train_args), check=False, cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"{nproc}-process run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tgt_tokens_per_s"] for r in records if "tgt_tokens_per_s" in r and r["step"] > warmup]
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cpu")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="world sizes to compare")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU cores shared by the processes")
    p.add_argument("--pairs", type=int, default=0, help="train on the first N pairs (0 = the whole split)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, as for nmt-train")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    d = cfg.data

    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        work = Path(tmp)
        train = load_pairs(d.train, d.src_lang, d.tgt_lang)
        if args.pairs:
            train = train.select(range(min(args.pairs, len(train))))
        valid = load_pairs(d.valid, d.src_lang, d.tgt_lang)
        valid = valid.select(range(min(VALID_PAIRS, len(valid))))
        data_args = [
            f"data.train={write_tsv(work / 'train.tsv', train['src'], train['tgt'])}",
            f"data.valid={write_tsv(work / 'valid.tsv', valid['src'], valid['tgt'])}",
        ]
        run_args = ["--config", args.config, *args.overrides, *data_args]
        runs = {
            n: [one_run(work, n, args.cores, args.steps, args.warmup, run_args) for _ in range(args.repeats)]
            for n in args.processes
        }

    base = statistics.median(runs[args.processes[0]])
    result = {
        "config": args.config, "overrides": args.overrides, "cores": args.cores, "train_pairs": len(train),
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "tgt_tokens_per_s": {str(n): statistics.median(r) for n, r in runs.items()},
        "tgt_tokens_per_s_runs": {str(n): r for n, r in runs.items()},
        "speedup_over_first": {str(n): statistics.median(r) / base for n, r in runs.items()},
    }
    for n in args.processes:
        print(f"{n} process(es): {result['tgt_tokens_per_s'][str(n)]:10.0f} tgt tokens/s "
              f"(x{result['speedup_over_first'][str(n)]:.2f}; runs {[round(x) for x in runs[n]]})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
