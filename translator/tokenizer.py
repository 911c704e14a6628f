"""SentencePiece tokenizer held as the bytes of its model, so it can travel inside checkpoints."""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from collections.abc import Iterable

import sentencepiece as spm

PAD, BOS, EOS, UNK = 0, 1, 2, 3
# SentencePiece's list calls start a thread per core on every call: that fixed cost pays only
# from a few dozen texts on; below, one call per text is faster (docs/HISTORY.md, round 7).
BATCH_CALL_MIN = 32


class Tokenizer:
    """A joint source/target SentencePiece model with ids pad=0, bos=1, eos=2, unk=3."""

    def __init__(self, model_bytes: bytes) -> None:
        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        ids = (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        if ids != (PAD, BOS, EOS, UNK):
            raise ValueError(f"tokenizer ids pad/bos/eos/unk are {ids}, expected {(PAD, BOS, EOS, UNK)}")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without BOS/EOS."""
        texts = list(texts)
        if len(texts) < BATCH_CALL_MIN:
            return [self.sp.encode(t) for t in texts]
        return self.sp.encode(texts)

    def encode_sampled(self, texts: list[str], alpha: float, seed: int) -> list[list[int]]:
        """Token ids of one segmentation of each text drawn by SentencePiece (subword
        regularization, Kudo 2018): unigram models sample from all segmentations with probability
        proportional to P(x)^alpha (smaller is more random), BPE models drop each merge with
        probability alpha. The same (texts, alpha, seed) give the same ids: the draws come from
        SentencePiece's process-wide generator, seeded here, in one thread."""
        spm.set_random_generator_seed(seed % (2**32 - 1))  # unsigned 32 bits, 2**32 - 1 is "unseeded"
        return self.sp.encode(list(texts), enable_sampling=True, alpha=alpha, nbest_size=-1, num_threads=1)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character span [start, end) in `text` of each token of `encode([text])[0]`; a token's
        span includes the whitespace its piece stands for, and may be empty."""
        proto = self.sp.encode(text, out_type="proto")
        char_at = [0] * (len(text.encode("utf-8")) + 1)  # UTF-8 byte offset -> character offset
        offset = 0
        for i, ch in enumerate(text):
            char_at[offset] = i
            offset += len(ch.encode("utf-8"))
        char_at[offset] = len(text)
        return [(char_at[p.begin], char_at[p.end]) for p in proto.pieces]

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Detokenized text; special ids are dropped."""
        kept = [[i for i in seq if i > UNK] for seq in ids]
        if len(kept) < BATCH_CALL_MIN:
            return [self.sp.decode(seq) for seq in kept]
        return self.sp.decode(kept)

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def log_probs(self, ids: list[int]) -> list[float]:
        """Each piece's log-probability under a unigram model: how common the piece is. Empty for
        a BPE model, whose piece scores are merge ranks (whole numbers) rather than frequencies."""
        return [self.sp.get_score(i) for i in ids] if self.unigram else []

    @functools.cached_property
    def unigram(self) -> bool:
        """Whether the model is a unigram one: its piece scores are log-probabilities, not whole numbers."""
        scores = (self.sp.get_score(i) for i in range(self.vocab_size)
                  if not (self.sp.is_control(i) or self.sp.is_unknown(i)))
        return any(score != int(score) for score in scores)

    @functools.cached_property
    def word_ids(self) -> frozenset[int]:
        """Ids of the pieces that hold a letter or a digit (a character of Unicode category L* or
        N*); never the unknown piece."""
        return frozenset(i for i in range(UNK + 1, self.vocab_size)
                         if any(unicodedata.category(c)[0] in "LN" for c in self.sp.id_to_piece(i)))

    @functools.cached_property
    def continuation_ids(self) -> frozenset[int]:
        """Ids of the pieces that go on with the word before them: no word-start mark, and a letter or
        a digit first ("r" after "▁Einheimische"); what may not follow a required phrase."""
        return frozenset(i for i in range(UNK + 1, self.vocab_size)
                         if not (p := self.sp.id_to_piece(i)).startswith("▁") and unicodedata.category(p[0])[0] in "LN")

    def has_content(self, ids: list[int]) -> bool:
        """Whether token ids (of one text) hold a word to translate: a known piece with a letter or a
        digit. Text without one is content-free: only whitespace, punctuation, symbols and emoji,
        combining marks, zero-width and other format characters (a byte-order mark), or letters the
        vocabulary does not know (they map to the unknown piece). A model given such text invents
        words, so translators pass it through unchanged."""
        words = self.word_ids
        return any(i in words for i in ids)


def train_tokenizer(
    sentences: Iterable[str], vocab_size: int, model_type: str = "unigram", seed_sentences: int = 0
) -> Tokenizer:
    """Train a SentencePiece model in memory on an iterable of sentences."""
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        unk_id=UNK,
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        num_threads=2,
        minloglevel=2,
    )
    return Tokenizer(buf.getvalue())
