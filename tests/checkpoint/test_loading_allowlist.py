"""The ``.pkl`` allow list is a list of (module, name) pairs, not of modules: a global from a
module that also provides the array rebuilders (``numpy``, ``collections``, ``_codecs``) is
refused unless it is one of the rebuilders, whether the pickle only names it or calls it."""

import codecs
import collections
import pickle

import numpy as np
import pytest

from dcnv2.checkpoint import UnsafeCheckpointError, load_checkpoint_file
from dcnv2.checkpoint.loading import load_pickle_file


class _Calls:
    """Unpickling this calls ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _zoo_pickle(path, extra, protocol=2):
    """A detectron2 model-zoo .pkl (numpy arrays in an OrderedDict) with one more entry."""
    arrays = collections.OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3))
    data = {"model": arrays, "__author__": "someone", "step": np.int64(3), "extra": extra}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return str(path)


# (what the pickle holds, the global it asks for). Each module here is on the allow list for
# another name; the module alone must not be enough.
_REFUSED = [
    pytest.param(collections.namedtuple, "collections.namedtuple", id="namedtuple-ref"),
    pytest.param(_Calls(collections.namedtuple, "P", "x y"), "collections.namedtuple", id="class"),
    pytest.param(collections.Counter, "collections.Counter", id="Counter"),
    pytest.param(np.load, "numpy.load", id="numpy.load-ref"),
    pytest.param(_Calls(np.load, "/nonexistent/x.npy"), "numpy.load", id="numpy.load-call"),
    pytest.param(_Calls(codecs.decode, b"6869", "hex"), "_codecs.decode", id="codecs.decode"),
]


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("extra,global_name", _REFUSED)
def test_a_disallowed_name_from_an_allowed_module_is_refused(
    tmp_path, extra, global_name, protocol
):
    path = _zoo_pickle(tmp_path / "zoo.pkl", extra, protocol)
    assert global_name.rsplit(".", 1)[1].encode() in open(path, "rb").read()
    for load in (load_pickle_file, load_checkpoint_file):
        with pytest.raises(UnsafeCheckpointError) as info:
            load(path)
        assert f"the Python global {global_name!r}" in str(info.value)
        assert path in str(info.value)


@pytest.mark.parametrize("protocol", [2, 4])
def test_the_same_file_without_the_extra_global_loads(tmp_path, protocol):
    # The control: everything else in the files above is allowed.
    path = _zoo_pickle(tmp_path / "zoo.pkl", b"bytes", protocol)
    data = load_pickle_file(path)
    assert isinstance(data["model"], collections.OrderedDict)
    np.testing.assert_array_equal(data["model"]["w"], np.arange(6).reshape(2, 3))
    assert data["step"] == 3 and data["extra"] == b"bytes"


def test_allow_unsafe_runs_what_the_file_asks_for(tmp_path):
    path = _zoo_pickle(tmp_path / "zoo.pkl", _Calls(codecs.decode, b"6869", "hex"))
    assert load_pickle_file(path, allow_unsafe=True)["extra"] == b"hi"


def test_numpy2_module_names_load(tmp_path):
    # numpy 2 writes its array rebuilders as numpy._core.multiarray.*, numpy 1 as
    # numpy.core.multiarray.*: files from either load (numpy 1.26+ reads both names).
    path = _zoo_pickle(tmp_path / "zoo.pkl", b"bytes", protocol=2)
    data = open(path, "rb").read()
    numpy2 = data.replace(b"cnumpy.core.multiarray\n", b"cnumpy._core.multiarray\n")
    assert b"numpy.core" not in numpy2 and numpy2.count(b"numpy._core.multiarray\n") >= 2
    for name in ("_reconstruct", "scalar"):
        assert f"numpy._core.multiarray\n{name}\n".encode() in numpy2
    with open(path, "wb") as f:
        f.write(numpy2)
    loaded = load_pickle_file(path)
    np.testing.assert_array_equal(loaded["model"]["w"], np.arange(6).reshape(2, 3))
    assert loaded["step"] == 3 and isinstance(loaded["step"], np.int64)
