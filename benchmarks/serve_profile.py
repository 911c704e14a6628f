"""Where a served request's time goes: py-spy samples `nmt-serve` from outside while closed-loop
clients load it, and the samples are split by thread, idle or busy, and phase.

Starts `nmt-serve` on the checkpoint in a subprocess exactly as benchmarks/load.py does (its
`serving`, with `--threads`, `--server-set` and `--server-env` passed through; or profiles a running
server: `--server-target` and `--server-pid`). For each `--concurrency` level, C clients send
single-sentence Translate calls from the corpus, cycling through it, each sending its next as soon
as its last came back; after `--warmup` seconds of that, `py-spy record --idle --threads --format
raw` samples the server for `--duration` seconds at `--rate` Hz while the load goes on, and the load
stops when py-spy has finished. Per level it prints:

- the load during the profile (sentences/s, p50/p99, the server's mean queue and decode ms) and
  the sentences/s of the unprofiled second half of the warm-up just before, to show what sampling
  cost the server;
- every thread py-spy sees (Python threads; the decoding engine runs on the main thread, the gRPC
  front end on the asyncio loop thread "grpc-loop"): its samples, the share idle (the stack waits:
  a condition/event/queue wait, epoll/select/poll, a futex or semaphore), waiting for the GIL
  (`take_gil` on the native stack; `--native` only) and busy, and its CPU seconds over the profile
  from /proc/<pid>/task/<tid>/stat. Busy means working, on a core or waiting for one: where the
  CPU seconds fall well short of busy x duration, the thread was descheduled (a shared machine) or
  paused by py-spy;
- the CPU seconds of the server's threads py-spy cannot see, having no Python frames: OpenMP
  workers of torch, gRPC's C-core threads (event_engine, timer);
- for each thread with busy samples, their shares by phase (PHASES below, one table for every
  thread, so a phase showing up on an unexpected thread shows where it runs) and its top leaf frames.

Phase matching goes from the leaf up: the innermost frame that matches any phase's pattern names the
phase (where one frame matches several, the first in PHASES' order). So the encoder run for a
sentence joining a running batch counts as encoder, not joining; the output projection inside
decode_step as output projection; torch operators called from beam.py as search bookkeeping; and
detokenization (Tokenizer.decode inside _candidates) apart from tokenization (Tokenizer.encode,
Preparer.sentences). Busy samples that match nothing are "other".

py-spy runs outside the server, as a process of its own, and its CPU competes for the same cores:
each level prints py-spy's CPU seconds (from getrusage(RUSAGE_CHILDREN) around its run) beside the
server's and the load generator's (this process). By default py-spy reads Python frames only and
`--nonblocking`, without stopping the server; `--native` adds native frames (time inside torch's
kernels, oneDNN's JIT code, libgomp, our kernels library, protobuf's upb, gRPC's C core, garbage
collection, GIL waits), which py-spy can only unwind by pausing the server for every sample. In a
smoke run on a shared 2-core machine, at 100 Hz with a 1-thread server at 8 clients: nonblocking,
py-spy used 11% of a core and the server kept its unprofiled throughput; native, py-spy used
35-40% of a core and the server's throughput fell by 40-45%. Phase shares within a thread move
less than throughput does (the pauses stop every thread alike), but compare levels in one mode.

    python benchmarks/serve_profile.py --checkpoint runs/multi30k-en-de/best.pt \\
        --corpus /work/shared/data/multi30k/test_2016_flickr.en.gz --concurrency 1,32 \\
        --duration 20 --json serve-profile.json --keep-raw serve-profile-raw
    python benchmarks/serve_profile.py ... --native --duration 10       # into torch and gRPC's C core

Quick check (under a minute with a small checkpoint):

    python benchmarks/serve_profile.py --checkpoint CKPT --corpus CORPUS --concurrency 1,8 --duration 5

Needs py-spy (the `profile` extra) and ptrace permission on the server (root, or
kernel.yama.ptrace_scope = 0, or CAP_SYS_PTRACE in a container).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts, not a package
from load import (
    CHANNELS,
    Server,
    Tally,
    cpu_seconds_from_stat,
    percentile,
    process_cpu_seconds,
    read_sentences,
    scrape,
    serving,
    where_time_went,
)

from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc

# Phase -> pattern, searched in each frame of a busy sample from the leaf up; the first frame that
# matches any pattern names the phase. Frames read "function (file.py:line)" for Python, "symbol (library)"
# or "0xADDRESS (library)" for native code. Garbage collection runs inside whatever allocation set
# it off, so it wins wherever it is on the stack (native frames only).
PHASES: dict[str, str] = {
    "garbage collection": r"^gc_collect\w* \(",
    "output projection": r"^Generator\.forward \(",
    "decoder steps": r"^(EncoderDecoder\.decode_step|Decoder\.(step|native_step)|decoder_steps) \(",
    "encoder": r"^(EncoderDecoder\.(encode|init_cache)|Encoder\.forward) \(",  # with cross-attention keys
    "joining": r"^(SearchSetup\.admit|DecoderCache\.extend|Rows\.join|Beams\.join|join|Finished\.extend"
               r"|RunningBatch\.admit|Translator\._joining) \(translator/",
    "search bookkeeping": r"\(translator/(beam|greedy|search_setup|decoding|hypotheses|constraints|hooks"
                          r"|sampling)\.py:",
    "prepare/tokenize": r"^(Tokenizer\.encode|Preparer\.(sentences|documents)) \(",
    "detokenize/candidates": r"^(Tokenizer\.(decode|pieces)|TranslationService\._candidates) \(",
    "batcher": r"\(translator/(batcher|jobs)\.py:",
    "protobuf": r"^(check_request|_unknown_field|_request_options|_translation|_model_info|_parser\.<locals>"
                r"\.parse|_?(de)?serialize) \(|google/protobuf|_message\.abi3|^_?upb_",
    "logging/metrics": r"\((logging|json)/|\(translator/metrics\.py:|^TranslatorServicer\._log \(",
    "wake the event loop": r"^(_call_soon|BaseEventLoop\.call_soon_threadsafe"
                           r"|BaseSelectorEventLoop\._write_to_self) \(",
    "servicer/service (rest)": r"\(translator/(service|servicer|server)\.py:",
    "asyncio/grpc machinery": r"\((asyncio|grpc)/|cygrpc|\(selectors\.py:|_asynciomodule\.c",
}
PHASE_PATTERNS = {name: re.compile(pattern) for name, pattern in PHASES.items()}
GARBAGE_COLLECTION = PHASE_PATTERNS["garbage collection"]

# A sample is idle when its innermost Python frame waits, or its leaf is a native wait; waiting
# for the GIL when take_gil (or its callers) is on the native stack below the innermost Python frame.
PYTHON_FRAME = re.compile(r"\((<frozen [^>]+>|[^()]*\.py):\d+\)$")
PYTHON_WAITS = re.compile(r"^(Condition\.wait|Event\.wait|Thread\.join|Thread\._wait_for_tstate_lock"
                          r"|Queue\.get|Semaphore\.acquire|Barrier\.wait|\w*Selector\.select|sleep) \(")
NATIVE_WAITS = re.compile(r"^(epoll_wait|epoll_pwait2?|__?poll|ppoll|__?select|pselect6?|accept4?|recv(msg)?"
                          r"|pthread_cond_(timed|clock)?wait\w*|sem_(timed|clock)?wait\w*|__new_sem_wait\w*"
                          r"|do_futex_wait\w*|futex_\w*wait\w*|__lll_lock_wait\w*|nanosleep|clock_nanosleep"
                          r"|syscall) \(")  # gRPC's C core waits on its futexes through syscall()
GIL_WAITS = re.compile(r"^(take_gil|PyEval_RestoreThread|PyEval_AcquireThread|PyGILState_Ensure) \(")
THREAD = re.compile(r"^thread \((\d+)\): (.*)$")


@dataclass
class ThreadProfile:
    """One thread's samples: by state, and the busy ones by phase and by leaf frame."""

    tid: int
    name: str
    states: Counter[str] = field(default_factory=Counter)  # idle, gil, busy
    phases: Counter[str] = field(default_factory=Counter)
    leaves: Counter[str] = field(default_factory=Counter)
    engine: bool = False  # runs the batcher's decoding loop
    front_end: bool = False  # runs the gRPC handlers

    @property
    def samples(self) -> int:
        return sum(self.states.values())


def sample_state(frames: list[str]) -> str:
    """idle, gil or busy for one stack (root first)."""
    i = len(frames)
    while i and not PYTHON_FRAME.search(frames[i - 1]):
        i -= 1
    native = frames[i:]  # below the innermost Python frame
    if any(GIL_WAITS.match(f) for f in native):
        return "gil"
    if (native and NATIVE_WAITS.match(native[-1])) or (i and PYTHON_WAITS.match(frames[i - 1])):
        return "idle"
    if not native and i and frames[i - 1].startswith("Thread.run (threading.py:"):
        return "idle"  # a native thread target (gRPC's poller) seen without --native: it waits in epoll
    return "busy"


def phase_of(frames: list[str]) -> str:
    """The phase of a busy stack (root first), by PHASES."""
    if any(GARBAGE_COLLECTION.search(frame) for frame in frames):
        return "garbage collection"
    for frame in reversed(frames):
        for name, pattern in PHASE_PATTERNS.items():
            if pattern.search(frame):
                return name
    return "other"


def leaf_name(frame: str) -> str:
    """A frame without its line number; unresolved native addresses folded per library."""
    frame = re.sub(r"^0x[0-9a-f]+ \(\?\)$", "? (no library: JIT code such as oneDNN's)", frame)
    frame = re.sub(r"^0x[0-9a-f]+ ", "? ", frame)
    frame = re.sub(r":\d+\)$", ")", frame)
    return frame if len(frame) <= 100 else frame[:60] + " ... " + frame[-35:]  # C++ templates run long


def parse_raw(text: str) -> dict[int, ThreadProfile]:
    """py-spy's raw output (`--threads`): one line per distinct stack,
    `thread (TID): NAME;root frame;...;leaf frame COUNT`."""
    threads: dict[int, ThreadProfile] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        head, *frames = stack.split(";")
        match = THREAD.match(head)
        if not match or not count.isdigit():
            continue
        tid, n = int(match.group(1)), int(count)
        t = threads.setdefault(tid, ThreadProfile(tid, match.group(2)))
        t.engine |= any(f.startswith("Batcher.run (") for f in frames)
        t.front_end |= t.name == "grpc-loop" or t.name.startswith(("rpc_", "ThreadPoolExecutor")) or any(
            "(translator/servicer.py:" in f for f in frames)
        state = sample_state(frames) if frames else "busy"
        t.states[state] += n
        if state == "busy":
            t.phases[phase_of(frames)] += n
            t.leaves[leaf_name(frames[-1]) if frames else "(no frames)"] += n
    return threads


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (comm, CPU seconds) of every thread of the process now."""
    out, tck = {}, os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (stat[stat.index("(") + 1 : stat.rindex(")")], cpu_seconds_from_stat(stat, tck))
    return out


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class ClosedLoop:
    """`clients` clients on a thread of their own, each sending the next corpus request (cycling) as
    soon as its last came back, until stop(). load.run_level sends each request once and then drains;
    a profile needs the load steady for as long as py-spy samples, whatever the corpus' size."""

    def __init__(self, stubs: list, requests: list[pb.TranslateRequest], clients: int,
                 timeout: float) -> None:
        self.stubs, self.requests, self.timeout = stubs, requests, timeout
        self.tally, self.sent = Tally(), 0
        self._slots = threading.Semaphore(clients)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=0.05):
                continue
            k, request = self.sent, self.requests[self.sent % len(self.requests)]
            t0 = time.perf_counter()
            call = self.stubs[k % len(self.stubs)].Translate.future(request, timeout=self.timeout)
            call.add_done_callback(self.tally.on_done(k, len(request.texts), t0, self._slots.release))
            self.sent += 1

    def mark(self) -> tuple[int, int, int]:
        """(OK answers so far, sentences in them, errors so far)."""
        with self.tally.cond:
            return len(self.tally.latencies), self.tally.ok_sentences, sum(self.tally.errors.values())

    def since(self, mark: tuple[int, int, int]) -> tuple[list[float], int, int]:
        """Latencies (sorted), sentences answered OK and errors after mark()."""
        with self.tally.cond:
            return (sorted(self.tally.latencies[mark[0]:]), self.tally.ok_sentences - mark[1],
                    sum(self.tally.errors.values()) - mark[2])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.tally.wait(self.sent, self.timeout + 5)


def py_spy_command(args: argparse.Namespace, pid: int, output: Path) -> list[str]:
    return [args.py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--duration",
            str(args.duration), "--threads", "--idle", "--format", "raw", "--output", str(output),
            "--native" if args.native else "--nonblocking"]


def profile_level(args: argparse.Namespace, server: Server, stubs: list, requests: list[pb.TranslateRequest],
                  clients: int, raw_dir: Path) -> dict:
    """Load at `clients` for --warmup s (its second half unprofiled, for comparison), then py-spy for
    --duration s under the same load."""
    output = raw_dir / f"serve-c{clients}.txt"
    loop = ClosedLoop(stubs, requests, clients, args.timeout)
    try:
        time.sleep(args.warmup / 2)
        settled, settled_at = loop.mark(), time.perf_counter()
        time.sleep(args.warmup / 2)
        mark, start = loop.mark(), time.perf_counter()
        unprofiled = (mark[0] - settled[0], (mark[1] - settled[1]) / (start - settled_at))
        metrics, cpu_before = scrape(server.metrics_url), thread_cpu(server.pid)
        server_cpu, spy_cpu, generator_cpu = (process_cpu_seconds(server.pid), children_cpu_seconds(),
                                              time.process_time())
        spy = subprocess.run(py_spy_command(args, server.pid, output), capture_output=True, text=True,
                             check=False)
        seconds = time.perf_counter() - start
        spy_cpu, generator_cpu = children_cpu_seconds() - spy_cpu, time.process_time() - generator_cpu
        server_cpu = process_cpu_seconds(server.pid) - server_cpu
        cpu_after = thread_cpu(server.pid)
        queue_decode = where_time_went(metrics, scrape(server.metrics_url))
        latencies, ok_sentences, errors = loop.since(mark)
    finally:
        loop.stop()
    if spy.returncode != 0 or not output.exists():
        raise SystemExit(f"py-spy failed ({spy.returncode}): {(spy.stdout + spy.stderr).strip()[-2000:]}")
    spy_errors = re.search(r"Errors: (\d+)", spy.stdout + spy.stderr)
    threads = parse_raw(output.read_text(encoding="utf-8"))
    cpu = {tid: (comm, after - cpu_before.get(tid, (comm, 0.0))[1])
           for tid, (comm, after) in cpu_after.items()}
    return {
        "clients": clients, "seconds": round(seconds, 2), "rate_hz": args.rate, "native": args.native,
        "ok": len(latencies), "errors": errors,
        "sentences_per_s": round(ok_sentences / seconds, 2),
        "unprofiled_ok": unprofiled[0], "unprofiled_sentences_per_s": round(unprofiled[1], 2),
        **{f"p{q}_ms": round(1000 * percentile(latencies, q), 1) for q in (50, 99)},
        **queue_decode,
        "server_cpu_s": round(server_cpu, 2), "py_spy_cpu_s": round(spy_cpu, 2),
        "generator_cpu_s": round(generator_cpu, 2),
        "py_spy_samples": sum(t.samples for t in threads.values()),
        "py_spy_errors": int(spy_errors.group(1)) if spy_errors else None,
        "threads": [thread_figures(t, cpu.get(t.tid, ("", float("nan")))[1], args.top)
                    for t in sorted(threads.values(), key=lambda t: -t.states["busy"])],
        "unseen_threads": [{"tid": tid, "comm": comm, "cpu_s": round(s, 2)}
                           for tid, (comm, s) in sorted(cpu.items(), key=lambda kv: -kv[1][1])
                           if tid not in threads],
        "raw": str(output) if args.keep_raw else None,
    }


def thread_figures(t: ThreadProfile, cpu_s: float, top: int) -> dict:
    busy = t.states["busy"]
    role = "decoding engine" if t.engine else "gRPC front end" if t.front_end else ""
    return {"tid": t.tid, "name": t.name, "role": role, "samples": t.samples, "cpu_s": round(cpu_s, 2),
            **{state: round(t.states[state] / t.samples, 4) for state in ("idle", "gil", "busy")},
            "phases": {name: round(n / busy, 4) for name, n in t.phases.most_common()} if busy else {},
            "top_leaves": [[leaf, round(n / busy, 4)] for leaf, n in t.leaves.most_common(top)]}


def print_level(r: dict) -> None:
    mode = "native frames, pausing the server" if r["native"] else "Python frames, nonblocking"
    print(f"\n== {r['clients']} clients: profile {r['seconds']:.1f} s at {r['rate_hz']} Hz ({mode}); "
          f"{r['ok']} answered, {r['sentences_per_s']} sentences/s, p50 {r['p50_ms']} ms, "
          f"p99 {r['p99_ms']} ms, {r['errors']} errors; queue {r['mean_queue_ms']} ms, "
          f"decode {r['mean_decode_ms']} ms per request; unprofiled just before: "
          f"{r['unprofiled_sentences_per_s']} sentences/s ({r['unprofiled_ok']} answered)")
    core = 100 / r["seconds"]  # CPU s -> % of one core
    print(f"CPU s over the profile: server {r['server_cpu_s']:.2f} ({core * r['server_cpu_s']:.0f}% of "
          f"a core), py-spy {r['py_spy_cpu_s']:.2f} ({core * r['py_spy_cpu_s']:.0f}%), load generator "
          f"{r['generator_cpu_s']:.2f} ({core * r['generator_cpu_s']:.0f}%); {r['py_spy_samples']} samples, "
          f"{r['py_spy_errors']} py-spy errors")
    print(f"  {'thread (tid)':<34} {'role':<16} {'samples':>7} {'idle':>6} {'gil':>6} {'busy':>6} "
          f"{'cpu s':>6}")
    for t in r["threads"]:
        print(f"  {t['name'] + ' (' + str(t['tid']) + ')':<34} {t['role']:<16} {t['samples']:>7} "
              f"{t['idle']:>6.1%} {t['gil']:>6.1%} {t['busy']:>6.1%} {t['cpu_s']:>6.2f}")
    unseen = [u for u in r["unseen_threads"] if u["cpu_s"] > 0]
    if unseen:
        print("  not seen by py-spy (no Python frames: OpenMP workers, gRPC C core): "
              + ", ".join(f"{u['comm']} ({u['tid']}) {u['cpu_s']:.2f} s" for u in unseen))
    for t in r["threads"]:
        busy = round(t["busy"] * t["samples"])
        if busy < 5:  # a handful of samples says nothing
            continue
        print(f"{t['name']} ({t['tid']}): {busy} busy samples by phase: "
              + ", ".join(f"{name} {share:.1%}" for name, share in t["phases"].items()))
        print("  top leaf frames of its busy samples:")
        for leaf, share in t["top_leaves"]:
            print(f"    {share:>6.1%}  {leaf}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (unless --server-target)")
    p.add_argument("--corpus", type=Path, required=True, help="source sentences, one per line (.gz or plain)")
    p.add_argument("--sentences", type=int, default=0, help="use the first N sentences (0: all), cycled")
    p.add_argument("--concurrency", default="1,32", help="closed-loop client counts, one profile each")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--duration", type=int, default=10, help="seconds py-spy samples each level")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each profile starts")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--native", action="store_true",
                   help="native frames too (torch, oneDNN, gRPC C core): py-spy then pauses the server for "
                        "each sample (default: Python frames only, read without pausing it)")
    p.add_argument("--py-spy", help="py-spy executable (default: beside this Python, else on PATH)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server's decoding engine")
    p.add_argument("--max-batches", type=int, default=4,
                   help="server batches decoding at once (batching.max_batches)")
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous")
    p.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                   help="server config override, e.g. batching.max_join_delay_ms=20 (repeatable)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the server process only (repeatable)")
    p.add_argument("--server-target", metavar="HOST:PORT",
                   help="profile a running server instead of starting one")
    p.add_argument("--server-pid", type=int, help="that server's pid (py-spy attaches to it)")
    p.add_argument("--metrics-url", help="that server's Prometheus URL, for its queue and decode times")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each call, seconds")
    p.add_argument("--top", type=int, default=15, help="leaf frames listed per busy thread")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--keep-raw", type=Path, metavar="DIR", help="keep py-spy's raw files here")
    args = p.parse_args(argv)
    args.server_threads = 0  # load.serving's: the server takes --threads
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency takes positive client counts")
    if bool(args.server_target) != bool(args.server_pid):
        p.error("--server-target and --server-pid go together: py-spy needs the pid")
    if not args.server_target and not args.checkpoint:
        p.error("--checkpoint is required unless --server-target")
    args.py_spy = args.py_spy or shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                                           f"{os.environ.get('PATH', '')}")
    if not args.py_spy:
        p.error("py-spy not found: pip install -e '.[profile]'")
    for flag, values in (("--server-env", args.server_env), ("--server-set", args.server_set)):
        if any("=" not in kv for kv in values):
            p.error(f"{flag} takes KEY=VALUE, got {values}")
    args.request_sizes = (1, 1)  # what load.serving sizes the server's queue by
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sentences = read_sentences(args.corpus, args.sentences)
    options = pb.DecodingOptions(beam_size=args.beam_size)
    requests = [pb.TranslateRequest(texts=[s], options=options) for s in sentences]
    if args.keep_raw:
        args.keep_raw.mkdir(parents=True, exist_ok=True)
    levels = []
    with tempfile.TemporaryDirectory() as tmp, serving(args, args.batching) as server:
        channels = [grpc.insecure_channel(server.target) for _ in range(CHANNELS)]
        stubs = [pb_grpc.TranslatorStub(c) for c in channels]
        print(f"server pid {server.pid} on {server.target}; {len(sentences)} sentences, "
              f"beam {args.beam_size}, {args.threads} torch threads", flush=True)
        print("py-spy: " + " ".join(py_spy_command(args, server.pid, Path("FILE"))), flush=True)
        for clients in args.concurrency:
            levels.append(profile_level(args, server, stubs, requests, clients, args.keep_raw or Path(tmp)))
            print_level(levels[-1])
        for c in channels:
            c.close()
    if args.json:
        result = {"checkpoint": str(args.checkpoint), "corpus": str(args.corpus), "sentences": len(sentences),
                  "beam_size": args.beam_size, "threads": args.threads, "batching": args.batching,
                  "server_set": args.server_set, "server_env": args.server_env, "phases": PHASES,
                  "levels": levels}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
