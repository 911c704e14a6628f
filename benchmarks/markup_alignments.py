"""Markup placed through other alignments than the decoder's: single layers, and shifted by one.

`restore_markup` aligns a target token with the cross-attention of the step that predicts it,
averaged over the decoder's layers and heads (translator.model.Decoder.step). Published work
reads alignments off one layer, or off the step at which the token is the decoder's input
("Shift-Att", Chen et al., 2020). This prints, for the cases of benchmarks/markup_placement.py,
the output under each of those alignments beside the decoder's, for a person to judge which puts
the element around the translation of the wrapped word. The translation itself is the same
(beam search as in the service); only the alignment it is placed through changes.

    python benchmarks/markup_alignments.py CKPT --src ../shared/data/multi30k/val.en.gz --beam-size 5

Variants: `mean` (the decoder's), `L<k>` (layer k alone), `S<k>` and `Smean` (the step after:
row t+1 of the teacher-forced pass, whose input is token t).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import torch
from markup_placement import DATA, wrap

from translator.cli import add_decoding_flags, decoding_options
from translator.documents import split_document
from translator.markup import parse_markup
from translator.placement import restore_markup
from translator.translate import Translator, aligned_translation


def layer_attention(model, src_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Cross-attention of every decoder layer, averaged over heads, over the teacher-forced target
    BOS + tokens + EOS: (layers, T + 2, S) for T tokens, row i the step whose input is position i."""
    cfg = model.cfg
    rows: list[torch.Tensor] = []

    def record(module, inputs, _output):
        x, memory, mask = inputs
        rows.append(module.weights(x, module.keys_values(memory)[0], mask)[0])  # (T + 2, S)

    hooks = [layer.cross_attn.register_forward_hook(record) for layer in model.decoder.layers]
    try:
        with torch.no_grad():
            memory, mask = model.encode(torch.tensor([src_ids]))
            model.decode(torch.tensor([[cfg.bos_id] + tokens + [cfg.eos_id]]), memory, mask)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(rows)


def variants(att: torch.Tensor) -> dict[str, torch.Tensor]:
    """Alignments (T, S) of the T tokens from layer_attention's (layers, T + 2, S)."""
    T = att.size(1) - 2
    out = {"mean": att[:, :T].mean(0), "Smean": att[:, 1 : T + 1].mean(0)}
    for k in range(att.size(0)):
        out[f"L{k}"], out[f"S{k}"] = att[k, :T], att[k, 1 : T + 1]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--src", type=Path, default=DATA / "val.en.gz")
    p.add_argument("--lang", default="en")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--sentences", type=int, default=50)
    p.add_argument("--json", type=Path, help="write the counts of outputs that differ from the decoder's here")
    p.add_argument("--variants", default="mean,L3,L4,L5,Smean,S3,S4", help="comma-separated: mean, Smean, L<k>, S<k>")
    add_decoding_flags(p)
    args = p.parse_args(argv)
    from translator.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.build_model().eval()
    translator = Translator(model, ckpt.tokenizer)
    opts = decoding_options(args).replace(alignment=True, n_best=1)
    names = args.variants.split(",")
    n_layers = len(model.decoder.layers)
    known = {"mean", "Smean"} | {f"{kind}{k}" for kind in "LS" for k in range(n_layers)}
    if unknown := [n for n in names if n not in known]:
        p.error(f"--variants: unknown {', '.join(unknown)}; this model has {n_layers} decoder layers "
                f"(mean, Smean, L0-L{n_layers - 1}, S0-S{n_layers - 1})")
    with gzip.open(args.src, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f][args.start : args.start + args.sentences]
    differ = {name: 0 for name in names}
    for i, line in enumerate(lines):
        source = wrap(line, i)
        parsed = parse_markup(source)
        doc = split_document(parsed.text, translator.count_tokens, translator.max_source_tokens, args.lang,
                             breaks=parsed.breaks)
        sources = doc.sources()
        results = translator.translate(sources, opts)
        aligned = {name: [] for name in names}
        for piece, t in zip(sources, results):
            src_ids = translator.tokenizer.encode([piece])[0] + [model.cfg.eos_id]
            table = variants(layer_attention(model, src_ids, t.tokens))
            for name in names:
                aligned[name].append(aligned_translation(translator.tokenizer, piece, t.tokens, table[name]))
        decoder = restore_markup(parsed, doc, [aligned_translation(translator.tokenizer, s, t.tokens, t.alignment)
                                               for s, t in zip(sources, results)]).text
        print(f"== {i} | {source}\n   decoder  {decoder}")
        for name in names:
            text = restore_markup(parsed, doc, aligned[name]).text
            differ[name] += text != decoder
            print(f"  {'*' if text != decoder else ' '}{name:8} {text}")
    print("outputs that differ from the decoder's:", ", ".join(f"{n} {c}" for n, c in differ.items()))
    if args.json:
        args.json.write_text(json.dumps({"cases": len(lines), "differ": differ}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
