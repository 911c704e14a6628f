"""A short request beside a long one: how long one sentence waits while a request at the edge of
the limits decodes.

Starts `nmt-serve` on the checkpoint (with `--server-set` overrides), times a one-sentence greedy
request on the idle server, then sends the long request (16 texts of ~1,000 characters, beam 16,
n-best 16, minimum length 254 by default) and, a second later, the same short request again.
Prints the short request's latency alone and beside the long one, the long one's latency or
status, and the time the server took to refuse it when it is over `limits.max_request_cost`.

    python benchmarks/fairness.py --checkpoint runs/multi30k-en-de/best.pt \\
        --server-set limits.max_request_cost=100000000 --server-set limits.max_length=256
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc

CORPUS = Path(__file__).resolve().parents[2] / "shared/data/multi30k/test_2016_flickr.en.gz"


def long_texts(corpus: Path, count: int, chars: int) -> list[str]:
    """count texts of about `chars` characters, each consecutive corpus sentences joined."""
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    texts, k = [], 0
    for _ in range(count):
        text = ""
        while len(text) + len(lines[k % len(lines)]) + 1 <= chars:
            text, k = f"{text} {lines[k % len(lines)]}".strip(), k + 1
        texts.append(text)
    return texts


def timed(call, request: pb.TranslateRequest, timeout: float) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        call(request, timeout=timeout)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    return time.perf_counter() - start, code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--texts", type=int, default=16)
    p.add_argument("--chars", type=int, default=1000)
    p.add_argument("--beam-size", type=int, default=16)
    p.add_argument("--min-length", type=int, default=254)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cmd = [sys.executable, "-m", "translator.serve_cli", "--checkpoint", str(args.checkpoint), "--port", "0",
           "--threads", str(args.threads), *args.server_set]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        match = re.search(r"listening on (\S+?)[,\s]", server.stdout.readline() + " ")
        if not match:
            raise SystemExit("the server did not start")
        with grpc.insecure_channel(match.group(1)) as channel:
            translate = pb_grpc.TranslatorStub(channel).Translate
            short = pb.TranslateRequest(texts=["A man in an orange hat starring at something."],
                                        options=pb.DecodingOptions(beam_size=1))
            timed(translate, short, args.timeout)  # warm-up
            alone, _ = timed(translate, short, args.timeout)
            options = pb.DecodingOptions(beam_size=args.beam_size, n_best=args.beam_size,
                                         min_length=args.min_length, max_length=args.min_length + 1)
            long_request = pb.TranslateRequest(texts=long_texts(args.corpus, args.texts, args.chars), options=options)
            start = time.perf_counter()
            future = translate.future(long_request, timeout=args.timeout)
            ended: list[float] = []
            future.add_done_callback(lambda _: ended.append(time.perf_counter()))
            time.sleep(1.0)
            beside, short_code = timed(translate, short, args.timeout)
            try:
                future.result()
                long_code = "OK"
            except grpc.RpcError as e:
                long_code = f"{e.code().name}: {e.details()}"
            while not ended:
                time.sleep(0.01)
            long_s = ended[0] - start
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    result = {"short_alone_ms": round(alone * 1000, 1), "short_beside_long_ms": round(beside * 1000, 1),
              "short_status": short_code, "long_s": round(long_s, 2), "long_status": long_code,
              "long_request": {"texts": args.texts, "chars": args.chars, "beam_size": args.beam_size,
                               "min_length": args.min_length}, "server_set": args.server_set}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
