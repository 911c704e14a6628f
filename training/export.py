"""Export a checkpoint as a Hugging Face Transformers model and as a CTranslate2 model.

Hugging Face: a post-norm checkpoint (norm_first=False, the paper's layout) becomes a MarianMTModel,
a pre-norm one (final LayerNorm after encoder and decoder) a PegasusForConditionalGeneration; both
classes scale embeddings by sqrt(D), add fixed sinusoids from position 0 and tie the output layer to
the shared embedding. Their sinusoids are laid out as [sin | cos] halves where ours interleave (sin
at even, cos at odd dimensions), so every residual-stream dimension is permuted the same way:
embedding columns, LayerNorm parameters, the input columns of every layer that reads the stream and
the output rows of every layer that writes it. LayerNorm and dot products do not care about the
order of dimensions, so the exported network computes exactly our function.

CTranslate2: the spec is built from our weights through ctranslate2's spec API. Its Transformers
loaders do not fit: the Marian one starts the decoder from a zero embedding and the Pegasus one from
the pad token, where ours starts from BOS. The spec takes our position table as it is, so no
permutation is needed there.

transformers and ctranslate2 are the optional `export` extra; they are imported only when used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from translator.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from translator.model import ModelConfig, sinusoids
from translator.tokenizer import Tokenizer

SPM_FILE = "sentencepiece.model"  # the tokenizer, beside the CTranslate2 model
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the model uses


def residual_permutation(d_model: int) -> Tensor:
    """(D,) index: column j of the [sin | cos] layout is column perm[j] of the interleaved one."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """The piece of every model id; ids past the tokenizer's last piece get placeholder names."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model only {vocab_size} ids")
    pieces = tokenizer.pieces(list(range(tokenizer.vocab_size)))
    return pieces + [f"<unused{i}>" for i in range(vocab_size - len(pieces))]


# ---------------------------------------------------------------- Hugging Face Transformers


def hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict in the names and residual-dimension order of Marian/Pegasus."""
    perm = residual_permutation(cfg.d_model)
    out: dict[str, Tensor] = {}

    def reads(dst: str, weight: Tensor, bias: Tensor) -> None:
        """A layer reading the stream: weight (out, D) gets its input columns permuted."""
        out[f"{dst}.weight"], out[f"{dst}.bias"] = weight[:, perm], bias

    def writes(dst: str, weight: Tensor, bias: Tensor) -> None:
        """A layer writing the stream: weight (D, in) and bias (D,) get their rows permuted."""
        out[f"{dst}.weight"], out[f"{dst}.bias"] = weight[perm], bias[perm]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = state[f"{src}.weight"][perm]
        out[f"{dst}.bias"] = state[f"{src}.bias"][perm]

    def attention(src: str, dst: str) -> None:
        k_w, v_w = state[f"{src}.kv_proj.weight"].chunk(2, dim=0)  # (D, D) each
        k_b, v_b = state[f"{src}.kv_proj.bias"].chunk(2, dim=0)  # (D,) each
        reads(f"{dst}.q_proj", state[f"{src}.q_proj.weight"], state[f"{src}.q_proj.bias"])
        reads(f"{dst}.k_proj", k_w, k_b)
        reads(f"{dst}.v_proj", v_w, v_b)
        writes(f"{dst}.out_proj", state[f"{src}.out_proj.weight"], state[f"{src}.out_proj.bias"])

    def feed_forward(src: str, dst: str) -> None:
        reads(f"{dst}.fc1", state[f"{src}.w_1.weight"], state[f"{src}.w_1.bias"])
        writes(f"{dst}.fc2", state[f"{src}.w_2.weight"], state[f"{src}.w_2.bias"])

    for i in range(cfg.n_layers):
        src, dst = f"encoder.layers.{i}", f"model.encoder.layers.{i}"
        attention(f"{src}.self_attn", f"{dst}.self_attn")
        norm(f"{src}.sublayers.0.norm", f"{dst}.self_attn_layer_norm")
        feed_forward(f"{src}.feed_forward", dst)
        norm(f"{src}.sublayers.1.norm", f"{dst}.final_layer_norm")

        src, dst = f"decoder.layers.{i}", f"model.decoder.layers.{i}"
        attention(f"{src}.self_attn", f"{dst}.self_attn")
        norm(f"{src}.sublayers.0.norm", f"{dst}.self_attn_layer_norm")
        attention(f"{src}.cross_attn", f"{dst}.encoder_attn")
        norm(f"{src}.sublayers.1.norm", f"{dst}.encoder_attn_layer_norm")
        feed_forward(f"{src}.feed_forward", dst)
        norm(f"{src}.sublayers.2.norm", f"{dst}.final_layer_norm")
    if cfg.norm_first:
        norm("encoder.norm", "model.encoder.layer_norm")
        norm("decoder.norm", "model.decoder.layer_norm")

    embedding = state["embed.tokens.weight"][:, perm]  # (V, D)
    for name in ("model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens", "lm_head"):
        out[f"{name}.weight"] = embedding
    positions = sinusoids(cfg.max_positions, cfg.d_model)[:, perm]  # (P, D): now [sin | cos]
    out["model.encoder.embed_positions.weight"] = positions
    out["model.decoder.embed_positions.weight"] = positions
    out["final_logits_bias"] = torch.zeros(1, cfg.vocab_size)  # our generator has no bias
    return {k: v.contiguous() for k, v in out.items()}


def hf_model(ckpt: Checkpoint):
    """The checkpoint as an in-memory MarianMTModel (post-norm) or PegasusForConditionalGeneration (pre-norm)."""
    import transformers

    cfg = ckpt.model_config
    if cfg.norm_first:
        config_cls, model_cls = transformers.PegasusConfig, transformers.PegasusForConditionalGeneration
    else:
        config_cls, model_cls = transformers.MarianConfig, transformers.MarianMTModel
    config = config_cls(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.n_layers,
        decoder_layers=cfg.n_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        activation_function="relu",
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=0.0,
        max_position_embeddings=cfg.max_positions,
        scale_embedding=True,
        tie_word_embeddings=True,
        pad_token_id=cfg.pad_id,
        bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
        decoder_start_token_id=cfg.bos_id,  # our decoder starts from BOS
        forced_eos_token_id=None,  # ours stops at the length budget without forcing EOS
    )
    model = model_cls(config)
    mapped = hf_state_dict(ckpt.model_state, cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise ValueError(f"no weights for {model_cls.__name__} parameters {missing}")
    model.load_state_dict({k: mapped[k] for k in expected}, strict=True)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=cfg.bos_id,
        bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
        pad_token_id=cfg.pad_id,
        max_length=cfg.max_positions,
    )
    return model.eval()


def write_hf_tokenizer(tokenizer: Tokenizer, vocab: list[str], out_dir: Path, src_lang: str, tgt_lang: str) -> None:
    """A MarianTokenizer over our SentencePiece model: source.spm, target.spm, vocab.json, tokenizer_config.json.

    MarianTokenizer appends EOS to sources as we do, and maps pieces to ids through vocab.json, so
    it gives our ids whichever model class sits beside it.
    """
    from transformers import MarianTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        spm = Path(tmp) / "spm.model"
        spm.write_bytes(tokenizer.model_bytes)
        vocab_file = Path(tmp) / "vocab.json"
        vocab_file.write_text(json.dumps({piece: i for i, piece in enumerate(vocab)}, ensure_ascii=False))
        hf_tok = MarianTokenizer(
            source_spm=str(spm),
            target_spm=str(spm),
            vocab=str(vocab_file),
            source_lang=src_lang,
            target_lang=tgt_lang,
            unk_token=vocab[3],
            eos_token=vocab[2],
            pad_token=vocab[0],
            bos_token=vocab[1],
            additional_special_tokens=[],
        )
        hf_tok.save_pretrained(out_dir)


def export_hf(ckpt: Checkpoint, out_dir: Path) -> Path:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model(ckpt).save_pretrained(out_dir)
    data = ckpt.config.get("data", {})
    vocab = vocabulary(ckpt.tokenizer, ckpt.model_config.vocab_size)
    write_hf_tokenizer(ckpt.tokenizer, vocab, out_dir, data.get("src_lang", "src"), data.get("tgt_lang", "tgt"))
    return out_dir


# ---------------------------------------------------------------- CTranslate2


def ct2_spec(ckpt: Checkpoint):
    """A ctranslate2 TransformerSpec holding the checkpoint's weights, vocabulary and token conventions."""
    from ctranslate2.specs import common_spec, transformer_spec

    cfg, state = ckpt.model_config, ckpt.model_state
    spec = transformer_spec.TransformerSpec.from_config(
        cfg.n_layers, cfg.n_heads, pre_norm=cfg.norm_first, activation=common_spec.Activation.RELU
    )

    def linear(dst, src: str) -> None:
        dst.weight, dst.bias = state[f"{src}.weight"], state[f"{src}.bias"]

    def norm(dst, src: str) -> None:
        dst.gamma, dst.beta = state[f"{src}.weight"], state[f"{src}.bias"]

    def self_attention(dst, src: str) -> None:
        # One fused (3D, D) projection: q rows, then our kv_proj's k and v rows.
        dst.linear[0].weight = torch.cat([state[f"{src}.q_proj.weight"], state[f"{src}.kv_proj.weight"]])
        dst.linear[0].bias = torch.cat([state[f"{src}.q_proj.bias"], state[f"{src}.kv_proj.bias"]])
        linear(dst.linear[1], f"{src}.out_proj")

    def feed_forward(dst, src: str, norm_src: str) -> None:
        linear(dst.linear_0, f"{src}.w_1")
        linear(dst.linear_1, f"{src}.w_2")
        norm(dst.layer_norm, norm_src)

    for i, layer in enumerate(spec.encoder.layer):
        src = f"encoder.layers.{i}"
        self_attention(layer.self_attention, f"{src}.self_attn")
        norm(layer.self_attention.layer_norm, f"{src}.sublayers.0.norm")
        feed_forward(layer.ffn, f"{src}.feed_forward", f"{src}.sublayers.1.norm")
    for i, layer in enumerate(spec.decoder.layer):
        src = f"decoder.layers.{i}"
        self_attention(layer.self_attention, f"{src}.self_attn")
        norm(layer.self_attention.layer_norm, f"{src}.sublayers.0.norm")
        linear(layer.attention.linear[0], f"{src}.cross_attn.q_proj")
        linear(layer.attention.linear[1], f"{src}.cross_attn.kv_proj")  # already fused k then v
        linear(layer.attention.linear[2], f"{src}.cross_attn.out_proj")
        norm(layer.attention.layer_norm, f"{src}.sublayers.1.norm")
        feed_forward(layer.ffn, f"{src}.feed_forward", f"{src}.sublayers.2.norm")
    if cfg.norm_first:
        norm(spec.encoder.layer_norm, "encoder.norm")
        norm(spec.decoder.layer_norm, "decoder.norm")
    _ct2_embeddings_and_vocabulary(spec, ckpt)
    return spec


def _ct2_embeddings_and_vocabulary(spec, ckpt: Checkpoint) -> None:
    """The spec's tied embeddings, position encodings, vocabulary and token conventions."""
    cfg, state = ckpt.model_config, ckpt.model_state
    embedding = state["embed.tokens.weight"]  # (V, D), also the tied output projection
    positions = sinusoids(cfg.max_positions, cfg.d_model)  # (P, D), our interleaved layout
    for side in (spec.encoder, spec.decoder):
        side.scale_embeddings = True  # multiply by sqrt(D)
        side.position_encodings.encodings = positions
    spec.encoder.embeddings[0].weight = embedding
    spec.decoder.embeddings.weight = embedding
    spec.decoder.projection.weight = embedding

    vocab = vocabulary(ckpt.tokenizer, cfg.vocab_size)
    spec.register_source_vocabulary(vocab)
    spec.register_target_vocabulary(vocab)
    spec.config.unk_token = vocab[3]
    spec.config.bos_token = vocab[cfg.bos_id]
    spec.config.eos_token = vocab[cfg.eos_id]
    spec.config.decoder_start_token = vocab[cfg.bos_id]
    spec.config.add_source_eos = True  # callers pass SentencePiece pieces, as for our Translator
    spec.config.layer_norm_epsilon = LAYER_NORM_EPS


def export_ct2(ckpt: Checkpoint, out_dir: Path, quantization: str | None = None) -> Path:
    """Write model.bin, config.json, the vocabularies and the SentencePiece model (SPM_FILE)."""
    from ctranslate2.converters.converter import Converter

    class SpecConverter(Converter):
        def _load(self):
            return ct2_spec(ckpt)

    SpecConverter().convert(str(out_dir), quantization=quantization, force=True)
    (out_dir / SPM_FILE).write_bytes(ckpt.tokenizer.model_bytes)
    return out_dir


# ---------------------------------------------------------------- command line


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nmt-export", description="Export a checkpoint as a Hugging Face and/or a CTranslate2 model."
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--hf", type=Path, help="write a Hugging Face Transformers model directory here")
    p.add_argument("--ct2", type=Path, help="write a CTranslate2 model directory here")
    p.add_argument("--quantization", help="CTranslate2 weight type, e.g. int8, int8_float32, float16")
    args = p.parse_args(argv)
    if args.hf is None and args.ct2 is None:
        p.error("give --hf DIR, --ct2 DIR or both")
    try:
        ckpt = load_checkpoint(args.checkpoint)
        if args.hf is not None:
            print(f"Hugging Face model: {export_hf(ckpt, args.hf)}")
        if args.ct2 is not None:
            print(f"CTranslate2 model: {export_ct2(ckpt, args.ct2, args.quantization)}")
    except ImportError as e:
        print(f"error: {e.name or e} is missing; pip install 'nmt-translator[export]'", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
