"""Weights I/O shared by the converters and the checkpointer: files come out with the
permissions of any file the user creates (0o666 less the umask), the ResNet helpers both
converters use, and one error family."""

import os
import pickle
import stat

import pytest
import torch

from dcnv2.checkpoint import DCNv2Checkpointer
from dcnv2.checkpoint.atomic import atomic_pickle
from dcnv2.checkpoint.convert_torchvision import convert_torchvision_checkpoint
from dcnv2.checkpoint.weights_io import (
    RESNET_RULES,
    ConversionError,
    ResNetSpec,
    expected_resnet_shapes,
    float_list,
    infer_resnet_spec,
    rename_key,
    save_weights,
)
from dcnv2.errors import DCNv2Error

# A ResNet-50 layout with narrow layers: every tensor a real one has, a few kB in all.
TINY = ResNetSpec(depth=50, width_per_group=2, stem_out_channels=4, res2_out_channels=8)


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda u: f"umask{u:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _plain_file_mode(folder) -> int:
    """The mode a plain ``open(path, "w")`` gives a new file here."""
    path = os.path.join(folder, "plain.txt")
    with open(path, "w"):
        pass
    mode = _mode(path)
    os.remove(path)
    return mode


def test_converted_weights_get_the_permissions_of_a_new_file(tmp_path, umask):
    shapes = expected_resnet_shapes(TINY)
    src, out = tmp_path / "tiny.pth", tmp_path / "out" / "tiny.pkl"
    torch.save({k: torch.zeros(s) for k, s in shapes.items()}, src)
    spec, _ = convert_torchvision_checkpoint(str(src), str(out))
    assert spec == TINY
    assert _mode(out) == 0o666 & ~umask == _plain_file_mode(tmp_path)
    if umask == 0o022:
        assert _mode(out) == 0o644
    assert sorted(os.listdir(out.parent)) == ["tiny.pkl"]  # no temporary left
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert set(data["model"]) == {rename_key(k, RESNET_RULES) for k in shapes}


def test_save_weights_pickles_pkl_and_torch_saves_the_rest(tmp_path, umask):
    data = {"model": {"w": torch.arange(3.0)}}
    save_weights(data, str(tmp_path / "a" / "w.pkl"))
    save_weights(data, str(tmp_path / "b" / "w.pth"))
    with open(tmp_path / "a" / "w.pkl", "rb") as f:
        assert pickle.load(f)["model"]["w"].tolist() == [0.0, 1.0, 2.0]
    assert torch.load(tmp_path / "b" / "w.pth", weights_only=True)["model"]["w"].tolist() == [
        0.0,
        1.0,
        2.0,
    ]
    for path in (tmp_path / "a" / "w.pkl", tmp_path / "b" / "w.pth"):
        assert _mode(path) == 0o666 & ~umask


def test_checkpoints_and_last_checkpoint_get_the_permissions_of_a_new_file(tmp_path, umask):
    DCNv2Checkpointer(torch.nn.Linear(2, 2), str(tmp_path)).save("model_final")
    for name in ("model_final.pth", "last_checkpoint"):
        assert _mode(tmp_path / name) == 0o666 & ~umask == _plain_file_mode(tmp_path)


def test_atomic_pickle_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "w.pkl"
    atomic_pickle({"a": 1}, str(target))
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_pickle({"a": lambda: 0}, str(target))  # a lambda cannot be pickled
    with open(target, "rb") as f:
        assert pickle.load(f) == {"a": 1}
    assert os.listdir(tmp_path) == ["w.pkl"]


def test_conversion_errors_are_dcnv2_errors_and_value_errors():
    with pytest.raises(ConversionError, match="R18/R34") as info:
        shapes = {k: s for k, s in expected_resnet_shapes(TINY).items() if "conv3" not in k}
        shapes = {k: s for k, s in shapes.items() if "bn3" not in k}
        infer_resnet_spec(shapes)
    assert isinstance(info.value, DCNv2Error) and isinstance(info.value, ValueError)


def test_float_list_is_a_config_value():
    assert float_list((123.675, 116, 103.53)) == "[123.675, 116.0, 103.53]"


@pytest.mark.parametrize(
    "key, d2",
    [
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_var", "stem.conv1.norm.running_var"),
        ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
        ("layer4.2.bn3.bias", "res5.2.conv3.norm.bias"),
        ("layer2.1.bn2.num_batches_tracked", None),
        ("fc.weight", None),
    ],
)
def test_resnet_key_map(key, d2):
    assert rename_key(key, RESNET_RULES) == d2
