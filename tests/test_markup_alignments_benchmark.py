"""benchmarks/markup_alignments.py reads every decoder layer's cross-attention off one teacher-forced
pass; its `mean` must be the alignment the decoder itself records while searching, so that the
other variants differ from the service's placement by the alignment alone."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from tests.conftest import tiny_model_config
from translator.decode_options import DecodeOptions
from translator.model import build_model
from translator.translate import Translator

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports markup_placement beside it
_spec = importlib.util.spec_from_file_location("markup_alignments_benchmark", BENCHMARKS / "markup_alignments.py")
markup_alignments = sys.modules["markup_alignments_benchmark"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(markup_alignments)


def test_the_layer_mean_is_the_decoders_own_alignment_and_the_shift_is_one_row(toy_tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(n_layers=3)).eval()
    translator = Translator(model, toy_tokenizer)
    source = "the red dog runs on the green street"
    for beam in (1, 3):
        result = translator.translate([source], DecodeOptions(beam_size=beam, alignment=True, max_len_b=8))[0]
        src_ids = toy_tokenizer.encode([source])[0] + [model.cfg.eos_id]
        att = markup_alignments.layer_attention(model, src_ids, result.tokens)
        T, S = len(result.tokens), len(src_ids)
        assert T > 0 and att.shape == (3, T + 2, S)
        table = markup_alignments.variants(att)
        assert torch.allclose(table["mean"], result.alignment, atol=1e-5)
        assert torch.equal(table["L1"], att[1, :T]) and torch.equal(table["S1"], att[1, 1 : T + 1])
        assert torch.allclose(table["Smean"].sum(-1), torch.ones(T), atol=1e-5)  # rows are distributions
