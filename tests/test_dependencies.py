"""Dependencies are declared once, by use: the base install translates a checkpoint offline, `serve`
adds the gRPC server and client, `train` and `export` the offline tools, and `dev` what the suite imports.
The runtime package imports nothing from the training extras."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.utils import canonicalize_name

from tests.conftest import tiny_model_config
from tests.dependencies import PROJECT, ROOT, closure, distributions, installed, requirements, third_party
from translator.checkpoint import save_checkpoint
from translator.model import build_model

# Where each tree's code runs, and the extras that install it.
TREES = {"translator": ("serve", "plot"), "training": ("serve", "train", "export"), "tests": ("dev",),
         "benchmarks": ("dev", "splitters", "profile"), "deploy": ("serve",)}
# Modules of the training and export extras, and of the server.
TRAINING = ["datasets", "tensorboard", "matplotlib", "sacrebleu", "transformers", "ctranslate2", "safetensors"]
SERVING = ["grpc", "grpc_health", "grpc_reflection", "google"]


def run_blocked(blocked: list[str], code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing any of `blocked` fails as if not installed."""
    prelude = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("tree", sorted(TREES))
def test_every_third_party_import_is_declared_in_the_extras_that_install_it(tree):
    declared = requirements(*TREES[tree])
    for path in sorted((ROOT / tree).rglob("*.py")):
        for module in sorted(third_party(path)):
            if tree == "benchmarks" and (ROOT / "benchmarks" / f"{module}.py").exists():
                continue  # a sibling script run from benchmarks/
            provided = distributions(module)
            assert provided & declared, (f"{path.relative_to(ROOT)} imports {module} ({', '.join(sorted(provided))}),"
                                         f" not declared in the base install or {TREES[tree]}")


def only(*extras: str) -> list[str]:
    """Installed top-level modules outside the base install, `extras` and what they require: blocked,
    a subprocess sees what an install of just those would have."""
    kept = closure(requirements(*extras)) | {canonicalize_name(PROJECT["name"])}
    return sorted(m for m, dists in installed().items() if m.isidentifier() and not distributions(m) & kept)


def test_runtime_package_imports_nothing_from_the_training_extras():
    code = ("import pkgutil, importlib, translator\n"
            "for m in pkgutil.walk_packages(translator.__path__, 'translator.'):\n"
            "    importlib.import_module(m.name)\n")
    blocked = only("serve")
    assert set(TRAINING) <= set(blocked), "a training or export extra is in the serve install"
    done = run_blocked(blocked, code)
    assert done.returncode == 0, done.stderr


def test_base_install_translates_a_checkpoint_offline(tmp_path, toy_tokenizer):
    torch.manual_seed(0)
    cfg = tiny_model_config()
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, config={"model": dataclasses.asdict(cfg), "data": {"src_lang": "en", "tgt_lang": "de"}},
                    tokenizer=toy_tokenizer, model=build_model(cfg))
    (tmp_path / "in.txt").write_text("the red dog runs\na small cat sleeps\n")
    code = ("from translator.cli import translate_main\n"
            f"raise SystemExit(translate_main(['--checkpoint', {str(ckpt)!r}, '--input', {str(tmp_path / 'in.txt')!r},"
            f" '--output', {str(tmp_path / 'out.txt')!r}]))\n")
    done = run_blocked(only(), code)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "out.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize("flags, blocked, extra", [
    (["--server", "localhost:1"], SERVING, "serve"),
    (["--checkpoint", "missing.pt", "--attention-png", "a.png"], TRAINING, "plot"),
])
def test_translate_names_the_extra_a_flag_needs(flags, blocked, extra):
    code = f"from translator.cli import translate_main\nraise SystemExit(translate_main({json.dumps(flags)}))\n"
    done = run_blocked(blocked, code)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {flags[-2]} needs the {extra!r} extra: pip install 'nmt-translator[{extra}]'"


def test_setup_and_test_scripts_install_the_extras_that_exist():
    extras = set(PROJECT["optional-dependencies"])
    for script, wanted in (("scripts/test.sh", {"dev"}), ("scripts/run.sh", {"train", "serve"})):
        text = Path(ROOT / script).read_text()
        (line,) = [x for x in text.splitlines() if "scripts/setup.sh" in x and not x.lstrip().startswith("#")]
        named = set(line.split("scripts/setup.sh", 1)[1].split()[1].split(","))
        assert named == wanted and named <= extras, f"{script}: {line.strip()}"
