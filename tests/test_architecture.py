"""How dcnv2 extends detectron2: one error family, no swapped detectron2/fvcore internals, no
import machinery, one exit convention and one warning filter for every entry point, and the config
dialect's key names carried in one object."""

import ast
import contextlib
import glob
import importlib
import importlib.util
import inspect
import io
import os
import pkgutil

import pytest
from PIL import Image

import dcnv2
from dcnv2.errors import USER_ERROR_EXIT, DCNv2Error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(dcnv2.__file__))
# Modules that need optional packages (onnx, onnxruntime, matplotlib...) import them inside
# functions, so every module of the package imports here.
MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages([PACKAGE], prefix="dcnv2.")
    if not name.startswith("dcnv2.configs")
)
_GUARDED_ROOTS = ("detectron2", "fvcore")


def _exception_classes():
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                obj.__module__ == name
                and issubclass(obj, BaseException)
                and not issubclass(obj, Warning)  # warnings are not errors
            ):
                found.append(obj)
    return found


def test_every_exception_class_of_the_package_is_a_dcnv2_error():
    classes = _exception_classes()
    names = {c.__name__ for c in classes}
    # The walk does find the package's classes, in every sub-package.
    assert {"WeightsError", "UnsafeCheckpointError", "DatasetNotFoundError"} <= names
    assert {"UserInputError", "ConversionError"} <= names
    outside = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, DCNv2Error)]
    assert outside == []


def test_errors_also_derive_from_the_builtin_a_caller_expects():
    import pickle

    from dcnv2.checkpoint import UnsafeCheckpointError
    from dcnv2.data import DatasetNotFoundError
    from dcnv2.errors import NonFiniteLossError

    assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError)
    assert issubclass(DatasetNotFoundError, FileNotFoundError)
    assert NonFiniteLossError("x", diverged=True).diverged
    assert not NonFiniteLossError("x").diverged


def _imported_names(tree: ast.Module) -> set:
    """Names a module binds to detectron2/fvcore modules, classes or functions by importing."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in _GUARDED_ROOTS:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in _GUARDED_ROOTS:
                names.update(alias.asname or alias.name for alias in node.names)
    return names


def _root_name(node: ast.AST):
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _swaps(source: str, filename: str = "<source>") -> list:
    """Each assignment to an attribute of an imported detectron2/fvcore name (plain, augmented,
    annotated, ``setattr``, ``del``) and each ``__class__`` assignment, as "file:line: text"."""
    tree = ast.parse(source, filename)
    imported = _imported_names(tree)
    found = []

    def check(target: ast.AST, node: ast.AST) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                check(t, node)
        elif isinstance(target, ast.Attribute):
            if target.attr == "__class__" or _root_name(target) in imported:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node).splitlines()[0]}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                check(target, node)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            check(node.target, node)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                check(target, node)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and node.args
        ):
            obj = node.args[0]
            attr = node.args[1] if len(node.args) > 1 else None
            if _root_name(obj) in imported or (
                isinstance(attr, ast.Constant) and attr.value == "__class__"
            ):
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_swap_finder_finds_swaps():
    # What the package used to do, in each form the finder must catch.
    bad = """
import detectron2.engine.defaults as d2_defaults
from detectron2.engine import DefaultTrainer, defaults
import fvcore.common.checkpoint
d2_defaults.create_ddp_model = object
defaults.AMPTrainer, x = object, 1
DefaultTrainer.build_hooks = lambda self: []
fvcore.common.checkpoint.Checkpointer.save = None
setattr(d2_defaults, "DetectionCheckpointer", object)
trainer.__class__ = type
"""
    assert len(_swaps(bad)) == 6
    ok = """
import detectron2.engine.defaults as d2_defaults
from detectron2.engine import DefaultTrainer
class Trainer(DefaultTrainer):
    pass
trainer = Trainer()
trainer.max_iter = 3
self.checkpointer = d2_defaults.DetectionCheckpointer(model)
"""
    assert _swaps(ok) == []


def test_no_module_swaps_detectron2_or_fvcore_internals_or_an_objects_class():
    found = []
    for root, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path) as source:
                    found += _swaps(source.read(), os.path.relpath(path, PACKAGE))
    assert found == []


def _import(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stderr_and_status(call):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = call()
        except SystemExit as e:
            status = e.code
    return stderr.getvalue(), status


def test_train_net_and_the_tools_report_a_user_error_the_same_way(tmp_path):
    from dcnv2.tools.cli import run_cli

    missing = str(tmp_path / "nope.yaml")
    train_net = _import(os.path.join(REPO, "train_net.py"), "dcnv2_train_net_exit_test")
    out, status = _stderr_and_status(lambda: train_net.invoke_main(["--config-file", missing]))
    assert status == USER_ERROR_EXIT == 2
    assert out.startswith(f"train_net.py: error: Config file {missing} does not exist"), out

    demo = _import(os.path.join(REPO, "tools", "demo.py"), "dcnv2_tool_demo_exit_test")
    argv = ["--config-file", missing, "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    # A readable input to collect (inputs are checked first), then the config fails.
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    out2, status2 = _stderr_and_status(lambda: run_cli(demo.main, argv, prog="demo.py"))
    assert status2 == status
    assert out2.startswith(f"demo.py: error: Config file {missing} does not exist"), out2
    # The same form: "<prog>: error: <message>", one line each here.
    for text in (out, out2):
        assert text.count(": error: ") == 1 and len(text.strip().splitlines()) == 1, text


def test_an_unexpected_error_keeps_its_traceback():
    from dcnv2.tools.cli import run_cli

    def buggy(argv):
        raise KeyError("a bug, not the user's input")

    with pytest.raises(KeyError):
        run_cli(buggy, [], prog="tool.py")


def test_lazyconfig_runs_name_their_own_keys_in_preflight_messages():
    from dcnv2.config import LAZY_KEYS, YAML_KEYS, cfg_get, load_config, run_keys
    from dcnv2.engine.preflight import check_devices
    from dcnv2.errors import LaunchError

    cfg = load_config("lazy/mask_rcnn_R50_mdconv_FPN_1x.py", ["train.device=cpu"])
    assert run_keys(cfg) is LAZY_KEYS and run_keys(dcnv2.get_cfg()) is YAML_KEYS
    assert cfg_get(cfg, LAZY_KEYS.device) == "cpu"
    assert cfg_get(cfg, LAZY_KEYS.max_nonfinite_skips, 0) == 0  # absent: the default
    with pytest.raises(LaunchError, match=r"train.device is 'nonsense'"):
        check_devices("nonsense", 1, LAZY_KEYS)
    with pytest.raises(LaunchError, match=r"MODEL.DEVICE is 'nonsense'"):
        check_devices("nonsense", 1)


def _python_files():
    for top in ("projects", "tools", "tests"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))
    yield from (os.path.join(REPO, f) for f in ("train_net.py", "setup.py"))


def test_no_import_machinery():
    # The searched-for texts are split, so that this file does not match itself.
    banned = ("sys." + "meta_path", "noqa: " + "E402", "importlib." + "abc")
    found = []
    for path in _python_files():
        with open(path) as f:
            source = f.read()
        found += [f"{os.path.relpath(path, REPO)}: {b}" for b in banned if b in source]
    lazy = [
        name
        for name in MODULES + ["dcnv2"]
        if "__getattr__" in vars(importlib.import_module(name))  # PEP 562 module attributes
    ]
    assert found == [] and lazy == []


def _main_block(tree: ast.Module) -> ast.If:
    (block,) = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
    ]
    return block


def test_every_entry_point_drops_the_known_messages_first():
    # The tools run through run_cli, which silences them before the tool's main ...
    for path in sorted(glob.glob(os.path.join(REPO, "tools", "*.py"))):
        with open(path) as f:
            block = _main_block(ast.parse(f.read()))
        assert "run_cli(main" in ast.unparse(block), path
    # ... and train_net.py's main does, in every process of the run.
    with open(os.path.join(REPO, "train_net.py")) as f:
        tree = ast.parse(f.read())
    (main,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    first = main.body[1] if ast.get_docstring(main) else main.body[0]
    assert ast.unparse(first) == "silence_known_warnings()"
