"""Mixed precision on every device: detectron2's ``AMPTrainer`` on CUDA (it asserts CUDA),
elsewhere :class:`AutocastTrainer` in bfloat16, whose float32 exponent range needs no loss
scaling."""

import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["AutocastTrainer", "amp_trainer"]


class AutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass runs under ``torch.autocast(device_type, precision)``
    (backward and the optimizer step outside it, as PyTorch recommends), without gradient scaling.
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


def amp_trainer(model, data_loader, optimizer, **kwargs) -> SimpleTrainer:
    """The mixed-precision training loop for the device of ``model``'s parameters."""
    device_type = next(model.parameters()).device.type
    if device_type == "cuda":
        return AMPTrainer(model, data_loader, optimizer, **kwargs)
    return AutocastTrainer(model, data_loader, optimizer, device_type=device_type, **kwargs)
