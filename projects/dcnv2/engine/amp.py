"""Mixed-precision training loops for every device.

detectron2's ``AMPTrainer`` asserts CUDA in ``run_step`` and uses ``torch.cuda.amp``. On CUDA we
keep it (float16 autocast with a ``GradScaler``); elsewhere (CPU) the loop below autocasts to
bfloat16, which has float32's exponent range, so gradients need no loss scaling. The deformable
op itself always runs in float32 under autocast (see ``dcnv2.layers.deform_conv``).
"""

import time
from typing import Any, Dict, Tuple, Type

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["AutocastTrainer", "amp_loop", "amp_trainer"]


class AutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass runs under ``torch.autocast(device_type, precision)``.

    Backward and the optimizer step run outside autocast, as PyTorch recommends. No gradient
    scaling: meant for bfloat16 (float16 without a scaler can underflow gradients).
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        device_type: str = "cpu",
        precision: torch.dtype = torch.bfloat16,
        **kwargs,
    ):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.device_type = device_type
        self.precision = precision

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        # Sum in float32: the heads' losses may come out of autocast in bfloat16.
        losses = sum(v.float() for v in loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def amp_loop(device_type: str) -> Tuple[Type[SimpleTrainer], Dict[str, Any]]:
    """The mixed-precision training-loop class for a device, and the keyword arguments it needs
    besides detectron2's ``(model, data_loader, optimizer)``.

    Returns:
        ``(AMPTrainer, {})`` (float16 + GradScaler) on CUDA; ``(AutocastTrainer,
        {"device_type", "precision": bfloat16})`` elsewhere.
    """
    if device_type == "cuda":
        return AMPTrainer, {}
    return AutocastTrainer, {"device_type": device_type, "precision": torch.bfloat16}


def amp_trainer(model, data_loader, optimizer, **kwargs) -> SimpleTrainer:
    """The mixed-precision training loop for the device ``model``'s parameters are on
    (:func:`amp_loop`). Extra keyword arguments go to the loop (``precision``, ``grad_scaler``
    only on CUDA)."""
    loop_class, defaults = amp_loop(next(model.parameters()).device.type)
    return loop_class(model, data_loader, optimizer, **{**defaults, **kwargs})
