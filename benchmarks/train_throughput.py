"""Training throughput of a preset on real Multi30K batches, and how close it runs to the machine's
matrix-multiply peak, for the training step as it was and with each of its speed levers.

Variants (`--variants`, run interleaved in one process on the same batches, the first one the
reference of the speedups):
    baseline   the step before the levers: fp32, torch's default Adam, the NLL for logging a
               second cross entropy, batches sorted by their longer side only
    fused      baseline + fused Adam
    loss       baseline + one log-softmax for the smoothed loss and the NLL, through autograd
    fusedloss  baseline + that loss with its gradient written in one pass (training.step.SmoothedNLL)
    bucketing  baseline + batches sorted by longer side, then target length (less padding)
    bf16       baseline + bf16 autocast
    compile    baseline + torch.compile of the loss's forward and backward
    dropout    baseline + translator.model.dropout's cheaper mask (the others: torch's F.dropout)
    new        the trainer's step: --precision (auto: the trainer's probe decides), --compile,
               fused Adam unless --no-fused, the fused loss, the new bucketing, the cheaper
               dropout mask
    newcompiled  the trainer's step as `new`, through torch.compile (train.compile: true)

For each it prints target tokens/second (median over repeats), the speedup over the first
variant, the model's matmul FLOPs per target token (torch.utils.flop_counter), the achieved
matmul FLOP rate and that rate as a fraction of what torch.matmul reaches on large square fp32
shapes in the same process; compile's first step (compilation) is reported apart. Run it on an
otherwise idle machine: a busy second core slows small matrix work many times.

    python benchmarks/train_throughput.py --config cpu --variants baseline,fused,loss,bucketing,bf16,new \\
        --steps 20 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import resource
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from training.config import load_config
from training.corpus import load_pairs
from training.data import BatchSource, length_filter, tokenize
from training.precision import MixedPrecision, choose_precision, training_shapes
from training.step import TrainStep, batch_loss, make_adam
from translator import model as model_module
from translator.model import build_model
from translator.model import dropout as fast_dropout
from translator.tokenizer import train_tokenizer


@dataclass(frozen=True)
class Variant:
    precision: str = "fp32"
    compile: bool = False
    fused: bool = False
    loss: str = "twice"  # twice (the NLL a second cross entropy), once (one log-softmax), fused
    bucketing: bool = False
    fast_dropout: bool = False


LEVERS = {
    "baseline": Variant(), "fused": Variant(fused=True), "loss": Variant(loss="once"),
    "fusedloss": Variant(loss="fused"),
    "bucketing": Variant(bucketing=True), "bf16": Variant(precision="bf16"), "compile": Variant(compile=True),
    "dropout": Variant(fast_dropout=True),
}


@contextlib.contextmanager
def dropout_of(v: Variant):
    """The model's dropout for the variant: translator.model.dropout, or torch's F.dropout (the
    step before the lever) in its place while the variant runs."""
    if v.fast_dropout:
        yield
        return
    model_module.dropout = F.dropout  # the same positional arguments: x, p, training
    try:
        yield
    finally:
        model_module.dropout = fast_dropout


def loss_twice(model, src, tgt_in, tgt_out, smoothing):
    """The loss before the levers: the NLL for logging was a second cross entropy."""
    logits = model(src, tgt_in)  # (B, T, V)
    flat, gold = logits.view(-1, logits.size(-1)), tgt_out.view(-1)
    pad = model.cfg.pad_id
    loss = F.cross_entropy(flat, gold, ignore_index=pad, label_smoothing=smoothing, reduction="sum")
    with torch.no_grad():
        nll = F.cross_entropy(flat, gold, ignore_index=pad, reduction="sum")
    return loss, nll


def loss_once(model, src, tgt_in, tgt_out, smoothing):
    """One log-softmax for the smoothed loss and the NLL, its gradient through autograd."""
    logits = model(src, tgt_in)  # (B, T, V)
    V = logits.size(-1)
    logp = F.log_softmax(logits.reshape(-1, V), dim=-1, dtype=torch.float32)  # (B*T, V)
    gold = tgt_out.reshape(-1)
    real = (gold != model.cfg.pad_id).to(logp.dtype)
    nll = -logp.gather(1, gold.unsqueeze(1)).squeeze(1) * real
    uniform = -logp.mean(dim=-1) * real
    return ((1.0 - smoothing) * nll + smoothing * uniform).sum(), nll.detach().sum()


LOSSES = {"twice": loss_twice, "once": loss_once, "fused": batch_loss}


def longest_side_batches(src_lens, tgt_lens, max_tokens, seed, epoch) -> list[list[int]]:
    """The batching before the levers: sorted by the longer side only, ties at random."""
    rng = random.Random(seed * 100_003 + epoch)
    noise = [rng.random() for _ in src_lens]
    order = sorted(range(len(src_lens)), key=lambda i: (max(src_lens[i], tgt_lens[i]) + 1, noise[i]))
    batches, batch = [], []
    for i in order:
        if batch and (len(batch) + 1) * (max(src_lens[i], tgt_lens[i]) + 1) > max_tokens:
            batches.append(batch)
            batch = []
        batch.append(i)
    batches.append(batch)
    rng.shuffle(batches)
    return batches


def matmul_peak(n: int, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of torch.matmul on (n, n) x (n, n) in dtype, median of repeats."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


class Runner:
    """One variant's model, optimizer and step over its batches."""

    def __init__(self, name: str, v: Variant, cfg, batches: list) -> None:
        self.name, self.v, self.batches = name, v, batches
        t = replace(cfg.train, precision=v.precision, compile=v.compile, fused_adam=v.fused)
        torch.manual_seed(0)
        self.model = build_model(cfg.model).train()
        opt = make_adam(self.model.parameters(), t)
        amp = MixedPrecision(v.precision, torch.device("cpu"))
        self.step = TrainStep(self.model, self.model, opt, amp, t, loss_fn=LOSSES[v.loss])
        self.rates: list[float] = []

    def run(self, batches: list) -> float:
        with dropout_of(self.v):
            t0 = time.perf_counter()
            for b in batches:
                self.step([b], 1e-4, b.n_tokens)
            return time.perf_counter() - t0

    def matmul_flops_per_token(self) -> float:
        b = self.batches[0]
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = batch_loss(self.model, b.src, b.tgt_in, b.tgt_out, 0.1)
            loss.backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / b.n_tokens


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cpu")
    p.add_argument("--variants", default="baseline,new", help=f"comma list of {', '.join([*LEVERS, 'new', 'newcompiled'])}")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="the new step's precision")
    p.add_argument("--compile", action="store_true", help="the new step through torch.compile")
    p.add_argument("--no-fused", action="store_true", help="the new step with torch's default Adam")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    unknown = [n for n in args.variants.split(",") if n not in LEVERS and n not in ("new", "newcompiled")]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    d, m, t = cfg.data, cfg.model, cfg.train
    pairs = load_pairs(d.train, d.src_lang, d.tgt_lang)
    tok = train_tokenizer((s for c in ("src", "tgt") for s in pairs[c]), d.vocab_size, d.spm_model_type)
    data = length_filter(tokenize(pairs, tok, None, "train"), d.max_len, d.max_len_ratio)
    source = BatchSource(data, t.max_tokens, t.seed, m.bos_id, m.eos_id, m.pad_id)
    n = args.warmup + args.steps
    # Both batchings make as many batches and shuffle them with the same draws: batch i of
    # either comes from the same place in the length order.
    sorted_new = [source.collate(ix) for ix in source.epoch(0)[:n]]
    sorted_old = [source.collate(ix) for ix in longest_side_batches(source.src_lens, source.tgt_lens, t.max_tokens, t.seed, 0)[:n]]

    probe_record = {}
    variants = {}
    for name in args.variants.split(","):
        if name in ("new", "newcompiled"):
            if not probe_record:
                shapes = training_shapes(t.max_tokens, m.d_model, m.d_ff, m.vocab_size)
                precision, probe_record = choose_precision(args.precision, torch.device("cpu"), shapes)
            compiled = args.compile or name == "newcompiled"
            variants[name] = Variant(precision, compiled, not args.no_fused, "fused", True, True)
        else:
            variants[name] = LEVERS[name]
    runners = [Runner(name, v, cfg, sorted_new if v.bucketing else sorted_old) for name, v in variants.items()]
    flops = {r.name: r.matmul_flops_per_token() for r in runners}
    first_step = {}
    for r in runners:  # compilation and cold caches, outside the timed runs
        first_step[r.name] = r.run(r.batches[:1])

    for _ in range(args.repeats):
        for r in runners:  # interleaved, so that a change in the machine's load hits every variant
            r.run(r.batches[1 : args.warmup])
            timed = r.batches[args.warmup :]
            r.rates.append(sum(b.n_tokens for b in timed) / r.run(timed))
    return report(args, runners, flops, first_step, probe_record)


def report(args, runners: list[Runner], flops: dict, first_step: dict, probe_record: dict) -> int:
    peak = max(matmul_peak(2048), matmul_peak(4096, repeats=3))
    ref = statistics.median(runners[0].rates)
    rows = {}
    for r in runners:
        rate = statistics.median(r.rates)
        rows[r.name] = {
            **vars(r.v),
            "train_tgt_tokens_per_s": rate,
            "train_tgt_tokens_per_s_runs": r.rates,
            "speedup": rate / ref,
            "matmul_gflop_per_tgt_token": flops[r.name] / 1e9,
            "model_matmul_gflops": flops[r.name] * rate / 1e9,
            "matmul_fraction": flops[r.name] * rate / peak,
            "first_step_s": first_step[r.name],
            "tgt_tokens_per_step": statistics.mean(b.n_tokens for b in r.batches),
        }
    result = {
        "config": args.config, "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
        "torch_matmul_peak_gflops": peak / 1e9, "new_step_precision": probe_record,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads", "variants": rows,
    }
    print(f"{result['machine']}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; new step: {probe_record or 'not run'}")
    print(f"{'variant':10s} {'tgt tok/s':>10s} {'speedup':>8s} {'matmul frac':>11s} {'first step s':>12s}")
    for name, row in rows.items():
        print(f"{name:10s} {row['train_tgt_tokens_per_s']:10.0f} {row['speedup']:8.2f} "
              f"{row['matmul_fraction']:11.3f} {row['first_step_s']:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
