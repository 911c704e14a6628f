"""The training loop: teacher forcing, label smoothing, Adam with inverse-sqrt warmup,
token-budget batches, gradient accumulation, validation BLEU, atomic checkpoints and exact resume;
data-parallel across torchrun processes and in mixed precision on GPUs."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training.checkpoints import CheckpointDir
from training.config import ExperimentConfig
from training.corpus import load_pairs
from training.data import Batch, BatchSource, collate, length_filter, tokenize
from training.distributed import World
from training.precision import MixedPrecision
from training.provenance import pairs_sha256, run_provenance
from training.streaming import StreamingBatchSource, stream_pairs, stream_sentences
from translator.config import to_dict
from translator.decoding import DecodeOptions
from translator.model import EncoderDecoder, build_model
from translator.provenance import utc_now
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
    batch_in_epoch: int = 0  # batches of `epoch` already consumed, by all processes together
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0
    tokens_seen: int = 0


def label_smoothed_loss(model: EncoderDecoder, batch: Batch, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross entropy and summed NLL over real target tokens.

    `model` may be wrapped in DistributedDataParallel, whose forward synchronises gradients.
    """
    logits = model(batch.src, batch.tgt_in)  # (B, T, V)
    V = logits.size(-1)
    flat, gold = logits.view(-1, V), batch.tgt_out.view(-1)  # (B*T, V), (B*T,)
    pad = getattr(model, "module", model).cfg.pad_id
    loss = F.cross_entropy(flat, gold, ignore_index=pad, label_smoothing=smoothing, reduction="sum")
    with torch.no_grad():
        nll = F.cross_entropy(flat, gold, ignore_index=pad, reduction="sum")
    return loss, nll


class Trainer:
    """Owns model, optimizer, data and checkpoints of one run in `out_dir`.

    In a `world` of several processes (torchrun) each holds a replica wrapped in
    DistributedDataParallel and trains on its share of every step's batches; rank 0 alone
    validates and writes the tokenizer, checkpoints, metrics and logs.
    """

    def __init__(
        self, cfg: ExperimentConfig, out_dir: Path, log=print, world: World | None = None, preset: str = ""
    ) -> None:
        self.world = world or World()
        self.cfg, self.out_dir = cfg, out_dir
        # Written into every checkpoint beside the resolved config; the server reports it.
        self.config_record = {**to_dict(cfg), "preset": preset}
        self.log = log if self.world.is_main else lambda *_: None
        self.ckpts = CheckpointDir(out_dir, cfg.train.keep_last)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.amp = MixedPrecision(cfg.train.precision, self.world.device)
        latest = self.ckpts.latest()
        resumed = self.ckpts.load_for_resume(latest, cfg) if latest else None
        with self.world.main_first():  # the others read rank 0's tokenizer and token cache
            self.tokenizer = resumed.tokenizer if resumed else self.fit_tokenizer()
            self.train_data, self.valid_data = self.load_data()
        self.provenance = run_provenance(cfg.data.train, self.corpus_sha256)
        self.seed_everything(cfg.train.seed)
        self.model = build_model(cfg.model).to(self.world.device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas, eps=cfg.train.eps,
            weight_decay=cfg.train.weight_decay,
        )
        self.state = TrainState()
        if resumed:
            self.restore(resumed.model_state, resumed.train_state)
            self.log(f"resumed from {latest} at step {self.state.step}")
        elif self.world.rank:
            torch.manual_seed(rank_seed(cfg.train.seed, self.world.rank, 0))  # its own dropout
        self.train_model = self.model
        if self.world.size > 1:  # the wrap broadcasts rank 0's weights
            ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.metrics_file = (out_dir / "metrics.jsonl").open("a", encoding="utf-8") if self.world.is_main else None
        self.board = make_board(out_dir / "tensorboard") if self.world.is_main else None

    @staticmethod
    def seed_everything(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def restore(self, model_state: dict, ts: dict) -> None:
        """Weights, optimizer, position and RNG streams of a checkpoint.

        Exact when the world size is unchanged; otherwise ranks without a stored RNG stream get
        a fresh one (weights, optimizer and data position are exact either way).
        """
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(ts["optimizer"])
        self.state = TrainState(**ts["state"])
        random.setstate(ts["python_rng"])
        rngs = ts.get("rank_rngs") or [{"torch": ts["torch_rng"], "cuda": ts.get("cuda_rng")}]
        rank = self.world.rank
        if rank < len(rngs):
            set_rng_state(rngs[rank], self.world.device)
        else:
            torch.manual_seed(rank_seed(self.cfg.train.seed, rank, self.state.step))
        if self.amp.scaler.is_enabled() and "grad_scaler" in ts:
            self.amp.scaler.load_state_dict(ts["grad_scaler"])

    def fit_tokenizer(self) -> Tokenizer:
        if not self.world.is_main:
            return Tokenizer((self.out_dir / "tokenizer.model").read_bytes())
        d = self.cfg.data
        if d.streaming:
            sentences = stream_sentences(stream_pairs(d.train, d.src_lang, d.tgt_lang), d.src_lang, d.tgt_lang)
            self.log(f"training a {d.spm_model_type} SentencePiece model of {d.vocab_size} pieces on the stream {d.train}")
        else:
            ds = load_pairs(d.train, d.src_lang, d.tgt_lang)
            self.log(f"training a {d.spm_model_type} SentencePiece model of {d.vocab_size} pieces on {len(ds)} pairs")
            sentences = (s for col in ("src", "tgt") for s in ds[col] if s)
        tok = train_tokenizer(sentences, d.vocab_size, d.spm_model_type, seed_sentences=TOKENIZER_SAMPLE)
        if tok.vocab_size != d.vocab_size:
            raise ValueError(
                f"SentencePiece produced {tok.vocab_size} pieces, not data.vocab_size={d.vocab_size}: "
                "the corpus is too small for that vocabulary; lower data.vocab_size"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "tokenizer.model").write_bytes(tok.model_bytes)
        return tok

    def load_data(self):
        d, m, t = self.cfg.data, self.cfg.model, self.cfg.train
        cache = self.out_dir / "cache"
        valid = tokenize(load_pairs(d.valid, d.src_lang, d.tgt_lang), self.tokenizer, cache, "valid")
        if d.streaming:
            self.log(f"streaming train pairs from {d.train} through a buffer of {d.stream_buffer}")
            stream = stream_pairs(d.train, d.src_lang, d.tgt_lang)
            source = StreamingBatchSource(
                stream, self.tokenizer, src_lang=d.src_lang, tgt_lang=d.tgt_lang, buffer=d.stream_buffer,
                max_len=d.max_len, max_len_ratio=d.max_len_ratio, max_tokens=t.max_tokens, seed=t.seed,
                bos=m.bos_id, eos=m.eos_id, pad=m.pad_id,
            )
            self.corpus_sha256: str | None = None  # a stream is not read twice to fingerprint it
            return source, valid
        pairs = load_pairs(d.train, d.src_lang, d.tgt_lang)
        self.corpus_sha256 = pairs_sha256(pairs["src"], pairs["tgt"])
        train = tokenize(pairs, self.tokenizer, cache, "train")
        before = len(train)
        train = length_filter(train, d.max_len, d.max_len_ratio)
        self.log(f"train pairs: {len(train)} of {before} after length/ratio filtering")
        return BatchSource(train, t.max_tokens, t.seed, m.bos_id, m.eos_id, m.pad_id), valid

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> TrainState:
        t, st, world = self.cfg.train, self.state, self.world
        start = time.monotonic()
        deadline = start + t.max_minutes * 60 if t.max_minutes else math.inf
        self.batches = self.remaining_batches()
        bar = tqdm(
            initial=st.step, total=t.max_steps or None, unit="step", dynamic_ncols=True, mininterval=5,
            disable=not world.is_main,
        )
        window_tokens, window_start, window_loss, window_nll = 0, time.monotonic(), 0.0, 0.0
        stop_reason = ""
        while not stop_reason:
            lr = inverse_sqrt_lr(st.step + 1, t.lr, t.warmup_steps)
            loss, nll, n_tokens = self.train_step(lr)
            window_loss += loss
            window_nll += nll
            st.step += 1
            st.tokens_seen += n_tokens
            window_tokens += n_tokens
            bar.update(1)

            if st.step % t.log_every == 0:
                window_loss, window_nll = world.all_sum([window_loss, window_nll])
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
            if t.max_minutes:
                stop_reason = world.broadcast(stop_reason)  # clocks differ: rank 0's decides
            if st.step % t.valid_every == 0 or stop_reason:
                self.validate_and_save()
                if t.patience and st.bad_validations >= t.patience:
                    stop_reason = stop_reason or f"no better validation BLEU for {t.patience} validations"
        bar.close()
        self.log(f"stopped at step {st.step}: {stop_reason}; best validation BLEU {st.best_bleu:.2f} at step {st.best_step}")
        if self.metrics_file:
            self.metrics_file.close()
        if self.board:
            self.board.close()
        return st

    def train_step(self, lr: float) -> tuple[float, float, int]:
        """One optimizer step over this process's batches: its summed loss and NLL, and the
        target tokens of the step summed over all processes."""
        t, world = self.cfg.train, self.world
        self.train_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.next_batches()
        n_tokens = int(world.all_sum([sum(b.n_tokens for b in batches)])[0])
        loss_sum, nll_sum = 0.0, 0.0
        for i, b in enumerate(batches):
            # Gradients are all-reduced once, on the last backward of the step.
            sync = world.size == 1 or i == len(batches) - 1
            with nullcontext() if sync else self.train_model.no_sync():
                with self.amp.autocast():
                    loss, nll = label_smoothed_loss(self.train_model, b, t.label_smoothing)
                # DDP averages gradients over processes; scaling by their number makes the result
                # the gradient of the step's summed loss over all its tokens, as in one process.
                self.amp.scaler.scale(loss * world.size / n_tokens).backward()
            loss_sum += loss.item()
            nll_sum += nll.item()
        if t.clip_norm:
            self.amp.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm)
        self.amp.scaler.step(self.optimizer)
        self.amp.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, nll_sum, n_tokens

    def remaining_batches(self) -> Iterator:
        """The batches of the current epoch not consumed yet."""
        st = self.state
        return islice(iter(self.train_data.epoch(st.epoch)), st.batch_in_epoch, None)

    def next_batches(self) -> list[Batch]:
        """This process's batches for one step, on its device.

        A step consumes the next accum_steps x world-size batches of the epoch (rolling into the
        next epoch where it ends) and process r collates those at positions r, r + size, ...
        The position kept is the count of batches consumed, whatever the world size.
        """
        st, world = self.state, self.world
        mine = []
        for k in range(self.cfg.train.accum_steps * world.size):
            item = next(self.batches, None)
            if item is None:
                st.epoch += 1
                st.batch_in_epoch = 0
                self.batches = self.remaining_batches()
                item = next(self.batches, None)
                if item is None:
                    raise ValueError("the training split yields no batches")
            st.batch_in_epoch += 1
            if k % world.size == world.rank:
                mine.append(self.train_data.collate(item).to(world.device))
        return mine

    def validate_and_save(self) -> None:
        """Rank 0 validates and writes a checkpoint; every process takes part in the collectives."""
        st, world = self.state, self.world
        rngs = world.gather(rng_state(world.device)) if world.size > 1 else None
        if world.is_main:
            self.validate(rngs)
        st.best_bleu, st.best_step, st.bad_validations = world.broadcast(
            (st.best_bleu, st.best_step, st.bad_validations)
        )

    def validate(self, rank_rngs: list[dict] | None) -> None:
        st = self.state
        valid_loss = self.valid_loss()
        n = self.cfg.train.valid_bleu_sentences or len(self.valid_data)
        refs = list(self.valid_data["tgt"][:n])
        translator = Translator(self.model, self.tokenizer, DecodeOptions())  # decodes on the model's device
        hyps = [tr.text for tr in translator.translate(list(self.valid_data["src"][:n]))]
        bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
        improved = bleu > st.best_bleu
        if improved:
            st.best_bleu, st.best_step, st.bad_validations = bleu, st.step, 0
        else:
            st.bad_validations += 1
        self.record({"step": st.step, "valid_loss": valid_loss, "valid_bleu": bleu, "best_bleu": st.best_bleu})
        self.ckpts.save(
            step=st.step, config=self.config_record, tokenizer=self.tokenizer, model=self.model,
            train_state=self.train_state(rank_rngs), metrics={"valid_bleu": bleu, "valid_loss": valid_loss},
            provenance=replace(self.provenance, step=st.step, created=utc_now(), valid_bleu=bleu), is_best=improved,
        )

    @torch.inference_mode()
    def valid_loss(self) -> float:
        self.model.eval()
        m = self.cfg.model
        src, tgt = list(self.valid_data["src_ids"]), list(self.valid_data["tgt_ids"])
        total, tokens = 0.0, 0
        for i in range(0, len(src), 64):
            b = collate(src[i : i + 64], tgt[i : i + 64], m.bos_id, m.eos_id, m.pad_id).to(self.world.device)
            _, nll = label_smoothed_loss(self.model, b, 0.0)
            total += nll.item()
            tokens += b.n_tokens
        return total / max(tokens, 1)

    def train_state(self, rank_rngs: list[dict] | None = None) -> dict:
        """What a resume needs beyond the weights; `rank_rngs` are every process's RNG states."""
        ts = {
            "state": asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        if self.world.device.type == "cuda":
            ts["cuda_rng"] = torch.cuda.get_rng_state(self.world.device)
        if rank_rngs:
            ts["rank_rngs"] = rank_rngs
        if self.amp.scaler.is_enabled():
            ts["grad_scaler"] = self.amp.scaler.state_dict()
        return ts

    def record(self, rec: dict) -> None:
        if not self.metrics_file:
            return
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        if self.board:
            for k, v in rec.items():
                if k != "step":
                    self.board.add_scalar(k, v, rec["step"])
        if "valid_bleu" in rec:
            self.log(f"step {rec['step']}: valid loss {rec['valid_loss']:.3f}, valid BLEU {rec['valid_bleu']:.2f}")


def rng_state(device: torch.device) -> dict:
    """This process's torch RNG states: the CPU one and, on a GPU, the device's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for the dropout of process `rank` that differs from every other process's."""
    return seed + 1_000_003 * rank + step


def make_board(path: Path):
    """A TensorBoard writer, or None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
