"""Offline commands: train, evaluate, average, plot. Each is `main(argv) -> int`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from translator.checkpoint import CheckpointError
from translator.config import ConfigError


def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nmt-train",
        description="Train a Transformer from a YAML config; under torchrun, one data-parallel process per device.",
    )
    p.add_argument("--config", default="cpu", help="preset name (cpu, base, big) or YAML path")
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoints, logs, tokenizer")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget (same as train.max_minutes=)")
    p.add_argument("--max-target-tokens", type=int,
                   help="budget in target tokens trained on (same as train.max_target_tokens=)")
    p.add_argument("--no-test", action="store_true", help="skip scoring the best checkpoint on data.test")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=5e-4")
    args = p.parse_args(argv)
    from training.config import load_config
    from training.distributed import init_distributed, shutdown
    from training.trainer import Trainer

    values = {
        key: value for key, value in
        (("train.max_minutes", args.max_minutes), ("train.max_target_tokens", args.max_target_tokens))
        if value is not None
    }
    code, processes = 0, 1
    try:
        cfg = load_config(args.config, list(args.overrides), values)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"--out {args.out} is, or lies in, a file rather than a folder") from None
        world = init_distributed()  # a world of one unless started by torchrun
        processes = world.size
        trainer = Trainer(cfg, args.out, world=world, preset=args.config)
        trainer.run()
        if trainer.interrupted:
            if world.is_main:
                print(f"interrupted at step {trainer.state.step}, state saved; run the same command again to resume",
                      file=sys.stderr)
            code = 128 + trainer.interrupted
        else:
            best = args.out / "best.pt"
            if world.is_main and not args.no_test and best.exists() and not has_test_score(best, cfg.data.test):
                from training.evaluate import evaluate_checkpoint

                evaluate_checkpoint(best, cfg.data.test, record=True)
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        shutdown()
    if processes > 1:
        exit_at_once(code)
    return code


def exit_at_once(code: int) -> None:
    """End a process of a multi-process run without tearing its objects down. Freeing DDP's
    reducer frees gloo's process group, whose destructor joins gloo's worker threads while holding
    the GIL; a worker still releasing a finished broadcast's tensors waits for the GIL: the
    process hangs at exit, now and then, after everything is saved. Nothing is left to free."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def has_test_score(path: Path, test: str) -> bool:
    """Whether the checkpoint's metrics already hold a score on `test` (a rerun of a finished run)."""
    from translator.checkpoint import load_checkpoint

    return any(k.startswith(f"test_bleu:{test}:") for k in load_checkpoint(path).metrics)


def evaluate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nmt-evaluate", description="Translate a test set and score it with sacreBLEU.")
    p.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint file (.pt); or --server")
    p.add_argument("--server", metavar="HOST:PORT", help="translate through a running nmt-serve instead")
    p.add_argument("--test", help="corpus spec, e.g. multi30k:test_2016_flickr (default: the config's data.test)")
    p.add_argument("--output", type=Path, help="write the translations here, one per line")
    p.add_argument("--record", action="store_true", help="store the scores in the checkpoint's metrics")
    from translator.cli import add_client_flags, add_decoding_flags, decoding_options

    add_decoding_flags(p)  # beam search, beam 5, unless told otherwise
    add_client_flags(p)
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (args.server is None):
        p.error("give a checkpoint or --server HOST:PORT, not both")
    from training.evaluate import evaluate_checkpoint, evaluate_server
    from translator.runtime import keep_freed_memory

    try:
        if args.server:
            if args.record or not args.test:
                raise ValueError("--server needs --test (the server does not say its test set) and "
                                 "cannot --record (the checkpoint is the server's)")
            from translator.client import backend_from_args

            result = evaluate_server(backend_from_args(args), args.test, decoding_options(args), args.output)
        else:
            keep_freed_memory()
            result = evaluate_checkpoint(
                args.checkpoint, args.test, decoding_options(args), output=args.output, record=args.record
            )
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def average_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nmt-average", description="Average the weights of checkpoints.")
    p.add_argument("run", type=Path, help="run folder (uses its last N step checkpoints; of a wsd run, of its decay phase)")
    p.add_argument("--last", type=int, default=5, help="how many of the latest step checkpoints")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from training.average import average_run

    try:
        paths = average_run(args.run, args.last, args.out)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) into {args.out}")
    return 0


def plot_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nmt-plot", description="Plot training/validation curves to a PNG.")
    p.add_argument("run", type=Path, help="run folder holding metrics.jsonl")
    p.add_argument("--out", type=Path, help="PNG path (default: RUN/curves.png)")
    args = p.parse_args(argv)
    from training.plot import plot_run

    try:
        out = plot_run(args.run, args.out or args.run / "curves.png")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
