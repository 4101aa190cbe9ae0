"""Training-loop pieces for runs that survive interruption and bad iterations.

* :func:`guard_nonfinite_losses`: the subclass of a training loop (``SimpleTrainer``,
  ``AMPTrainer``, ``AutocastTrainer``) whose non-finite losses, or non-finite gradients of a
  finite loss, stop the run with a message naming the iteration and the loss terms (or
  parameters), before the optimizer step (the weights and the last checkpoint stay good), or
  skip up to a bounded number of such iterations. All processes decide together.
* :class:`ResumableDataHook`: seeds the random generators from ``(seed, iteration, rank)`` before
  every step and starts a :class:`~dcnv2.data.resumable.ResumableTrainLoader` at the iteration
  training starts from, so a resumed run continues the data order, augmentations and sampling
  of an uninterrupted one.
"""

import logging
import random
from typing import Dict, List, Type

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.utils import comm

from ..config import YAML_KEYS, RunKeys
from ..data.resumable import ResumableTrainLoader
from ..errors import DCNv2Error, NonFiniteLossError

__all__ = ["ResumableDataHook", "guard_nonfinite_losses", "quiet_user_error_tracebacks"]

logger = logging.getLogger(__name__)


class _SkipStep(DCNv2Error):
    """Raised between backward and the optimizer step to drop this iteration's update; caught
    by the guard's ``run_step``, never seen outside it."""


def _nonfinite_terms(loss_dict: Dict[str, torch.Tensor]) -> Dict[str, float]:
    values = {k: float(v.detach().float().sum()) for k, v in loss_dict.items()}
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if not bad and not np.isfinite(sum(values.values())):
        bad["total_loss"] = sum(values.values())
    return bad


def _any_process(flag: bool, device: torch.device) -> bool:
    if comm.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _NonFiniteLossGuard:
    """Base placed before a ``SimpleTrainer`` class by :func:`guard_nonfinite_losses`.

    Args (keyword-only, besides the loop class's own):
        max_nonfinite_skips: iterations to skip before stopping.
        keys: the config keys its messages name.
    """

    def __init__(
        self, *args, max_nonfinite_skips: int = 0, keys: RunKeys = YAML_KEYS, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_nonfinite_skips = int(max_nonfinite_skips)
        self.keys = keys
        self.nonfinite_skipped: List[int] = []

    def _usual_causes(self) -> str:
        return (
            f"Usual causes: a learning rate too high for the batch size ({self.keys.lr}), "
            f"no gradient clipping ({self.keys.clip})"
        )

    # detectron2 offers no public hook that sees the loss dict between backward and the
    # optimizer step (``after_backward`` gets no losses), and it raises FloatingPointError in
    # ``_write_metrics``, on the main process only (the others then hang in their next
    # collective). SimpleTrainer and AMPTrainer call it at that point: the override checks first,
    # on every process together, then leaves the rest to detectron2.
    def _write_metrics(self, loss_dict, data_time, prefix: str = "", iter=None):
        self._check_finite(loss_dict, self.iter if iter is None else iter)
        super()._write_metrics(loss_dict, data_time, prefix, iter)

    def _check_finite(self, loss_dict: Dict[str, torch.Tensor], it: int) -> None:
        values = list(loss_dict.values())
        device = values[0].device if values else torch.device("cpu")
        local_bad = _nonfinite_terms(loss_dict)
        # A finite loss can still have non-finite gradients (a backward that overflows); the
        # optimizer step would then write them into the weights. Not with a GradScaler
        # (detectron2's AMPTrainer): its scaled gradients may be inf, and it skips those steps.
        local_grads = {} if local_bad else self._nonfinite_gradients()
        if _any_process(bool(local_bad or local_grads), device):
            self._on_nonfinite(it, local_bad, local_grads)

    def _nonfinite_gradients(self) -> Dict[str, float]:
        """Names of the parameters whose gradient has a NaN or Inf, with the gradient's norm."""
        if getattr(self, "grad_scaler", None) is not None:
            return {}
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        if not named:
            return {}
        norms = torch.stack([n.float() for n in torch._foreach_norm([g for _, g in named])])
        finite = torch.isfinite(norms)
        if bool(finite.all()):
            return {}
        return {
            named[i][0].removeprefix("module."): float(norms[i])
            for i in torch.nonzero(~finite).flatten().tolist()
        }

    def _on_nonfinite(
        self, it: int, local_bad: Dict[str, float], local_grads: Dict[str, float]
    ) -> None:
        per_rank = comm.all_gather((local_bad, local_grads))
        multi = len(per_rank) > 1
        if any(bad for bad, _ in per_rank):
            what = "loss"
            detail = ", ".join(
                f"{k}={v}" + (f" (process {rank})" if multi else "")
                for rank, (bad, _) in enumerate(per_rank)
                for k, v in bad.items()
            )
            headline = f"Loss became non-finite at iteration {it}: {detail}."
            causes = f"{self._usual_causes()}, bad boxes."
        else:
            # After DDP's all-reduce every process holds the same gradients: list them once.
            names = list(dict.fromkeys(n for _, grads in per_rank for n in grads))
            what = "gradients"
            detail = ", ".join(names[:5]) + (
                f" and {len(names) - 5} more" if len(names) > 5 else ""
            )
            headline = (
                f"Gradients became non-finite at iteration {it} while the loss was finite, in "
                f"{len(names)} parameter(s): {detail}."
            )
            causes = (
                "Usual causes: a layer whose backward overflows or divides by zero (in float16 "
                f"or bfloat16 training, on degenerate boxes), a learning rate too high for the "
                f"batch size ({self.keys.lr})."
            )
        skipped: List[int] = self.nonfinite_skipped
        if len(skipped) < self.max_nonfinite_skips:
            skipped.append(it)
            logger.warning(
                f"Non-finite {what} at iteration {it}: {detail}. Skipped this iteration's update "
                f"({len(skipped)} of at most {self.max_nonfinite_skips}, "
                f"{self.keys.max_nonfinite_skips})."
            )
            raise _SkipStep()
        earlier = (
            f" Iterations skipped before for the same reason: {skipped} (at most "
            f"{self.max_nonfinite_skips}, {self.keys.max_nonfinite_skips})."
            if self.max_nonfinite_skips
            else f" To skip up to N such iterations instead, set {self.keys.max_nonfinite_skips} N."
        )
        raise NonFiniteLossError(
            f"{headline} Training stopped before the optimizer step, so the weights were not "
            f"updated with it.{earlier} {causes}"
        )

    def run_step(self):
        try:
            super().run_step()
        except _SkipStep:
            self.optimizer.zero_grad(set_to_none=True)
        except FloatingPointError as e:
            if isinstance(e, NonFiniteLossError):
                raise
            # detectron2's RPN raises this in the forward pass when its predictions are not
            # finite: the weights already diverged in an earlier update whose loss was finite.
            # Skipping cannot help, and the other processes are already in backward: stop.
            raise NonFiniteLossError(
                f"The model's outputs became non-finite at iteration {self.iter} ({e}): the "
                "weights diverged in an earlier update, whose loss was still finite. "
                f"{self._usual_causes()}.",
                diverged=True,
            ) from None

    def state_dict(self):
        ret = super().state_dict()
        ret["nonfinite_skipped"] = list(self.nonfinite_skipped)
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.nonfinite_skipped = list(state_dict.get("nonfinite_skipped", []))


_GUARDED: Dict[type, type] = {}


def guard_nonfinite_losses(loop_class: Type[SimpleTrainer]) -> Type[SimpleTrainer]:
    """A subclass of ``loop_class`` whose non-finite losses stop the run with
    :class:`~dcnv2.errors.NonFiniteLossError`, or skip the iteration's update while fewer than
    ``max_nonfinite_skips`` (a keyword argument of its constructor) were skipped.

    The check replaces detectron2's (which raises on the main process only) at the same point:
    after backward, before the optimizer step. Needs synchronous metrics
    (``async_write_metrics=False``, detectron2's default).
    """
    if loop_class not in _GUARDED:
        _GUARDED[loop_class] = type(
            f"Guarded{loop_class.__name__}", (_NonFiniteLossGuard, loop_class), {}
        )
    return _GUARDED[loop_class]


def _iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed % 2**32, iteration, rank, 1]).generate_state(1)[0])


class ResumableDataHook(HookBase):
    """Continue data order and random draws exactly where a resumed run stopped.

    Its state (the seed) is saved in checkpoints with the trainer's, so a run started with a
    random seed (``SEED -1``) resumes the same stream.

    Args:
        seed: seed of the data stream and of the per-iteration generators.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_train(self):
        loader = self.trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.start_at(self.trainer.iter, self.seed)
        elif self.trainer.iter > 0:
            logger.warning(
                f"Resuming at iteration {self.trainer.iter} with a {type(loader).__name__}, "
                "which starts its data stream from the beginning again."
            )

    def before_step(self):
        s = _iteration_seed(self.seed, self.trainer.iter, comm.get_rank())
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])


class _QuietUserErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DCNv2Error))


def quiet_user_error_tracebacks() -> None:
    """Stop detectron2's training loop from logging a traceback for a :class:`DCNv2Error`
    (its message is reported once, by ``train_net.py``)."""
    loop_logger = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, _QuietUserErrors) for f in loop_logger.filters):
        loop_logger.addFilter(_QuietUserErrors())
