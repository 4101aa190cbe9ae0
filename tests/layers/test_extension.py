"""The shared JIT-extension loader (``dcnv2.layers.extension``): a failed build is tried once,
reported once with its reason, and leaves the extension unavailable; a library that builds but
registers no probe operator counts as failed; each torch, interpreter and source version builds in
a directory of its own."""

import logging
import os
import sys

import pytest
from torch.utils import cpp_extension

from dcnv2.layers import extension, mdpool_cpp, native_cpp
from dcnv2.layers.extension import JitExtension, build_location

LOGGER = "dcnv2.tests.extension"


@pytest.fixture(autouse=True)
def _build_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "root"))


def _extension(tmp_path, probe="dcnv2_test_absent.op"):
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    return JitExtension(
        name="dcnv2_test_broken",
        sources=[str(source)],
        probe=probe,
        what="test kernels",
        fallback="test fallback",
        logger=logging.getLogger(LOGGER),
    )


def test_failed_build_is_tried_once_and_reported_once(tmp_path, monkeypatch, caplog):
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError(f"Error building extension '{kwargs['name']}': broken.cpp:1: error")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    ext = _extension(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ext.is_available(warn=False) is False
        assert not caplog.records  # warn=False stays quiet
        assert [ext.is_available() for _ in range(3)] == [False, False, False]
    module, directory = build_location("dcnv2_test_broken", [str(tmp_path / "broken.cpp")])
    reason = f"RuntimeError: Error building extension '{module}': broken.cpp:1: error"
    assert ext.error() == reason
    assert [r.getMessage() for r in caplog.records] == [
        f"dcnv2: could not build the compiled test kernels ({reason}); using the slower test "
        "fallback instead"
    ]
    assert len(calls) == 1
    assert calls[0]["name"] == module and module.startswith("dcnv2_test_broken_")
    assert calls[0]["build_directory"] == directory
    assert calls[0]["sources"] == [str(tmp_path / "broken.cpp")]
    assert calls[0]["extra_cflags"] == ["-O3", "-fopenmp"]
    assert calls[0]["extra_ldflags"] == ["-fopenmp"]
    assert calls[0]["is_python_module"] is False


def test_each_extension_warns_once_on_its_own(tmp_path, monkeypatch, caplog):
    def failing_load(**kwargs):
        raise OSError("no space left")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    first, second = _extension(tmp_path), _extension(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            assert not first.is_available() and not second.is_available()
    assert [r.getMessage().count("OSError: no space left") for r in caplog.records] == [1, 1]


def test_library_without_the_probe_operator_counts_as_failed(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: loaded.append(kwargs["name"]))
    ext = _extension(tmp_path, probe="dcnv2_test_absent.op")
    assert not ext.is_available(warn=False)
    assert [name.rsplit("_", 1)[0] for name in loaded] == ["dcnv2_test_broken"]
    assert ext.error().startswith(("AttributeError", "RuntimeError"))
    assert "dcnv2_test_absent" in ext.error()


def test_probe_must_name_a_namespace_and_an_operator(tmp_path):
    for probe in ("im2col", "dcnv2_native.", ".im2col", "a.b.c"):
        with pytest.raises(ValueError, match="probe must be 'namespace.op'"):
            _extension(tmp_path, probe=probe)


def test_both_extensions_use_the_loader_with_their_own_operators():
    assert native_cpp._EXTENSION.name == "dcnv2_native_cpu"
    assert native_cpp._EXTENSION.probe == "dcnv2_native.im2col"
    native_sources = [s.rsplit("/", 1)[-1] for s in native_cpp._EXTENSION.sources]
    assert native_sources[0] == "deform_conv_cpu.cpp"  # defines the library the others extend
    assert mdpool_cpp._EXTENSION.name == "dcnv2_mdpool_cpu"
    assert mdpool_cpp._EXTENSION.probe == "dcnv2_mdpool.forward"
    assert [s.rsplit("/", 1)[-1] for s in mdpool_cpp._EXTENSION.sources] == ["mdpool_cpu.cpp"]
    # Every C++ source is built into exactly one of them.
    csrc = os.path.join(os.path.dirname(native_cpp.__file__), "csrc")
    on_disk = sorted(f for f in os.listdir(csrc) if f.endswith(".cpp"))
    assert sorted(native_sources + ["mdpool_cpu.cpp"]) == on_disk


def test_build_location_is_per_torch_interpreter_and_sources(tmp_path, monkeypatch):
    (tmp_path / "a.h").write_text("#define A 1\n")
    (tmp_path / "a.cpp").write_text('#include "a.h"\n#include <vector>\nint f() { return A; }\n')
    (tmp_path / "b.cpp").write_text("int g() { return 2; }\n")
    sources = [str(tmp_path / "a.cpp")]
    module, directory = build_location("ext", sources)
    assert build_location("ext", list(sources)) == (module, directory)
    assert directory.startswith(str(tmp_path / "root" / "dcnv2-"))
    assert os.path.basename(directory) == "ext" and module.startswith("ext_")
    assert module.rsplit("_", 1)[1] in directory  # the module name carries the sources' hash
    # Other sources, an edited header, another interpreter prefix or torch: another directory.
    others = [build_location("ext", sources + [str(tmp_path / "b.cpp")])]
    (tmp_path / "a.h").write_text("#define A 2\n")
    others.append(build_location("ext", sources))
    (tmp_path / "a.h").write_text("#define A 1\n")
    assert build_location("ext", sources) == (module, directory)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    others.append(build_location("ext", sources))
    monkeypatch.undo()
    monkeypatch.setattr(extension.torch, "__version__", "0.0.1")
    others.append(build_location("ext", sources, root=str(tmp_path / "root")))
    assert len({d for _, d in others} | {directory}) == 5
    assert module != others[1][0]  # two source versions never share a module name


def test_shipped_extensions_hash_their_headers():
    files = extension._source_files(native_cpp._EXTENSION.sources)
    assert "deform_conv_common.h" in [os.path.basename(f) for f in files]
    assert native_cpp._EXTENSION.sources[0] == files[0]
