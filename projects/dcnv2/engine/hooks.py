"""Training hooks: :class:`NonFiniteGuard` stops (or skips) an iteration whose loss or gradients
are not finite, on every process together, before the optimizer step; :class:`ResumableDataHook`
makes a resumed run continue the data order and random draws of an uninterrupted one."""

import logging
import random
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..config import YAML_KEYS, RunKeys
from ..data.resumable import ResumableTrainLoader
from ..errors import DCNv2Error, NonFiniteLossError

__all__ = ["NonFiniteGuard", "ResumableDataHook", "quiet_user_error_tracebacks", "usual_causes"]

logger = logging.getLogger(__name__)


def usual_causes(keys: RunKeys) -> str:
    return (
        f"Usual causes: a learning rate too high for the batch size ({keys.lr}), "
        f"no gradient clipping ({keys.clip})"
    )


def _any_process(flag: bool, device: torch.device) -> bool:
    if comm.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class NonFiniteGuard(HookBase):
    """In ``after_backward`` (before the metrics write and the optimizer step), on every process
    together: non-finite loss terms or gradients stop the run with
    :class:`~dcnv2.errors.NonFiniteLossError`, the weights not updated, or, while fewer than
    ``max_nonfinite_skips`` were skipped, drop the iteration's update and its non-finite terms
    from the metrics. ``keys`` name the config keys in its messages."""

    def __init__(self, model: torch.nn.Module, max_nonfinite_skips: int = 0, keys=YAML_KEYS):
        self.max_nonfinite_skips = int(max_nonfinite_skips)
        self.keys = keys
        self.skipped: List[int] = []
        self._losses = None
        model.register_forward_hook(self._record_losses)

    def _record_losses(self, module, inputs, outputs) -> None:
        if module.training:
            self._losses = outputs if isinstance(outputs, dict) else {"total_loss": outputs}

    def after_backward(self):
        losses, self._losses = self._losses or {}, None
        values = {k: float(v.detach().float().sum()) for k, v in losses.items()}
        bad = {k: v for k, v in values.items() if not np.isfinite(v)}
        if not bad and not np.isfinite(sum(values.values())):
            bad["total_loss"] = sum(values.values())
        # A finite loss can still have non-finite gradients (a backward that overflows), which
        # the optimizer step would write into the weights; a GradScaler skips those steps itself.
        grads = {} if bad else self._nonfinite_gradients()
        device = next(iter(losses.values())).device if losses else torch.device("cpu")
        if _any_process(bool(bad or grads), device):
            self._on_nonfinite(self.trainer.iter, losses, bad, grads)

    def _nonfinite_gradients(self) -> Dict[str, float]:
        """Names of the parameters whose gradient has a NaN or Inf, with the gradient's norm."""
        if getattr(self.trainer, "grad_scaler", None) is not None:
            return {}
        named = [
            (n, p.grad) for n, p in self.trainer.model.named_parameters() if p.grad is not None
        ]
        if not named:
            return {}
        norms = torch.stack([n.float() for n in torch._foreach_norm([g for _, g in named])])
        bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
        return {named[i][0].removeprefix("module."): float(norms[i]) for i in bad}

    def _on_nonfinite(self, it: int, losses, local_bad, local_grads) -> None:
        per_rank = comm.all_gather((local_bad, local_grads))
        bad_terms = {k for bad, _ in per_rank for k in bad}
        if bad_terms:
            what = "loss"
            detail = ", ".join(
                f"{k}={v}" + (f" (process {rank})" if len(per_rank) > 1 else "")
                for rank, (bad, _) in enumerate(per_rank)
                for k, v in bad.items()
            )
            headline = f"Loss became non-finite at iteration {it}: {detail}."
            causes = f"{usual_causes(self.keys)}, bad boxes."
        else:
            # After DDP's all-reduce every process holds the same gradients: list them once.
            names = list(dict.fromkeys(n for _, grads in per_rank for n in grads))
            what = "gradients"
            detail = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if names[5:] else "")
            headline = (
                f"Gradients became non-finite at iteration {it} while the loss was finite, in "
                f"{len(names)} parameter(s): {detail}."
            )
            causes = (
                "Usual causes: a layer whose backward overflows or divides by zero (in float16 "
                f"or bfloat16 training, on degenerate boxes), a learning rate too high for the "
                f"batch size ({self.keys.lr})."
            )
        limit = f"at most {self.max_nonfinite_skips}, {self.keys.max_nonfinite_skips}"
        if len(self.skipped) < self.max_nonfinite_skips:
            self.skipped.append(it)
            logger.warning(
                f"Non-finite {what} at iteration {it}: {detail}. Skipped this iteration's update "
                f"({len(self.skipped)} of {limit})."
            )
            self._skip_update(losses, bad_terms)
            return
        earlier = (
            f" Iterations skipped before for the same reason: {self.skipped} ({limit})."
            if self.max_nonfinite_skips
            else f" To skip up to N such iterations instead, set {self.keys.max_nonfinite_skips} N."
        )
        raise NonFiniteLossError(
            f"{headline} Training stopped before the optimizer step, so the weights were not "
            f"updated with it.{earlier} {causes}"
        )

    def _skip_update(self, losses, bad_terms) -> None:
        # The same terms leave the metrics on every process (detectron2 averages them by name
        # and raises on the main process for a non-finite total).
        if "total_loss" in bad_terms:
            losses.clear()
        for name in bad_terms:
            losses.pop(name, None)
        if getattr(self.trainer, "grad_scaler", None) is None:
            # torch's optimizers leave parameters without a gradient alone: nothing is updated.
            self.trainer.optimizer.zero_grad(set_to_none=True)
            return
        # A GradScaler skips a step whose gradients are not finite (and lowers its scale).
        for group in self.trainer.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    def state_dict(self):
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state_dict):
        self.skipped = list(state_dict.get("skipped", []))


class ResumableDataHook(HookBase):
    """Seed the random generators from ``(seed, iteration, rank)`` before every step and start a
    :class:`~dcnv2.data.resumable.ResumableTrainLoader` at the iteration training starts from.
    The seed is saved in checkpoints, so a run with a random seed (``SEED -1``) resumes the same
    stream.
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
        key = [self.seed % 2**32, self.trainer.iter, comm.get_rank(), 1]
        s = int(np.random.SeedSequence(key).generate_state(1)[0])
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])


def _not_a_user_error(record: logging.LogRecord) -> bool:
    return not (
        record.exc_info and isinstance(record.exc_info[1], (DCNv2Error, FloatingPointError))
    )


def quiet_user_error_tracebacks() -> None:
    """Stop detectron2's training loop from logging a traceback for a :class:`DCNv2Error`
    (its message is reported once, by ``train_net.py``)."""
    # addFilter adds a filter once.
    logging.getLogger("detectron2.engine.train_loop").addFilter(_not_a_user_error)
