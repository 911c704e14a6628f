"""One optimizer step: the label-smoothed loss, its backward over gradient-accumulation batches,
clipping and Adam; optionally through torch.compile and torch's fused Adam, each falling back to
the plain path, with a message, where this torch or device cannot run it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from training.config import TrainConfig
from training.data import Batch
from training.precision import MixedPrecision


def smoothed_nll(logits: Tensor, gold: Tensor, pad: int, smoothing: float) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed cross entropy and summed NLL (detached) over real tokens, from one
    log-softmax: logits (B, T, V), gold (B, T). Equal to F.cross_entropy(..., label_smoothing=),
    gradient included, which `SmoothedNLL` writes in one pass over the log-probabilities."""
    V = logits.size(-1)
    real = (gold != pad).reshape(-1)  # (B*T,)
    return SmoothedNLL.apply(logits.reshape(-1, V), gold.reshape(-1), real, smoothing)


class SmoothedNLL(torch.autograd.Function):
    """The loss of `smoothed_nll` over (N, V) logits with its gradient written directly:
    d loss / d logits = real * (softmax - (1 - s) onehot(gold) - s / V), computed in place of the
    saved log-probabilities. Through autograd the same gradient takes a log-softmax backward, a
    mean's backward, a gather's zero-filled scatter and their sum, each a pass over (N, V)
    (benchmarks/train_throughput.py times both). Its backward runs once: the saved
    log-probabilities become the gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, gold: Tensor, real: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
        logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # (N, V)
        weight = real.to(logp.dtype)  # (N,)
        nll = -logp.gather(1, gold.unsqueeze(1)).squeeze(1) * weight  # (N,)
        loss = (1.0 - smoothing) * nll
        if smoothing:
            loss = loss - smoothing * logp.mean(dim=-1) * weight  # cross entropy against the uniform distribution
        ctx.save_for_backward(logp, gold, weight)
        ctx.smoothing, ctx.dtype, ctx.used = smoothing, logits.dtype, False
        nll_sum = nll.sum()
        ctx.mark_non_differentiable(nll_sum)
        return loss.sum(), nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.used:
            raise RuntimeError("SmoothedNLL's backward ran twice: its saved log-probabilities became the gradient")
        ctx.used = True
        logp, gold, weight = ctx.saved_tensors
        s, V = ctx.smoothing, logp.size(-1)
        grad = logp.exp_()  # (N, V) softmax
        if s:
            grad.sub_(s / V)
        grad.scatter_add_(1, gold.unsqueeze(1), torch.full_like(weight, -(1.0 - s)).unsqueeze(1))
        grad.mul_((weight * grad_loss).unsqueeze(1))
        return grad.to(ctx.dtype), None, None, None


def label_smoothed_loss(model: torch.nn.Module, batch: Batch, smoothing: float) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed cross entropy and summed NLL over the batch's real target tokens.

    `model` may be wrapped in DistributedDataParallel, whose forward synchronises gradients.
    """
    return batch_loss(model, batch.src, batch.tgt_in, batch.tgt_out, smoothing)


LossFn = Callable[[torch.nn.Module, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]


def batch_loss(model: torch.nn.Module, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
    """label_smoothed_loss over plain tensors: what torch.compile traces."""
    logits = model(src, tgt_in)  # (B, T, V)
    return smoothed_nll(logits, tgt_out, getattr(model, "module", model).cfg.pad_id, smoothing)


def make_adam(params: Iterable[Tensor], t: TrainConfig, log: Callable[[str], None] = print) -> torch.optim.Adam:
    """Adam with the config's betas, eps and weight decay; torch's fused kernel when
    `t.fused_adam` and this torch has one for the parameters' device, else its default."""
    params = list(params)
    kwargs = {"lr": t.lr, "betas": t.betas, "eps": t.eps, "weight_decay": t.weight_decay}
    if t.fused_adam:
        try:
            return torch.optim.Adam(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            log(f"fused Adam unavailable here ({first_line(e)}); using torch's default Adam")
    return torch.optim.Adam(params, **kwargs)


# What a failed compilation raises: dynamo's and inductor's errors (BackendCompilerFailed wraps
# the compiler's), or a RuntimeError/OSError from a backend torch cannot build or load.
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, RuntimeError, OSError)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class TrainStep:
    """The arithmetic of one optimizer step of `model` (`train_model`: the same model, or its
    DistributedDataParallel wrapper), returning the summed loss and NLL of its batches."""

    def __init__(
        self, model: torch.nn.Module, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        amp: MixedPrecision, t: TrainConfig, log: Callable[[str], None] = print, loss_fn: LossFn | None = None,
    ) -> None:
        self.model, self.train_model, self.optimizer, self.amp = model, train_model, optimizer, amp
        self.smoothing, self.clip_norm = t.label_smoothing, t.clip_norm
        self.log = log
        self.loss_fn = loss_fn or batch_loss
        # Dynamic shapes from the start: every batch has another (B, S, T).
        self.compiled = torch.compile(self.loss_fn, dynamic=True) if t.compile else None
        self.compile_seconds: float | None = None  # the first compiled step's time, compilation included
        self.grad_norm = 0.0  # the last step's gradient norm before clipping (0 when not clipping)

    def __call__(self, batches: list[Batch], lr: float, n_tokens: int, world_size: int = 1) -> tuple[float, float]:
        """Accumulate the gradients of `batches` (this process's share of a step of `n_tokens`
        target tokens over all processes) and take one optimizer step at `lr`."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.train()
        if self.compiled is not None:
            t0 = time.perf_counter()
            try:
                sums = self.accumulate(batches, n_tokens, world_size, self.compiled)
            except COMPILE_ERRORS as e:  # a missing C++ compiler, an op it cannot trace
                self.log(f"torch.compile failed ({first_line(e)}); training without it")
                self.compiled = None
                self.optimizer.zero_grad(set_to_none=True)
            else:
                if self.compile_seconds is None:
                    self.compile_seconds = time.perf_counter() - t0
                    self.log(f"torch.compile: first step {self.compile_seconds:.1f}s, compilation included")
                return self.finish(sums)
        return self.finish(self.accumulate(batches, n_tokens, world_size, self.loss_fn))

    def accumulate(self, batches: list[Batch], n_tokens: int, world_size: int, loss_fn: LossFn) -> tuple[float, float]:
        loss_sum, nll_sum = 0.0, 0.0
        for i, b in enumerate(batches):
            # Gradients are all-reduced once, on the last backward of the step.
            sync = world_size == 1 or i == len(batches) - 1
            with nullcontext() if sync else self.train_model.no_sync():
                with self.amp.autocast():
                    loss, nll = loss_fn(self.train_model, b.src, b.tgt_in, b.tgt_out, self.smoothing)
                # DDP averages gradients over processes; scaling by their number makes the result
                # the gradient of the step's summed loss over all its tokens, as in one process.
                self.amp.scaler.scale(loss * world_size / n_tokens).backward()
            loss_sum += loss.item()
            nll_sum += nll.item()
        return loss_sum, nll_sum

    def finish(self, sums: tuple[float, float]) -> tuple[float, float]:
        """Clip, step and clear the accumulated gradients."""
        if self.clip_norm:
            self.amp.scaler.unscale_(self.optimizer)
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm))
        self.amp.scaler.step(self.optimizer)
        if self.optimizer.defaults.get("fused"):
            # The fused kernel writes the weights without bumping their version counters, and the
            # model's inference caches (packed copies of weights, translator.native.onednn.weight_copy)
            # are made again only when the version changes: validation would decode stale weights.
            torch.autograd.graph.increment_version([p for g in self.optimizer.param_groups for p in g["params"]])
        self.amp.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return sums
