"""`nmt-info CKPT`: verify a checkpoint and print what it records about itself, as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def info_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nmt-info",
                                description="Verify a checkpoint's digests and print its provenance as JSON.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--config", action="store_true", help="include the full training config")
    args = p.parse_args(argv)
    from translator.checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {
        "checkpoint": str(args.checkpoint),
        "verified": ckpt.verified,
        "weights_sha256": ckpt.weights_sha256,
        "tokenizer_sha256": ckpt.tokenizer.sha256,
        "resumable": ckpt.train_state is not None,
        "provenance": ckpt.provenance.to_dict(),
        "metrics": ckpt.metrics,
        "model": ckpt.config["model"],
    }
    if args.config:
        out["config"] = ckpt.config
    print(json.dumps(out, indent=2))
    return 0
