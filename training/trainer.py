"""The training loop: teacher forcing, label smoothing, Adam with an inverse-sqrt or
warmup-stable-decay schedule, token-budget batches, gradient accumulation, validation BLEU,
atomic checkpoints and exact resume (also after SIGINT/SIGTERM, which save the state);
data-parallel across torchrun processes, in mixed precision where it pays."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

import sacrebleu
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training.checkpoints import CheckpointDir
from training.config import ExperimentConfig
from training.corpus import load_pairs
from training.data import Batch, BatchSource, SubwordSampling, collate, length_filter, tokenize
from training.distributed import World
from training.metrics_log import MetricsLog, Window
from training.precision import MixedPrecision, choose_precision, training_shapes
from training.provenance import pairs_sha256, run_provenance
from training.schedule import StepBudget, decay_start, in_decay, learning_rate
from training.signals import StopSignals
from training.step import TrainStep, label_smoothed_loss, make_adam
from training.streaming import StreamingBatchSource, stream_pairs, stream_sentences
from translator.config import to_dict
from translator.decoding import DecodeOptions
from translator.model import build_model
from translator.provenance import utc_now
from translator.tokenizer import Tokenizer, train_tokenizer
from translator.translate import Translator

TOKENIZER_SAMPLE = 2_000_000  # sentences SentencePiece trains on at most


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
    # Wall-clock figures, left out of comparisons (two runs of the same steps are equal):
    elapsed_s: float = field(default=0.0, compare=False)  # of train.max_minutes, over all processes that ran it
    seconds_per_step: float = field(default=0.0, compare=False)  # the measured pace, for the steps a budget leaves
    precision: str = ""  # what train.precision resolved to at the start; kept on resume


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
        if self.world.is_main:
            for p in self.ckpts.remove_partial_writes():
                self.log(f"removed {p}, left by a write that did not finish")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        with self.world.main_first():  # rank 0 sets unreadable checkpoints aside before the others look
            latest, resumed = self.ckpts.resumable(cfg, self.log, set_aside=self.world.is_main) or (None, None)
        with self.world.main_first():  # the others read rank 0's tokenizer and token cache
            self.tokenizer = resumed.tokenizer if resumed else self.fit_tokenizer()
            self.train_data, self.valid_data = self.load_data()
        self.provenance = run_provenance(cfg.data.train, self.corpus_sha256)
        self.precision_record = self.resolve_precision(resumed.train_state["state"] if resumed else {})
        self.amp = MixedPrecision(self.precision_record["precision"], self.world.device)
        self.seed_everything(cfg.train.seed)
        self.model = build_model(cfg.model).to(self.world.device)
        self.optimizer = make_adam(self.model.parameters(), cfg.train, self.log)
        self.state = TrainState()
        if resumed:
            self.restore(resumed.model_state, resumed.train_state)
            self.log(f"resumed from {latest} at step {self.state.step}")
        elif self.world.rank:
            torch.manual_seed(rank_seed(cfg.train.seed, self.world.rank, 0))  # its own dropout
        self.state.precision = self.amp.precision
        self.train_model = self.model
        if self.world.size > 1:  # the wrap broadcasts rank 0's weights
            ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.step = TrainStep(self.model, self.train_model, self.optimizer, self.amp, cfg.train, self.log)
        self.metrics: MetricsLog | None = None  # opened when training starts: a finished run's rerun writes nothing
        self.steps_run = 0  # optimizer steps this process made
        self.interrupted = 0  # the number of the signal that stopped the run, if one did
        self.last_save = self.state.step

    def resolve_precision(self, resumed_state: dict) -> dict:
        """What train.precision means for this run, and what to record about it: `auto` is
        resolved by rank 0's probe at the run's start and kept when the run resumes."""
        t, m = self.cfg.train, self.cfg.model
        if t.precision == "auto" and resumed_state.get("precision"):
            self.log(f"train.precision=auto: {resumed_state['precision']}, as chosen at the run's start")
            return {"precision": resumed_state["precision"], "precision_setting": "auto"}
        record = None
        if self.world.is_main:
            shapes = training_shapes(t.max_tokens, m.d_model, m.d_ff, m.vocab_size)
            _, record = choose_precision(t.precision, self.world.device, shapes)
        record = self.world.broadcast(record)
        if t.precision == "auto":
            bf16 = "failed" if record["probe_bf16_ms"] is None else f"{record['probe_bf16_ms']:.1f} ms"
            self.log(
                f"train.precision=auto: {record['precision']} (probe of this run's matmuls: fp32 "
                f"{record['probe_fp32_ms']:.1f} ms, bf16 autocast {bf16}{' ' + record['probe_error'] if record['probe_error'] else ''})"
            )
        return record

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
        sampling = None
        if d.subword_alpha:
            self.log(f"subword regularization: the train split segmented anew each epoch (alpha {d.subword_alpha})")
            sampling = SubwordSampling(self.tokenizer, d.subword_alpha, d.max_len, d.max_len_ratio)
        return BatchSource(train, t.max_tokens, t.seed, m.bos_id, m.eos_id, m.pad_id, sampling), valid

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> TrainState:
        """Train until a limit, patience or a signal stops the run; a no-op for a finished run."""
        t, st = self.cfg.train, self.state
        self.budget = StepBudget(
            t.max_steps, t.max_minutes * 60, st.elapsed_s, st.seconds_per_step, max_tokens=t.max_target_tokens
        )
        self.budget.start()
        done = self.world.broadcast(self.limit_reached())
        if done:
            self.log(f"nothing to do: the run in {self.out_dir} stopped at step {st.step} ({done})")
        else:
            if self.world.is_main:
                self.metrics = MetricsLog(self.out_dir, st.step, self.log)
                if st.step == 0:  # the run's start; a resume keeps what it chose
                    self.metrics.record({"step": 0, **self.precision_record})
            self.batches = self.remaining_batches()
            with StopSignals() as signals:
                reason = self.loop(signals)
            self.log(f"stopped at step {st.step}: {reason}; best validation BLEU {st.best_bleu:.2f} at step {st.best_step}")
            if self.metrics:
                self.metrics.close()
        # Every collective finished before the process group can be torn down: a broadcast's
        # source returns before gloo's thread has let go of its tensors, and that thread needs
        # the GIL, which the main thread holds while DDP's reducer joins it (a hang at exit).
        self.world.barrier()
        return st

    def loop(self, signals: StopSignals) -> str:
        """Steps until one should stop; why it stopped."""
        t, st, world = self.cfg.train, self.state, self.world
        bar = tqdm(
            initial=st.step, total=t.max_steps or None, unit="step", dynamic_ncols=True, mininterval=5,
            disable=not world.is_main,
        )
        window = Window()
        reason = ""
        while not reason:
            total = self.budget.total(st.step, tokens=st.tokens_seen)
            if world.size > 1 and t.max_minutes:
                total = world.broadcast(total)  # one learning rate for all: rank 0's estimate
            lr = learning_rate(st.step + 1, t, total)
            loss, nll, n_tokens = self.train_step(lr)
            st.step += 1
            st.tokens_seen += n_tokens
            self.steps_run += 1
            self.budget.tick(st.step)
            st.elapsed_s, st.seconds_per_step = self.budget.elapsed(), self.budget.seconds_per_step
            window.add(loss, nll, n_tokens)
            bar.update(1)
            if st.step % t.log_every == 0:
                rec = self.train_record(window, lr, total)
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tgt_tokens_per_s']:.0f}")

            if world.size > 1:  # a signal to any process stops them all
                signals.received = int(max(world.gather(signals.received)))
            if t.max_minutes:
                st.elapsed_s = world.broadcast(st.elapsed_s)  # clocks differ: rank 0's decides
            reason = self.limit_reached()
            if signals.received:
                self.interrupted, reason = signals.received, f"interrupted by {signals.name}"
                self.validate_and_save(validate=False, lr=lr, total=total)
            elif st.step % t.valid_every == 0 or reason:
                self.validate_and_save(validate=True, lr=lr, total=total)
                reason = reason or self.limit_reached()  # patience, or the validation's time
            elif self.decay_save_due(total):
                self.validate_and_save(validate=False, lr=lr, total=total)
        bar.close()
        return reason

    def limit_reached(self) -> str:
        """Which limit of the run has been reached, if any ("" for none)."""
        t, st = self.cfg.train, self.state
        if t.max_steps and st.step >= t.max_steps:
            return f"reached train.max_steps={t.max_steps}"
        if t.max_epochs and st.epoch >= t.max_epochs:
            return f"reached train.max_epochs={t.max_epochs}"
        # The time as of the last step or save, as the checkpoint holds it: a rerun decides alike.
        if t.max_minutes and st.elapsed_s >= t.max_minutes * 60:
            return f"reached train.max_minutes={t.max_minutes}"
        if t.max_target_tokens and st.tokens_seen >= t.max_target_tokens:
            return f"reached train.max_target_tokens={t.max_target_tokens} ({st.tokens_seen} trained on)"
        if t.patience and st.bad_validations >= t.patience:
            return f"no better validation BLEU for {t.patience} validations"
        return ""

    def decay_save_due(self, total: float) -> bool:
        """Whether to save a checkpoint now so that the decay phase of a wsd schedule leaves
        about keep_last of them, evenly spread, to average into the final model."""
        t, step = self.cfg.train, self.state.step
        if not in_decay(step, t, total):
            return False
        interval = math.ceil((total - decay_start(total, t.warmup_steps, t.decay_fraction)) / t.keep_last)
        return step - self.last_save >= max(interval, 1)

    def train_record(self, window: Window, lr: float, total: float) -> dict:
        """Log the training figures of the steps since the last record, and start a new window."""
        st = self.state
        loss, nll = self.world.all_sum([window.loss, window.nll])
        rec = {
            "step": st.step, "epoch": st.epoch, "lr": lr,
            "train_loss": loss / window.tokens, "train_nll": nll / window.tokens,
            "tgt_tokens_per_s": window.tokens / window.seconds(),
            "elapsed_min": st.elapsed_s / 60, "grad_norm": self.step.grad_norm,
        }
        if math.isfinite(total):
            rec["steps_total_estimate"] = round(total)
        if self.metrics:
            self.metrics.record(rec)
        window.reset()
        return rec

    def train_step(self, lr: float) -> tuple[float, float, int]:
        """One optimizer step over this process's batches: its summed loss and NLL, and the
        target tokens of the step summed over all processes."""
        batches = self.next_batches()
        n_tokens = int(self.world.all_sum([sum(b.n_tokens for b in batches)])[0])
        loss, nll = self.step(batches, lr, n_tokens, self.world.size)
        return loss, nll, n_tokens

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

    def validate_and_save(self, validate: bool, lr: float, total: float) -> None:
        """Rank 0 validates (when `validate`) and writes a step checkpoint; every process takes
        part in the collectives."""
        st, world = self.state, self.world
        rngs = world.gather(rng_state(world.device)) if world.size > 1 else None
        if world.is_main:
            metrics = {"lr": lr, "decay": in_decay(st.step, self.cfg.train, total), **self.precision_record}
            improved = False
            if validate:
                scores = self.validate()
                improved = scores["valid_bleu"] > st.best_bleu
                if improved:
                    st.best_bleu, st.best_step, st.bad_validations = scores["valid_bleu"], st.step, 0
                else:
                    st.bad_validations += 1
                self.metrics.record({"step": st.step, **scores, "best_bleu": st.best_bleu})
                metrics.update(scores)
            st.elapsed_s = self.budget.elapsed()  # validation counts against the budget too
            self.ckpts.save(
                step=st.step, config=self.config_record, tokenizer=self.tokenizer, model=self.model,
                train_state=self.train_state(rngs), metrics=metrics, is_best=improved,
                provenance=replace(self.provenance, step=st.step, created=utc_now(),
                                   valid_bleu=metrics.get("valid_bleu")),
            )
        self.last_save = st.step
        # Rank 0's figures on every process: they decide when to stop.
        st.best_bleu, st.best_step, st.bad_validations, st.elapsed_s = world.broadcast(
            (st.best_bleu, st.best_step, st.bad_validations, st.elapsed_s)
        )

    def validate(self) -> dict:
        """Validation loss and BLEU (greedy) of the current weights."""
        valid_loss = self.valid_loss()
        n = self.cfg.train.valid_bleu_sentences or len(self.valid_data)
        refs = list(self.valid_data["tgt"][:n])
        translator = Translator(self.model, self.tokenizer, DecodeOptions())  # decodes on the model's device
        hyps = [tr.text for tr in translator.translate(list(self.valid_data["src"][:n]))]
        return {"valid_loss": valid_loss, "valid_bleu": sacrebleu.corpus_bleu(hyps, [refs]).score}

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
