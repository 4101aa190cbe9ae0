"""Python 2 ``.pkl`` files (the MSRA ImageNet models detectron2 starts from) load through the
safe unpickler: Python 2 wrote an array's raw bytes as a ``str``, which only ``latin1`` decodes
to the same bytes, as detectron2's own loader does."""

import collections
import io
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

from dcnv2.checkpoint import DCNv2Checkpointer, load_checkpoint_file


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 wrote ``str``: the (SHORT_)BINSTRING opcodes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _python2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _blobs():
    g = np.random.default_rng(0)
    # Negative floats: their bytes include values >= 0x80, which ASCII cannot decode.
    return collections.OrderedDict(
        [
            ("conv1_w", -g.random((4, 3, 3, 3), dtype=np.float32)),
            ("res_conv1_bn_s", g.random(4, dtype=np.float32) - 2.0),
            ("res_conv1_bn_b", np.linspace(-1, 1, 4).astype(np.float32)),
        ]
    )


def test_the_test_pickle_is_in_python2s_format():
    data = _python2_pickle({"blobs": _blobs()})
    assert pickle.BINSTRING in data or pickle.SHORT_BINSTRING in data
    with pytest.raises(UnicodeDecodeError):  # Python 3's default (ASCII) cannot read it
        pickle.loads(data)


def test_python2_pkl_loads_with_its_bytes_intact(tmp_path):
    blobs = _blobs()
    path = tmp_path / "R-50.pkl"
    path.write_bytes(_python2_pickle({"blobs": blobs}))
    loaded = load_checkpoint_file(str(path))["blobs"]
    assert list(loaded) == list(blobs)
    for name, array in blobs.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)


def test_python2_pkl_reaches_the_model_by_name_matching(tmp_path):
    # detectron2's Caffe2 name conversion maps conv1_w to stem.conv1.weight.
    stem = nn.Sequential(collections.OrderedDict(conv1=nn.Conv2d(3, 4, 3, bias=False)))
    model = nn.Sequential(collections.OrderedDict(stem=stem))
    path = tmp_path / "R-50.pkl"
    path.write_bytes(_python2_pickle({"blobs": _blobs()}))
    DCNv2Checkpointer(model).load(str(path))
    torch.testing.assert_close(model.stem.conv1.weight, torch.from_numpy(_blobs()["conv1_w"]))
