"""Training throughput of a preset on real Multi30K batches, and how close it runs to the machine's
matrix-multiply peak.

Prints target tokens/second (median over runs), peak RSS, the model's matmul FLOPs per step
(counted with torch.utils.flop_counter), the achieved matmul FLOP rate, and that rate as a fraction
of what torch.matmul reaches on large square shapes in the same process. Run it on an otherwise
idle machine: a busy second core slows small matrix work many times.

    python benchmarks/train_throughput.py --config cpu --steps 20 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from training.config import load_config
from training.corpus import load_pairs
from training.data import BatchSource, length_filter, tokenize
from training.step import label_smoothed_loss
from translator.model import build_model
from translator.tokenizer import train_tokenizer


def matmul_peak(n: int, repeats: int = 5) -> float:
    """FLOP/s of torch.matmul on (n, n) x (n, n) float32, median of repeats."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    d, m = cfg.data, cfg.model

    pairs = load_pairs(d.train, d.src_lang, d.tgt_lang)
    tok = train_tokenizer((s for c in ("src", "tgt") for s in pairs[c]), d.vocab_size, d.spm_model_type)
    data = length_filter(tokenize(pairs, tok, None, "train"), d.max_len, d.max_len_ratio)
    source = BatchSource(data, cfg.train.max_tokens, cfg.train.seed, m.bos_id, m.eos_id, m.pad_id)
    batches = [source.collate(ix) for ix in source.epoch(0)[: args.warmup + args.steps]]

    torch.manual_seed(0)
    model = build_model(m).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=cfg.train.betas, eps=cfg.train.eps)

    def step(batch) -> None:
        loss, _ = label_smoothed_loss(model, batch, cfg.train.label_smoothing)
        (loss / batch.n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step(batches[0])
    flops_first = counter.get_total_flops()
    tokens_first = batches[0].n_tokens

    rates, flop_rates = [], []
    for _ in range(args.repeats):
        for b in batches[: args.warmup]:
            step(b)
        timed = batches[args.warmup :]
        t0 = time.perf_counter()
        for b in timed:
            step(b)
        dt = time.perf_counter() - t0
        tokens = sum(b.n_tokens for b in timed)
        rates.append(tokens / dt)
        # Matmul FLOPs scale with tokens at these shapes; use the counted FLOPs per token.
        flop_rates.append(flops_first / tokens_first * tokens / dt)

    peak = max(matmul_peak(2048), matmul_peak(4096, repeats=3))
    result = {
        "config": args.config,
        "threads": args.threads,
        "tgt_tokens_per_step": statistics.mean(b.n_tokens for b in batches),
        "train_tgt_tokens_per_s": statistics.median(rates),
        "train_tgt_tokens_per_s_runs": rates,
        "matmul_gflop_per_tgt_token": flops_first / tokens_first / 1e9,
        "model_matmul_gflops": statistics.median(flop_rates) / 1e9,
        "torch_matmul_peak_gflops": peak / 1e9,
        "matmul_fraction": statistics.median(flop_rates) / peak,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }
    for k, v in result.items():
        print(f"{k:32s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
