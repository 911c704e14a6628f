"""The training loop: teacher forcing, label smoothing, Adam with inverse-sqrt warmup,
token-budget batches, gradient accumulation, validation BLEU, atomic checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.config import ExperimentConfig
from training.corpus import load_pairs
from training.data import Batch, BatchSource, collate, length_filter, tokenize
from training.checkpoints import CheckpointDir
from translator.config import to_dict
from translator.decoding import DecodeOptions
from translator.model import EncoderDecoder, build_model
from translator.tokenizer import Tokenizer, train_tokenizer
from translator.translate import Translator

TOKENIZER_SAMPLE = 2_000_000  # sentences SentencePiece trains on at most


def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak` over `warmup` steps, then peak * sqrt(warmup / step)."""
    step = max(step, 1)
    if warmup == 0:
        return peak / math.sqrt(step)
    return peak * min(step / warmup, math.sqrt(warmup / step))


@dataclass
class TrainState:
    """Where training stands; with the RNG and optimizer states it makes a resume exact."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0
    tokens_seen: int = 0


def label_smoothed_loss(model: EncoderDecoder, batch: Batch, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross entropy and summed NLL over real target tokens."""
    logits = model(batch.src, batch.tgt_in)  # (B, T, V)
    V = logits.size(-1)
    flat, gold = logits.view(-1, V), batch.tgt_out.view(-1)  # (B*T, V), (B*T,)
    pad = model.cfg.pad_id
    loss = F.cross_entropy(flat, gold, ignore_index=pad, label_smoothing=smoothing, reduction="sum")
    with torch.no_grad():
        nll = F.cross_entropy(flat, gold, ignore_index=pad, reduction="sum")
    return loss, nll


class Trainer:
    """Owns model, optimizer, data and checkpoints of one run in `out_dir`."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, log=print) -> None:
        self.cfg, self.out_dir, self.log = cfg, out_dir, log
        self.ckpts = CheckpointDir(out_dir, cfg.train.keep_last)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        latest = self.ckpts.latest()
        resumed = self.ckpts.load_for_resume(latest, cfg) if latest else None
        self.tokenizer = resumed.tokenizer if resumed else self.fit_tokenizer()
        self.seed_everything(cfg.train.seed)
        self.model = build_model(cfg.model)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas, eps=cfg.train.eps,
            weight_decay=cfg.train.weight_decay,
        )
        self.state = TrainState()
        if resumed:
            self.model.load_state_dict(resumed.model_state)
            ts = resumed.train_state
            self.optimizer.load_state_dict(ts["optimizer"])
            self.state = TrainState(**ts["state"])
            torch.set_rng_state(ts["torch_rng"])
            random.setstate(ts["python_rng"])
            self.log(f"resumed from {latest} at step {self.state.step}")
        self.train_data, self.valid_data = self.load_data()
        self.metrics_file = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.board = make_board(out_dir / "tensorboard")

    @staticmethod
    def seed_everything(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def fit_tokenizer(self) -> Tokenizer:
        d = self.cfg.data
        ds = load_pairs(d.train, d.src_lang, d.tgt_lang)
        self.log(f"training a {d.spm_model_type} SentencePiece model of {d.vocab_size} pieces on {len(ds)} pairs")
        tok = train_tokenizer(
            (s for col in ("src", "tgt") for s in ds[col] if s), d.vocab_size, d.spm_model_type,
            seed_sentences=TOKENIZER_SAMPLE,
        )
        if tok.vocab_size != d.vocab_size:
            raise ValueError(
                f"SentencePiece produced {tok.vocab_size} pieces, not data.vocab_size={d.vocab_size}: "
                "the corpus is too small for that vocabulary; lower data.vocab_size"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "tokenizer.model").write_bytes(tok.model_bytes)
        return tok

    def load_data(self):
        d, m = self.cfg.data, self.cfg.model
        cache = self.out_dir / "cache"
        train = tokenize(load_pairs(d.train, d.src_lang, d.tgt_lang), self.tokenizer, cache, "train")
        before = len(train)
        train = length_filter(train, d.max_len, d.max_len_ratio)
        self.log(f"train pairs: {len(train)} of {before} after length/ratio filtering")
        valid = tokenize(load_pairs(d.valid, d.src_lang, d.tgt_lang), self.tokenizer, cache, "valid")
        source = BatchSource(train, self.cfg.train.max_tokens, self.cfg.train.seed, m.bos_id, m.eos_id, m.pad_id)
        return source, valid

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> TrainState:
        t, st = self.cfg.train, self.state
        start = time.monotonic()
        deadline = start + t.max_minutes * 60 if t.max_minutes else math.inf
        batches = self.train_data.epoch(st.epoch)
        bar = tqdm(initial=st.step, total=t.max_steps or None, unit="step", dynamic_ncols=True, mininterval=5)
        window_tokens, window_start, window_loss, window_nll = 0, time.monotonic(), 0.0, 0.0
        stop_reason = ""
        while not stop_reason:
            self.model.train()
            lr = inverse_sqrt_lr(st.step + 1, t.lr, t.warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            group_batches = []
            for _ in range(t.accum_steps):
                if st.batch_in_epoch >= len(batches):
                    st.epoch += 1
                    st.batch_in_epoch = 0
                    batches = self.train_data.epoch(st.epoch)
                group_batches.append(self.train_data.collate(batches[st.batch_in_epoch]))
                st.batch_in_epoch += 1
            n_tokens = sum(b.n_tokens for b in group_batches)
            for b in group_batches:
                loss, nll = label_smoothed_loss(self.model, b, t.label_smoothing)
                (loss / n_tokens).backward()
                window_loss += loss.item()
                window_nll += nll.item()
            if t.clip_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            st.step += 1
            st.tokens_seen += n_tokens
            window_tokens += n_tokens
            bar.update(1)

            if st.step % t.log_every == 0:
                now = time.monotonic()
                rec = {
                    "step": st.step, "epoch": st.epoch, "lr": lr,
                    "train_loss": window_loss / window_tokens, "train_nll": window_nll / window_tokens,
                    "tgt_tokens_per_s": window_tokens / (now - window_start),
                    "elapsed_min": (now - start) / 60,
                }
                self.record(rec)
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tgt_tokens_per_s']:.0f}")
                window_tokens, window_start, window_loss, window_nll = 0, now, 0.0, 0.0

            if t.max_steps and st.step >= t.max_steps:
                stop_reason = f"reached train.max_steps={t.max_steps}"
            elif t.max_epochs and st.epoch >= t.max_epochs:
                stop_reason = f"reached train.max_epochs={t.max_epochs}"
            elif time.monotonic() >= deadline:
                stop_reason = f"reached train.max_minutes={t.max_minutes}"
            if st.step % t.valid_every == 0 or stop_reason:
                self.validate_and_save()
                if t.patience and st.bad_validations >= t.patience:
                    stop_reason = stop_reason or f"no better validation BLEU for {t.patience} validations"
        bar.close()
        self.log(f"stopped at step {st.step}: {stop_reason}; best validation BLEU {st.best_bleu:.2f} at step {st.best_step}")
        self.metrics_file.close()
        if self.board:
            self.board.close()
        return st

    def validate_and_save(self) -> None:
        st = self.state
        valid_loss = self.valid_loss()
        n = self.cfg.train.valid_bleu_sentences or len(self.valid_data)
        refs = list(self.valid_data["tgt"][:n])
        translator = Translator(self.model, self.tokenizer, DecodeOptions())
        hyps = [tr.text for tr in translator.translate(list(self.valid_data["src"][:n]))]
        bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
        improved = bleu > st.best_bleu
        if improved:
            st.best_bleu, st.best_step, st.bad_validations = bleu, st.step, 0
        else:
            st.bad_validations += 1
        self.record({"step": st.step, "valid_loss": valid_loss, "valid_bleu": bleu, "best_bleu": st.best_bleu})
        self.ckpts.save(
            step=st.step, config=to_dict(self.cfg), tokenizer=self.tokenizer, model=self.model,
            train_state=self.train_state(), metrics={"valid_bleu": bleu, "valid_loss": valid_loss},
            is_best=improved,
        )

    @torch.inference_mode()
    def valid_loss(self) -> float:
        self.model.eval()
        m = self.cfg.model
        src, tgt = list(self.valid_data["src_ids"]), list(self.valid_data["tgt_ids"])
        total, tokens = 0.0, 0
        for i in range(0, len(src), 64):
            b = collate(src[i : i + 64], tgt[i : i + 64], m.bos_id, m.eos_id, m.pad_id)
            _, nll = label_smoothed_loss(self.model, b, 0.0)
            total += nll.item()
            tokens += b.n_tokens
        return total / max(tokens, 1)

    def train_state(self) -> dict:
        return {
            "state": asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def record(self, rec: dict) -> None:
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        if self.board:
            for k, v in rec.items():
                if k != "step":
                    self.board.add_scalar(k, v, rec["step"])
        if "valid_bleu" in rec:
            self.log(f"step {rec['step']}: valid loss {rec['valid_loss']:.3f}, valid BLEU {rec['valid_bleu']:.2f}")


def make_board(path: Path):
    """A TensorBoard writer, or None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
