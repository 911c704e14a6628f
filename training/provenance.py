"""What a training run records about itself in every checkpoint (translator.provenance.Provenance):
the code commit, package versions and a fingerprint of the training corpus."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from translator.provenance import Provenance

PACKAGES = ("torch", "sentencepiece", "sacrebleu", "nmt-translator")
CODE_ROOT = Path(__file__).resolve().parents[1]


def run_provenance(corpus: str, corpus_sha256: str | None) -> Provenance:
    """The parts of a checkpoint's provenance that hold for the whole run."""
    commit, dirty = code_commit(CODE_ROOT)
    return Provenance(code_commit=commit, code_dirty=dirty, versions=package_versions(), corpus=corpus,
                      corpus_sha256=corpus_sha256)


def code_commit(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the git work tree at root; (None,
    None) outside one or without git (an installed package, a container image)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def pairs_sha256(src: Iterable[str], tgt: Iterable[str]) -> str:
    """Fingerprint of a parallel corpus as loaded: sha256 of `source TAB target NEWLINE` per pair, in
    corpus order, UTF-8. The same pairs give the same fingerprint from a .tsv, a .gz pair of files
    or a Hub dataset; any changed, added, dropped or reordered pair changes it."""
    digest = hashlib.sha256()
    for s, t in zip(src, tgt, strict=True):
        digest.update(f"{s}\t{t}\n".encode())
    return digest.hexdigest()
