"""train_net.py with faults injected, for the reliability tests (run as a script).

Environment variables, read at start-up, so that the worker processes ``launch`` spawns (they
re-run this file as ``__mp_main__``) inject the same faults:

* ``DCNV2_TEST_DATASET``: ``name,json_file,image_root``: register a COCO-format dataset.
* ``DCNV2_TEST_FLOAT64=1``: train the model in float64 (NMS too).
* ``DCNV2_TEST_NAN_AT=ITER[,ITER...][@RANK]``: make ``loss_box_reg`` NaN at these iterations (on
  process RANK only, when given).
* ``DCNV2_TEST_NAN_GRAD_AT=ITER[,ITER...]``: make the gradient of the box regressor's weight NaN
  at these iterations, the loss staying finite.
* ``DCNV2_TEST_KILL_IN_SAVE=NAME``: SIGKILL the process halfway through writing checkpoint NAME
  (e.g. ``model_0000003.pth``): half its bytes are on disk, fsync-ed, when the process dies.
* ``DCNV2_TEST_SIGNAL_AT=ITER[@RANK]``: the process sends itself SIGTERM during the forward
  pass of iteration ITER (on process RANK only, when given), as a cluster preempting the job.
  ``DCNV2_TEST_SIGNAL_GROUP=1``: another process sends it to its whole process group instead
  (the launcher and every training process), as ``kill -- -PGID`` or Ctrl-C does.
* ``DCNV2_TEST_SIGNAL_IN_SAVE=1``: the process sends itself SIGTERM while writing any
  checkpoint (halfway through its bytes).

Imported as a module (by the in-process tests) it injects nothing; its helpers are reused.
"""

import importlib.util
import io
import os
import signal
import subprocess
import sys

import torch
import torchvision.ops.boxes as box_ops
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_NMS = box_ops.nms


def float64_nms(boxes, scores, threshold):
    # detectron2's batched_nms casts the boxes to float32, and torchvision's kernel wants boxes
    # and scores of one dtype: run NMS in float64 when the model is.
    return _NMS(boxes.double(), scores.double(), threshold)


def with_nan_loss(model, iterations, rank=None):
    """Make ``model``'s ``loss_box_reg`` NaN at ``iterations`` (on process ``rank`` only)."""
    forward = model.forward

    def nan_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if model.training and get_event_storage().iter in iterations:
            if rank is None or comm.get_rank() == rank:
                out = dict(out, loss_box_reg=out["loss_box_reg"] * float("nan"))
        return out

    model.forward = nan_forward
    return model


NAN_GRAD_PARAMETER = "roi_heads.box_predictor.bbox_pred.weight"


def with_nan_gradient(model, iterations):
    """Make the gradient of ``NAN_GRAD_PARAMETER`` NaN at ``iterations`` (the loss is finite)."""
    parameter = dict(model.named_parameters())[NAN_GRAD_PARAMETER]

    def hook(grad):
        return grad * float("nan") if get_event_storage().iter in iterations else grad

    parameter.register_hook(hook)
    return model


def with_signal(model, iteration, rank=None, signum=signal.SIGTERM, group=False):
    """Make the process send itself (its process group, with ``group``) ``signum`` in
    ``model``'s forward pass at ``iteration`` (on process ``rank`` only)."""
    forward = model.forward

    def signalling_forward(*args, **kwargs):
        if model.training and get_event_storage().iter == iteration:
            if rank is None or comm.get_rank() == rank:
                if group:  # sent by another process, as a scheduler's signals are
                    group_id = os.getpgid(0)
                    kill = ["kill", f"-{signum}", "--", f"-{group_id}"]
                    subprocess.run(kill, check=True, start_new_session=True)
                else:
                    os.kill(os.getpid(), signum)
        return forward(*args, **kwargs)

    model.forward = signalling_forward
    return model


def signal_halfway(real_save, signum=signal.SIGTERM):
    """A ``torch.save`` that sends the process ``signum`` halfway through writing a file."""

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signum)
        f.write(data[len(data) // 2 :])

    return save


def faulty_model(model, env):
    """``model`` with the faults ``env`` asks for (DCNV2_TEST_FLOAT64, DCNV2_TEST_NAN_AT,
    DCNV2_TEST_NAN_GRAD_AT)."""
    if env.get("DCNV2_TEST_FLOAT64") == "1":
        model = model.double()
    if env.get("DCNV2_TEST_NAN_AT"):
        iterations, _, rank = env["DCNV2_TEST_NAN_AT"].partition("@")
        iterations = {int(i) for i in iterations.split(",")}
        model = with_nan_loss(model, iterations, int(rank) if rank else None)
    if env.get("DCNV2_TEST_NAN_GRAD_AT"):
        model = with_nan_gradient(model, {int(i) for i in env["DCNV2_TEST_NAN_GRAD_AT"].split(",")})
    if env.get("DCNV2_TEST_SIGNAL_AT"):
        iteration, _, rank = env["DCNV2_TEST_SIGNAL_AT"].partition("@")
        group = env.get("DCNV2_TEST_SIGNAL_GROUP") == "1"
        model = with_signal(model, int(iteration), int(rank) if rank else None, group=group)
    return model


def kill_halfway(real_save, target: str):
    """A ``torch.save`` that dies (SIGKILL) halfway through writing the temporary file of
    checkpoint ``target``, after making the half it wrote durable."""

    def save(obj, f, *args, **kwargs):
        # atomic_write's file comes from os.fdopen: its name is the descriptor (Linux /proc).
        try:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}"))
        except (AttributeError, OSError):  # a path, or an in-memory buffer
            name = ""
        if not name.startswith(f".{target}."):
            return real_save(obj, f, *args, **kwargs)

        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    return save


def _import_train_net():
    if "train_net" not in sys.modules:
        path = os.path.join(REPO, "train_net.py")
        spec = importlib.util.spec_from_file_location("train_net", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_net"] = module  # workers unpickle train_net.main by this name
        spec.loader.exec_module(module)
    return sys.modules["train_net"]


def _inject_from_environment(train_net) -> None:
    env = os.environ
    if env.get("DCNV2_TEST_DATASET"):
        from detectron2.data import DatasetCatalog
        from detectron2.data.datasets import register_coco_instances

        name, json_file, image_root = env["DCNV2_TEST_DATASET"].split(",")
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, image_root)
    if env.get("DCNV2_TEST_KILL_IN_SAVE"):
        import dcnv2.checkpoint.atomic as atomic

        torch.save = kill_halfway(torch.save, env["DCNV2_TEST_KILL_IN_SAVE"])
        assert atomic.torch.save is torch.save
    if env.get("DCNV2_TEST_SIGNAL_IN_SAVE") == "1":
        import dcnv2.checkpoint.atomic as atomic

        torch.save = signal_halfway(torch.save)
        assert atomic.torch.save is torch.save
    if env.get("DCNV2_TEST_FLOAT64") == "1":
        box_ops.nms = float64_nms
    build_model = train_net.Trainer.build_model.__func__
    train_net.Trainer.build_model = classmethod(
        lambda cls, cfg: faulty_model(build_model(cls, cfg), env)
    )


if __name__ in ("__main__", "__mp_main__"):
    _TRAIN_NET = _import_train_net()
    _inject_from_environment(_TRAIN_NET)
    if __name__ == "__main__":
        _TRAIN_NET.invoke_main()
