"""Deployment files: the manifests and compose file parse and hang together, the images' commands
work outside a container, and the container health check tells SERVING from the rest.

Docker and Kubernetes are not run here; these checks read the files as the tools would.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.dependencies import distributions, following_translator, requirements
from training.config import resolve_config_path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def load_script(path: Path):
    """A script that is not part of a package (deploy/healthcheck.py is copied into the image)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = load_script(DEPLOY / "healthcheck.py")

def manifests() -> dict[str, dict]:
    """Every Kubernetes object under deploy/k8s by `Kind/name`."""
    out = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def instruction(steps: list[tuple[str, str]], name: str) -> list[str]:
    return [args for op, args in steps if op == name]


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def server_stage() -> list[tuple[str, str]]:
    """The instructions of Dockerfile.server's runtime stage (before the `baked` stage)."""
    steps = dockerfile("Dockerfile.server")
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    return steps[froms[0] : froms[1]]


def serve_args(args: list[str]) -> list[str]:
    """Container args with the image's config path pointing at the repository's deploy/serve.yaml."""
    return [str(DEPLOY / "serve.yaml") if a == "/etc/nmt/serve.yaml" else a for a in args]


def grace_seconds() -> float:
    from translator.serve_cli import parse_config

    return parse_config(serve_args(["--config", "/etc/nmt/serve.yaml", "--checkpoint", "m.pt"])).grace_seconds


def test_server_image_is_slim_non_root_and_checks_grpc_health():
    steps = server_stage()
    assert instruction(steps, "FROM")[0].split()[0].startswith("python:") and "-slim" in instruction(steps, "FROM")[0]
    user = instruction(steps, "USER")[-1]
    assert user not in ("root", "0")
    assert "50051" in instruction(steps, "EXPOSE")[0].split()
    (check,) = instruction(steps, "HEALTHCHECK")
    assert exec_form(check.split("CMD", 1)[1]) == ["python", "/app/healthcheck.py", "localhost:50051"]
    assert exec_form(instruction(steps, "ENTRYPOINT")[0]) == ["nmt-serve"]


def test_images_copy_only_files_that_exist():
    for name in ("Dockerfile.server", "Dockerfile.train"):
        for args in instruction(dockerfile(name), "COPY"):
            sources = [a for a in shlex.split(args)[:-1] if not a.startswith("--") and "$" not in a]
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}"


def test_image_command_is_a_valid_server_config():
    from translator.serve_cli import parse_config

    cmd = exec_form(instruction(server_stage(), "CMD")[-1])
    cfg = parse_config(serve_args(cmd))
    assert (cfg.host, cfg.port, cfg.checkpoint) == ("0.0.0.0", 50051, "/models/model.pt")


def test_entrypoints_are_installed_scripts_whose_help_works(capsys):
    from training.cli import train_main
    from translator.serve_cli import serve_main

    pyproject = (ROOT / "pyproject.toml").read_text()
    for script in ('nmt-serve = "translator.serve_cli:serve_main"', 'nmt-train = "training.cli:train_main"'):
        assert script in pyproject.splitlines(), f"[project.scripts] lacks {script}"
    for main, prog in ((serve_main, "nmt-serve"), (train_main, "nmt-train")):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        assert f"usage: {prog}" in capsys.readouterr().out


def pip_installs(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments of every `pip install` in the RUN instructions, in order."""
    out = []
    for run in instruction(steps, "RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                out.append(words[2:])
    return out


def test_server_image_installs_cpu_torch_then_the_serve_extra_from_pyproject():
    setup_pin = next(w for w in shlex.split((ROOT / "scripts" / "setup.sh").read_text()) if w.startswith("torch=="))
    torch_pin, project = pip_installs(server_stage())
    assert torch_pin == [setup_pin, "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert project == [".[serve]"], "the server image installs the project with its serve extra, no versions by hand"
    assert "COPY pyproject.toml README.md ./" in [f"COPY {a}" for a in instruction(server_stage(), "COPY")]


def test_train_image_installs_the_train_extra():
    assert pip_installs(dockerfile("Dockerfile.train")) == [[".[train]"]]


def test_serve_extra_provides_every_module_nmt_serve_imports():
    declared = requirements("serve")
    for module in sorted(following_translator(ROOT / "translator" / "serve_cli.py")):
        assert distributions(module) & declared, f"nmt-serve imports {module}: declare it in the base install or `serve`"


def test_server_deployment_probes_grpc_health_and_requests_resources():
    spec = manifests()["Deployment/nmt-server"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert spec["securityContext"]["runAsNonRoot"] is True
    from translator.serve_cli import parse_config

    assert parse_config(serve_args(c["args"])).host == "0.0.0.0"


def test_termination_grace_covers_prestop_and_the_servers_drain():
    spec = manifests()["Deployment/nmt-server"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= float(command[1]) + grace_seconds() + 5
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    assert float(compose["services"]["server"]["stop_grace_period"].rstrip("s")) >= grace_seconds() + 5


def test_service_autoscaler_and_disruption_budget_select_the_deployment():
    m = manifests()
    deployment = m["Deployment/nmt-server"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for name in ("Service/nmt-server", "Service/nmt-server-headless"):
        service = m[name]["spec"]
        assert service["selector"].items() <= labels.items(), name
        assert {p["targetPort"] for p in service["ports"]} <= port_names, name
    hpa = m["HorizontalPodAutoscaler/nmt-server"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nmt-server"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    pdb = m["PodDisruptionBudget/nmt-server"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"]  # a drain can always evict one replica


def test_training_job_runs_torchrun_across_its_pods():
    m = manifests()
    job = m["Job/wmt14-base"]["spec"]
    pod = job["template"]["spec"]
    (c,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"] if "=" in a)
    assert c["command"] == ["torchrun"] and "--no-python" in c["args"]
    assert c["args"][c["args"].index("--no-python") + 1] == "nmt-train"
    assert job["completionMode"] == "Indexed" and int(args["nnodes"]) == job["completions"] == job["parallelism"]
    assert int(args["nproc_per_node"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    service = m[f"Service/{pod['subdomain']}"]["spec"]
    assert service["clusterIP"] == "None"
    host, port = args["rdzv_endpoint"].split(":")
    assert host == f"wmt14-base-0.{pod['subdomain']}" and int(port) in {p["port"] for p in service["ports"]}
    assert resolve_config_path(args["config"]).exists()


def test_train_image_runs_torchrun_as_a_non_root_user():
    steps = dockerfile("Dockerfile.train")
    assert exec_form(instruction(steps, "ENTRYPOINT")[0]) == ["torchrun"]
    cmd = exec_form(instruction(steps, "CMD")[0])
    assert cmd[cmd.index("--no-python") + 1] == "nmt-train"
    assert resolve_config_path(cmd[cmd.index("--config") + 1]).exists()
    assert instruction(steps, "USER")[-1] not in ("root", "0")


def test_compose_runs_a_server_and_a_client_that_waits_for_its_health():
    services = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())["services"]
    server, client = services["server"], services["client"]
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert any(v.endswith(":/models/model.pt:ro") for v in server["volumes"])
    assert client["depends_on"]["server"]["condition"] == "service_healthy"
    assert client["command"][0] == "server:50051"
    code = client["entrypoint"][client["entrypoint"].index("-c") + 1]
    ast.parse(code)


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_healthcheck_passes_only_while_serving(health_server, capsys):
    servicer, target = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([target]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # what a draining server says
    assert healthcheck.main([target]) == 1
    assert "NOT_SERVING" in capsys.readouterr().out


def test_healthcheck_fails_for_an_unreachable_server(capsys):
    assert healthcheck.main(["127.0.0.1:1", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_a_checkpoint_trained_under_the_default_umask_is_readable_by_the_server_user(toy_corpus):
    """nmt-train (here root, umask 022) writes files the image's user (UID 10001) may read: modes
    0644 for files, 0755 for folders; as root, a process of that UID reads the checkpoint."""
    from tests.conftest import tiny_overrides
    from training.cli import train_main

    uid = int(instruction(server_stage(), "USER")[-1])
    shared = Path(tempfile.mkdtemp(prefix="nmt-mount-"))  # a folder another user can reach, as a mount is
    old = os.umask(0o022)
    try:
        os.chmod(shared, 0o755)
        run = shared / "run"
        overrides = tiny_overrides(toy_corpus, **{"train.max_steps": 10, "train.valid_every": 10})
        assert train_main(["--config", "cpu", "--out", str(run), "--no-test", *overrides]) == 0
        files = [run / "best.pt", run / "tokenizer.model", *sorted((run / "checkpoints").glob("*.pt"))]
        assert len(files) == 3
        assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}
        assert {d.stat().st_mode & 0o777 for d in (run, run / "checkpoints")} == {0o755}
        if os.geteuid() == 0:
            read = subprocess.run(["cat", str(run / "best.pt")], user=uid, capture_output=True, check=False)
            assert read.returncode == 0 and read.stdout == (run / "best.pt").read_bytes(), read.stderr
    finally:
        os.umask(old)
        shutil.rmtree(shared)


def test_baked_model_is_copied_readable_whatever_its_mode():
    copy = instruction(dockerfile("Dockerfile.server"), "COPY")[-1]
    assert copy.split()[:1] == ["--chmod=0444"] and copy.split()[-1] == "/models/model.pt"
