"""sha256 digests of a checkpoint's parts, independent of how torch lays them out in the file.

The weights' digest covers, for every tensor in name order, a JSON header `[name, dtype, shape]`
and a newline, then the tensor's raw bytes (C order, the machine's byte order). The header fixes
how many bytes follow, so the stream is unambiguous; the same weights always give the same digest
whatever their storage sharing, strides or position in the zip archive.
"""

from __future__ import annotations

import hashlib
import json

import torch


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """Digest of named tensors (on any device) by name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        digest.update(header.encode() + b"\n")
        if t.numel():
            # A uint8 view of the contiguous values: numpy lacks bfloat16 but not bytes.
            digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_sha256(text: str) -> str:
    return bytes_sha256(text.encode("utf-8"))
