"""Exported Hugging Face and CTranslate2 models compute what our model computes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config, toy_pairs
from training.export import SPM_FILE, export_main, residual_permutation
from translator.checkpoint import save_checkpoint
from translator.config import to_dict
from translator.decoding import DecodeOptions, greedy_search
from translator.model import EncoderDecoder, build_model, sinusoids
from translator.translate import Translator, batch_tensor

SOURCES = [src for src, _ in toy_pairs(6, seed=7)] + ["the red dog sees a small cat on the street"]
MAX_LEN = 12  # output budget of every decoder below, EOS included


@dataclass
class Exported:
    model: EncoderDecoder
    translator: Translator
    checkpoint: Path
    hf_dir: Path
    ct2_dir: Path


@pytest.fixture(scope="module", params=[False, True], ids=["post-norm", "pre-norm"])
def exported(request, tmp_path_factory, toy_tokenizer) -> Exported:
    """A seeded untrained model saved as a checkpoint and exported through the command line."""
    pytest.importorskip("transformers")
    pytest.importorskip("ctranslate2")
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    cfg = tiny_model_config(norm_first=request.param)
    model = build_model(cfg).eval()
    with torch.no_grad():
        # An untrained model repeats its input token forever, its norms are the identity and it
        # never stops: random norms and a louder EOS give varied outputs of several lengths.
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        model.embed.tokens.weight[cfg.eos_id] *= 2.0
    ckpt = tmp / "model.pt"
    config = {"model": to_dict(cfg), "data": {"src_lang": "en", "tgt_lang": "de"}}
    save_checkpoint(ckpt, config=config, tokenizer=toy_tokenizer, model=model)
    hf_dir, ct2_dir = tmp / "hf", tmp / "ct2"
    assert export_main([str(ckpt), "--hf", str(hf_dir), "--ct2", str(ct2_dir)]) == 0
    return Exported(model, Translator(model, toy_tokenizer), ckpt, hf_dir, ct2_dir)


def our_greedy(e: Exported) -> tuple[list[list[int]], list[float]]:
    src = batch_tensor(e.translator.encode_sources(SOURCES), e.model.cfg.pad_id)
    # length_penalty 0: scores are summed log-probabilities (EOS included), as CTranslate2's are
    # with length_penalty=0.
    opts = DecodeOptions(max_len_a=0.0, max_len_b=MAX_LEN, length_penalty=0.0)
    hyps = greedy_search(e.model, src, opts)
    return hyps.tokens, hyps.scores


def test_residual_permutation_turns_interleaved_sinusoids_into_halves():
    table = sinusoids(10, 8)
    position = torch.arange(10.0).unsqueeze(1)
    freq = 10000 ** (-torch.arange(0, 8, 2) / 8)
    halves = torch.cat([torch.sin(position * freq), torch.cos(position * freq)], dim=1)
    torch.testing.assert_close(table[:, residual_permutation(8)], halves)


def test_hf_model_class_follows_norm_placement(exported):
    from transformers import AutoConfig

    expected = "pegasus" if exported.model.cfg.norm_first else "marian"
    assert AutoConfig.from_pretrained(exported.hf_dir).model_type == expected


def test_hf_logits_equal_ours(exported):
    from transformers import AutoModelForSeq2SeqLM

    hf = AutoModelForSeq2SeqLM.from_pretrained(exported.hf_dir).eval()
    cfg = exported.model.cfg
    src = batch_tensor(exported.translator.encode_sources(SOURCES), cfg.pad_id)  # (B, S)
    g = torch.Generator().manual_seed(1)
    tgt_in = torch.randint(4, cfg.vocab_size, (src.size(0), 9), generator=g)  # (B, T)
    tgt_in[:, 0] = cfg.bos_id
    with torch.inference_mode():
        ours = exported.model(src, tgt_in)  # (B, T, V)
        theirs = hf(input_ids=src, attention_mask=src != cfg.pad_id, decoder_input_ids=tgt_in).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_hf_tokenizer_gives_our_source_ids_and_text(exported, toy_tokenizer):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(exported.hf_dir)
    ids = exported.translator.encode_sources(SOURCES)
    assert hf_tok(SOURCES).input_ids == ids
    assert hf_tok.batch_decode(ids, skip_special_tokens=True) == toy_tokenizer.decode(ids)


def test_hf_greedy_generate_equals_our_greedy(exported):
    from transformers import AutoModelForSeq2SeqLM

    hf = AutoModelForSeq2SeqLM.from_pretrained(exported.hf_dir).eval()
    cfg = exported.model.cfg
    src = batch_tensor(exported.translator.encode_sources(SOURCES), cfg.pad_id)
    out = hf.generate(
        input_ids=src, attention_mask=src != cfg.pad_id, num_beams=1, do_sample=False, max_new_tokens=MAX_LEN
    )
    theirs = []
    for row in out[:, 1:].tolist():  # drop the decoder start token
        theirs.append(row[: row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    assert theirs == our_greedy(exported)[0]


def test_ct2_greedy_equals_our_greedy_with_same_scores(exported, toy_tokenizer):
    import ctranslate2

    translator = ctranslate2.Translator(str(exported.ct2_dir), device="cpu", intra_threads=1)
    pieces = [toy_tokenizer.pieces(ids) for ids in toy_tokenizer.encode(SOURCES)]  # EOS added by the model
    results = translator.translate_batch(
        pieces, beam_size=1, max_decoding_length=MAX_LEN, min_decoding_length=0,
        return_scores=True, length_penalty=0.0,
    )
    tokens, scores = our_greedy(exported)
    vocab = {piece: i for i, piece in enumerate(toy_tokenizer.pieces(list(range(toy_tokenizer.vocab_size))))}
    assert [[vocab[p] for p in r.hypotheses[0]] for r in results] == tokens
    assert [r.scores[0] for r in results] == pytest.approx(scores, abs=1e-3)


def test_ct2_export_ships_the_tokenizer(exported, toy_tokenizer):
    assert (exported.ct2_dir / SPM_FILE).read_bytes() == toy_tokenizer.model_bytes


def test_ct2_int8_export_translates_every_sentence(exported, tmp_path, toy_tokenizer):
    import ctranslate2

    out = tmp_path / "ct2-int8"
    assert export_main([str(exported.checkpoint), "--ct2", str(out), "--quantization", "int8"]) == 0
    translator = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    pieces = [toy_tokenizer.pieces(ids) for ids in toy_tokenizer.encode(SOURCES)]
    results = translator.translate_batch(pieces, beam_size=1, max_decoding_length=MAX_LEN)
    assert len(results) == len(SOURCES)
    assert all(1 <= len(r.hypotheses[0]) <= MAX_LEN for r in results)


def test_export_of_missing_checkpoint_is_an_error(tmp_path, capsys):
    assert export_main([str(tmp_path / "none.pt"), "--ct2", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err

