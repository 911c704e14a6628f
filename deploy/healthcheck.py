"""Container health check: ask a server's grpc.health.v1 service whether it is SERVING.

    python healthcheck.py [HOST:PORT] [--service NAME] [--timeout SECONDS]

Exit status 0 when SERVING, 1 otherwise (NOT_SERVING while draining, unreachable, timed out),
as Docker's HEALTHCHECK expects. Kubernetes does not need it: its probes speak gRPC health.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 3.0) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) of `service` ("" = the whole server)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Exit 0 when a gRPC server reports SERVING.")
    p.add_argument("target", nargs="?", default="localhost:50051")
    p.add_argument("--service", default="", help="service name to ask about (default: the server)")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    try:
        status = check(args.target, args.service, args.timeout)
    except grpc.RpcError as e:
        print(f"{args.target}: {e.code().name} {e.details()}", file=sys.stderr)
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
