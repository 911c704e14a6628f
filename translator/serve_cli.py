"""`nmt-serve`: serve one checkpoint or several named models over gRPC until SIGTERM / SIGINT,
then drain and exit 0. SIGHUP reloads every model from its configured path (swapped without
downtime; a checkpoint that fails verification is refused, logged, and the old model serves on)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from translator.config import ConfigError, apply_overrides, apply_values, from_dict, load_yaml

# flag -> ServerConfig key
FLAGS = {
    "checkpoint": "checkpoint", "host": "host", "port": "port", "metrics_port": "metrics_port",
    "auth_token_file": "auth_token_file", "admin_token_file": "admin_token_file", "grace_seconds": "grace_seconds", "threads": "threads",
    "tls_cert": "tls.cert_file", "tls_key": "tls.key_file", "tls_client_ca": "tls.client_ca_file",
}


def parse_config(argv: list[str] | None) -> Any:
    """ServerConfig from an optional YAML file, then flags, then dotted overrides."""
    from translator.server import ServerConfig

    p = argparse.ArgumentParser(prog="nmt-serve", description="Serve a translation checkpoint over gRPC.")
    p.add_argument("--config", help="YAML file with ServerConfig keys (see deploy/serve.yaml)")
    p.add_argument("--checkpoint", help="checkpoint file (.pt) to serve")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="serve checkpoint PATH as model NAME; repeat for several (the first is the default)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default 50051)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this HTTP port")
    p.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")
    p.add_argument("--auth-token-file", help="require 'authorization: Bearer <token in file>'")
    p.add_argument("--admin-token-file", help="turn on the Admin service (load / reload / unload models), "
                   "its calls needing 'authorization: Bearer <token in file>'")
    p.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to: mutual TLS")
    p.add_argument("--grace-seconds", type=float, help="how long in-flight requests may finish on shutdown")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as limits.max_sentences=32")
    args = p.parse_args(argv)
    data = load_yaml(args.config) if args.config else {}
    # Flag values are taken as argparse typed them (strings stay strings); only the dotted
    # overrides are parsed, as YAML scalars.
    flags = {key: getattr(args, name) for name, key in FLAGS.items() if getattr(args, name) is not None}
    if args.reflection:
        flags["reflection"] = True
    if args.model:
        flags["models"] = [_model_flag(value) for value in args.model]
        flags.setdefault("checkpoint", "")  # --model replaces the config file's checkpoint
    return from_dict(ServerConfig, apply_overrides(apply_values(data, flags), list(args.overrides)))


def _model_flag(value: str) -> dict[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--model takes NAME=PATH, got {value!r}")
    return {"name": name, "checkpoint": path}


def serve_main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from translator.checkpoint import CheckpointError
    from translator.engine_process import EngineStartError
    from translator.runtime import keep_freed_memory
    from translator.server import build_models, create_server

    keep_freed_memory()
    if cfg.engine_process:  # the front end only tokenizes: its torch ops are tiny
        torch.set_num_threads(1)
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)
    # The decoding engine runs on this thread, which loads the models: one thread doing all the
    # OpenMP work keeps libgomp spinning between parallel regions (translator.batcher); or on the
    # main thread of a process of its own per model (engine_process), which warms itself up.
    models = None
    try:
        models = build_models(cfg, engine_thread=False)
        server, port = create_server(cfg, models)
    except (ConfigError, CheckpointError, EngineStartError, OSError) as e:
        if models is not None:
            models.stop()
        print(f"error: {e}", file=sys.stderr)
        return 1
    drainer = threading.Thread(target=_drain, args=(server, cfg.grace_seconds), name="drain")

    reloader = Reloader(models)

    def on_signal(*_: Any) -> None:
        if drainer.ident is None:  # the first signal starts the drain; later ones change nothing
            reloader.stop()
            drainer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, lambda *_: reloader.ask())
    try:
        server.start()
        metrics = f", metrics on http://{cfg.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        print(f"listening on {cfg.host}:{port}{metrics}", flush=True)
        models.run_engine()  # until the drain stops the models
        if drainer.ident is None:  # not drained: the engine process died and could not be restarted
            server.stop()
            print("error: the decoding engine stopped and could not be restarted", file=sys.stderr)
            return 1
        drainer.join()
        return 0
    finally:
        reloader.stop()  # the process exits once a reload still running has ended


class Reloader:
    """SIGHUP's reloads of every model from its path, on a thread of their own, one at a time.

    Signals that come while a reload runs make one more reload after it, however many they are:
    a file changed before a signal is always read, and a burst of signals costs two reloads, not
    one each. None starts once the server drains (`stop`); the process exits once the one still
    running, if any, has ended (a thread torn down inside torch's or gRPC's C++ at exit aborts
    the process). A refused checkpoint is logged and its model keeps serving.
    """

    def __init__(self, models) -> None:
        self._models = models
        # Reentrant: ask() runs in a signal handler, which may interrupt the main thread in ask().
        self._cond = threading.Condition(threading.RLock())
        self._asked = 0
        self._stopped = False
        threading.Thread(target=self._run, name="reload").start()

    def ask(self) -> None:
        with self._cond:
            self._asked += 1
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        from translator.models import load_priority

        log = logging.getLogger("translator.server")
        load_priority()  # this thread only reloads
        done = 0
        while True:
            with self._cond:
                while not self._stopped and self._asked <= done:
                    self._cond.wait()
                if self._stopped:
                    return
                done = self._asked  # the signals this reload answers
                log.info("SIGHUP: reloading %d models", len(self._models.services()))
            for name, error in self._models.reload_all().items():
                if error is None:
                    log.info("model %s reloaded", name)
                else:
                    log.error("model %s kept: the new checkpoint was refused: %s", name, error)


def _drain(server, grace: float) -> None:
    logging.getLogger("translator.server").info("draining: up to %.1f s for in-flight requests", grace)
    server.drain(grace)


if __name__ == "__main__":
    sys.exit(serve_main())
