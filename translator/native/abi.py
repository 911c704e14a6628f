"""The C kernels' ABI in ctypes: csrc/kernels.h's version, structs and signatures.

Kept in step with the header by hand, and checked against the built library at load
(`layout`, loader.open_library): a library whose version, struct sizes or field offsets differ
is refused, so a mismatch falls back to torch instead of corrupting memory.
"""

from __future__ import annotations

import ctypes

ABI_VERSION = 2  # NMT_KERNELS_ABI_VERSION of csrc/kernels.h

I64, PTR, F32, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
STRIDES = I64 * 4
PTRS3 = PTR * 3


class LayerStep(ctypes.Structure):
    """`layer_t`: one decoder layer's weights and caches."""

    _fields_ = [("norm_w", PTRS3), ("norm_b", PTRS3)] + [
        (name, PTR) for name in (
            "self_q_w", "self_q_b", "self_kv_w", "self_kv_b", "self_out_w", "self_out_b",
            "cross_q_w", "cross_q_b", "cross_out_w", "cross_out_b", "ff_in_w", "ff_in_b", "ff_out_w", "ff_out_b",
            "self_k", "self_v",
        )
    ] + [("self_slot_stride", I64), ("self_row_stride", I64), ("cross_k", PTR), ("cross_v", PTR),
         ("cross_k_strides", STRIDES), ("cross_v_strides", STRIDES)]


class DecoderStep(ctypes.Structure):
    """`step_t`: the shapes and masks one step shares across layers."""

    _fields_ = [(name, I64) for name in ("R", "D", "H", "F", "N", "S", "past")] + [
        ("norm_first", INT), ("threads", INT), ("eps", F32),
        ("self_mask", PTR), ("self_mask_strides", STRIDES), ("src_mask", PTR), ("src_mask_strides", STRIDES),
        ("self_rows", PTR),
    ]


STRUCTS: tuple[type[ctypes.Structure], ...] = (LayerStep, DecoderStep)  # in nmt_kernels_abi's order

SIGNATURES = {  # name: (argument types, result type), as declared in csrc/kernels.h
    "few_query_attention": ([PTR] * 9 + [I64] * 5 + [F32, PTR, INT, PTR], INT),
    "layer_norm": ([PTR] * 4 + [I64] * 2 + [F32, INT], None),
    "decoder_step": ([PTR, PTR, I64, PTR, PTR], INT),
    "pack_panels": ([PTR, PTR, I64, I64], None),
    "panel_linear": ([PTR] * 4 + [I64] * 3 + [INT, INT], None),
    "move_rows": ([I64] + [PTR] * 7 + [I64], None),
    "argmax_log_prob": ([PTR, I64, I64, I64, PTR, PTR, INT], None),
}


def layout(structs: tuple[type[ctypes.Structure], ...] = STRUCTS) -> list[int]:
    """What nmt_kernels_abi writes for these structs: each one's size, then its fields' offsets."""
    out: list[int] = []
    for struct in structs:
        out.append(ctypes.sizeof(struct))
        out.extend(getattr(struct, name).offset for name, *_ in struct._fields_)
    return out


def library_abi(lib: ctypes.CDLL) -> tuple[int, list[int]]:
    """The version and layout a loaded library reports; AttributeError where it has no nmt_kernels_abi."""
    fn = lib.nmt_kernels_abi
    fn.argtypes, fn.restype = [PTR, I64, PTR], I64
    count = I64(0)
    capacity = 256
    values = (I64 * capacity)()
    version = fn(ctypes.addressof(values), capacity, ctypes.addressof(count))
    return version, list(values[: min(count.value, capacity)])
