"""The keys of the code a stage is computed by see every change of it: a model's fields,
arguments, source, the modules and values its computation reaches; the library's source
and the stack's versions."""

import functools
import os
import sys
from typing import Any

import numpy as np
import pytest

from jaxdissect import code_keys


def test_definition_key_sees_fields_apply_arguments_and_source(tmp_path, monkeypatch):
    """Stages are keyed by what a model computes, not only by its weights: a field, an
    `apply` argument or an edit of the file defining the model changes the key; the same
    model built again (in any process: no memory addresses) keeps it."""
    import importlib

    import flax.linen as nn

    from jaxdissect import pipeline

    class Scaled(nn.Module):
        scale: float = 1.0
        act: Any = functools.partial(nn.leaky_relu, negative_slope=0.1)  # repr: an address

        @nn.compact
        def __call__(self, x):
            return self.act(nn.Dense(2)(x) * self.scale)

    key = code_keys.definition_key(Scaled())
    assert key == code_keys.definition_key(Scaled()) and " at 0x" in repr(Scaled())
    assert key != code_keys.definition_key(Scaled(scale=-1.0))
    assert key != code_keys.definition_key(Scaled(), {"train": False})
    assert code_keys.definition_key(Scaled(), source=False) != key
    info = lambda m: pipeline.ModelInfo(m, {}, None, "scaled", "same-weights")  # noqa: E731
    assert info(Scaled()).stage_key == info(Scaled()).stage_key
    assert info(Scaled()).stage_key != info(Scaled(scale=-1.0)).stage_key

    source = "import flax.linen as nn\n\nclass Net(nn.Module):\n    def __call__(self, x):\n"
    (tmp_path / "user_net.py").write_text(source + "        return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    user_net = importlib.import_module("user_net")
    before = code_keys.definition_key(user_net.Net())
    (tmp_path / "user_net.py").write_text(source + "        return -x\n")
    assert code_keys.definition_key(user_net.Net()) != before  # the file, not the loaded class
    monkeypatch.delitem(sys.modules, "user_net")


def test_definition_key_sees_the_users_modules_a_model_file_imports(tmp_path, monkeypatch):
    """A model in a file of its own (not a package) is keyed by the source of the user's
    modules it reaches through its globals (`from helpers import Block`), followed on
    through theirs; another file beside them, not imported, is not in the key."""
    import importlib

    block = "import flax.linen as nn\n\nclass Block(nn.Module):\n    def __call__(self, x):\n"
    (tmp_path / "block_helpers.py").write_text(block + "        return x\n")
    (tmp_path / "block_reexport.py").write_text("from block_helpers import Block\n")
    (tmp_path / "block_net.py").write_text(
        "import flax.linen as nn\nfrom block_reexport import Block\n\n"
        "class Net(nn.Module):\n    def __call__(self, x):\n        return Block()(x)\n"
    )
    (tmp_path / "unrelated.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("block_net", "block_reexport", "block_helpers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    net = importlib.import_module("block_net").Net
    before = code_keys.definition_key(net())
    (tmp_path / "unrelated.py").write_text("x = 2\n")
    assert code_keys.definition_key(net()) == before
    (tmp_path / "block_helpers.py").write_text(block + "        return 2 * x\n")
    assert code_keys.definition_key(net()) != before
    for name in ("block_net", "block_reexport", "block_helpers"):
        monkeypatch.delitem(sys.modules, name)


_NNX_NET = """
from flax import nnx


class Net(nnx.Module):
    def __init__(self, stride, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=stride, rngs=rngs)
        self.act = nnx.relu

    def __call__(self, x):
        return self.act(self.conv(x))
"""


def _nnx_net(folder, monkeypatch) -> Any:
    """The NNX module class `_NNX_NET` defines, imported from its file in `folder`."""
    import importlib

    (folder / "nnx_net.py").write_text(_NNX_NET, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "nnx_net", raising=False)
    return importlib.import_module("nnx_net").Net


def test_definition_key_sees_nnx_settings(tmp_path, monkeypatch):
    """An NNX module's static attributes (a conv's strides: not in `nnx.state`) are keyed;
    the same module built again keeps its key (in a fresh process too:
    `test_a_fresh_process_writes_utf8_and_keys_nnx_modules_alike`)."""
    from flax import nnx

    net = _nnx_net(tmp_path, monkeypatch)
    key = code_keys.definition_key(net(1, nnx.Rngs(0)))
    assert key == code_keys.definition_key(net(1, nnx.Rngs(1)))
    assert key != code_keys.definition_key(net(2, nnx.Rngs(0)))
    monkeypatch.delitem(sys.modules, "nnx_net")


def test_stage_keys_see_the_weights_whatever_key_the_caller_gives(tmp_path, monkeypatch):
    """A `ModelInfo` key kept while the weights change (`key="v1"`) reused the stages of the
    earlier weights: the variables, an NNX module's state, are keyed too."""
    from flax import nnx

    from jaxdissect import pipeline

    info = lambda m, v: pipeline.ModelInfo(m, v, None, "net", "v1").stage_key  # noqa: E731
    weights = {"params": {"w": np.ones(3, np.float32)}}
    same = {"params": {"w": np.ones(3, np.float32)}}
    other = {"params": {"w": np.full(3, 2, np.float32)}}
    module = _features
    assert info(module, weights) == info(module, same) != info(module, other)
    assert info(module, None) == info(module, None)
    net = _nnx_net(tmp_path, monkeypatch)
    assert info(net(1, nnx.Rngs(0)), None) == info(net(1, nnx.Rngs(0)), None)
    assert info(net(1, nnx.Rngs(0)), None) != info(net(1, nnx.Rngs(1)), None)
    monkeypatch.delitem(sys.modules, "nnx_net")


def _features(params, images, stride=2):
    return images[:, ::stride] * params


def test_definition_key_sees_partial_arguments_and_closure_cells():
    """A `functools.partial`'s arguments and a closure's cells are keyed; a function from a
    file without closure cells is keyed by its name and file only, as a Linen module from a
    file or a zoo model is (their keys unchanged)."""
    from jaxdissect.models import zoo

    def make(stride):
        return lambda params, images: _features(params, images, stride)

    partial = functools.partial(_features, stride=1)
    assert code_keys.definition_key(partial) == code_keys.definition_key(
        functools.partial(_features, stride=1)
    )
    assert code_keys.definition_key(partial) != code_keys.definition_key(
        functools.partial(_features, stride=2)
    )
    assert code_keys.definition_key(make(1)) == code_keys.definition_key(make(1))
    assert code_keys.definition_key(make(1)) != code_keys.definition_key(make(2))
    resnet = zoo.build("resnet18")
    assert code_keys._computation(resnet, code_keys._module_classes(resnet)) == []
    assert code_keys._computation(_features, {_features}) == []


def _strided():
    import flax.linen as nn

    class Strided(nn.Module):
        stride: int = 1

        @nn.compact
        def __call__(self, x):
            return nn.Conv(2, (3, 3), strides=self.stride)(x)

    return Strided


_READ = {"net": None}  # a global that `_reads_a_global` reads


def _reads_a_global(params, images):
    return _READ["net"].apply(params, images)


def test_definition_key_sees_modules_dicts_and_arrays_a_function_reads(monkeypatch, caplog):
    """A function model's closure cells, `functools.partial` arguments, bound object and
    the globals it reads are keyed by value (a Linen or NNX module's settings, a dict's
    items, an array's bytes): other values give other keys, the same values built again
    the same key; a value it cannot key is logged."""
    from flax import nnx

    key, strided = code_keys.definition_key, _strided()

    def closing(value):
        return lambda params, images: (value, params, images)

    conv = lambda s: nnx.Conv(3, 4, (3, 3), strides=s, rngs=nnx.Rngs(0))  # noqa: E731
    array = lambda s: np.full(3, s, np.float32)  # noqa: E731
    for make in (strided, conv, lambda s: {"stride": s}, lambda s: [strided(s)], array):
        assert key(closing(make(1))) == key(closing(make(1)))
        assert key(closing(make(1))) != key(closing(make(2)))
    assert key(strided(1).apply) == key(strided(1).apply) != key(strided(2).apply)
    part = lambda s: functools.partial(strided(s).apply, mutable=False)  # noqa: E731
    assert key(part(1)) == key(part(1)) != key(part(2))
    monkeypatch.setitem(_READ, "net", strided(1))
    before = key(_reads_a_global)
    monkeypatch.setitem(_READ, "net", strided(2))
    assert key(_reads_a_global) != before
    with caplog.at_level("WARNING"):
        key(closing(object()))
    assert "stage key cannot see a builtins.object" in caplog.text


@pytest.mark.parametrize("file", [None, "<stdin>"])  # a notebook's, `python - < script`'s
def test_definition_key_sees_code_defined_without_a_file(monkeypatch, file):
    """A model class or function defined where no file is (a notebook, a REPL, `python -`)
    is keyed by its code: another body gives another key, the same body the same key."""
    import types

    header = "import flax.linen as nn\n\nclass Net(nn.Module):\n    @nn.compact\n"
    header += "    def __call__(self, x):\n        return nn.Conv(4, (3, 3), strides=%d)(x)\n"
    header += "\ndef fn(params, x):\n    return x * %d\n"

    def defined(stride: int) -> types.ModuleType:
        notebook = types.ModuleType("notebook_cell")  # no __file__, like __main__ in Jupyter
        if file is not None:
            notebook.__file__ = file
        monkeypatch.setitem(sys.modules, "notebook_cell", notebook)
        exec(header % (stride, stride), notebook.__dict__)
        return notebook

    one, again, two = defined(1), defined(1), defined(2)
    assert code_keys.definition_key(one.Net()) == code_keys.definition_key(again.Net())
    assert code_keys.definition_key(one.Net()) != code_keys.definition_key(two.Net())
    assert code_keys.definition_key(one.fn) == code_keys.definition_key(again.fn)
    assert code_keys.definition_key(one.fn) != code_keys.definition_key(two.fn)


def test_source_fingerprint_sees_python_files_and_survives_symlink_loops(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "data.txt").write_text("not source")
    os.symlink(tmp_path / "pkg", tmp_path / "pkg" / "sub" / "up")  # a cycle
    before = code_keys.source_fingerprint(tmp_path / "pkg")
    (tmp_path / "pkg" / "data.txt").write_text("still not source")
    assert code_keys.source_fingerprint(tmp_path / "pkg") == before
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    assert code_keys.source_fingerprint(tmp_path / "pkg") != before


def test_code_fingerprint_sees_the_stacks_versions(monkeypatch):
    """An upgrade of jax, jaxlib, flax, numpy or Pillow changes the library-code key."""
    import importlib.metadata

    before, real = code_keys.code_fingerprint(), importlib.metadata.version
    assert code_keys.code_fingerprint() == before
    for name in ("jax", "jaxlib", "flax", "numpy", "Pillow"):
        upgraded = lambda n, name=name: "99.0" if n == name else real(n)  # noqa: E731
        monkeypatch.setattr(importlib.metadata, "version", upgraded)
        assert code_keys.code_fingerprint() != before, name
    monkeypatch.setattr(importlib.metadata, "version", real)


def test_a_fresh_process_writes_utf8_and_keys_nnx_modules_alike(tmp_path, monkeypatch):
    """Rows and the synthetic set's tables name their encoding: under -X
    warn_default_encoding an open() of the package that leaves it to the locale raises.
    The same process (one start shared: importing jax takes seconds) keys an NNX module
    as this one does: its graphdef's addresses of jax's functions are left out (built
    abstractly, `nnx.eval_shape`: the same graphdef without seconds of random init)."""
    import subprocess
    import textwrap

    from flax import nnx

    net = _nnx_net(tmp_path, monkeypatch)
    key = code_keys.definition_key(nnx.eval_shape(lambda: net(1, nnx.Rngs(0))))
    monkeypatch.delitem(sys.modules, "nnx_net")
    script = textwrap.dedent(
        f"""
        import pathlib
        import sys
        import warnings
        warnings.filterwarnings("error", category=EncodingWarning, module=r"jaxdissect\\.")
        from jaxdissect import code_keys, store
        from jaxdissect.data import synthetic
        path = store.write_rows_csv(pathlib.Path({str(tmp_path)!r}) / "r.csv", [{{"layer": "café"}}])
        assert path.read_bytes() == "layer\\r\\ncafé\\r\\n".encode("utf-8")
        assert store.read_rows_csv(path) == [{{"layer": "café"}}]
        synthetic.generate_tiny(pathlib.Path({str(tmp_path)!r}) / "b", num_images=2)
        sys.path.insert(0, {str(tmp_path)!r})
        from flax import nnx
        import nnx_net
        print(code_keys.definition_key(nnx.eval_shape(lambda: nnx_net.Net(1, nnx.Rngs(0)))))
        """
    )
    done = subprocess.run(
        [sys.executable, "-X", "warn_default_encoding", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == key


def test_definition_key_sees_what_a_package_and_function_local_imports_reach(tmp_path, monkeypatch):
    """A model in a package importing a top-level module of the user's (`from helper_act
    import act` in `mypkg/net.py`), and a model file importing one inside `__call__`
    (before and after that import has run): editing the imported file changes the key."""
    import importlib

    import flax.linen as nn  # noqa: F401 - the files below import it

    act = "import jax.numpy as jnp\n\ndef act(x):\n    return jnp.maximum({}, 0.0)\n"
    (tmp_path / "helper_act.py").write_text(act.format("x"))
    (tmp_path / "helper_late.py").write_text(act.format("x"))
    (tmp_path / "keypkg").mkdir()
    (tmp_path / "keypkg" / "__init__.py").write_text("")
    (tmp_path / "keypkg" / "net.py").write_text(
        "import flax.linen as nn\nfrom helper_act import act\n\n"
        "class Net(nn.Module):\n    def __call__(self, x):\n        return act(x)\n"
    )
    (tmp_path / "late_net.py").write_text(  # Linen wraps a callable class attribute too
        "import flax.linen as nn\n\nclass Scale:\n    def __call__(self, x):\n        return x\n\n"
        "class Net(nn.Module):\n    scale = Scale()\n\n    def __call__(self, x):\n"
        "        import helper_late\n\n        return helper_late.act(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("keypkg", "keypkg.net", "helper_act", "late_net", "helper_late")
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    package_net = importlib.import_module("keypkg.net").Net
    late_net = importlib.import_module("late_net").Net
    for net, helper in ((package_net, "helper_act"), (late_net, "helper_late")):
        before = code_keys.definition_key(net())
        (tmp_path / f"{helper}.py").write_text(act.format("-x"))
        assert code_keys.definition_key(net()) != before, helper
        (tmp_path / f"{helper}.py").write_text(act.format("x"))
    importlib.import_module("helper_late")  # now loaded: found in sys.modules
    before = code_keys.definition_key(late_net())
    (tmp_path / "helper_late.py").write_text(act.format("-x"))
    assert code_keys.definition_key(late_net()) != before
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_definition_key_sees_every_value_of_an_array_field():
    """numpy's repr abbreviates arrays over 1,000 values and rounds floats to 8 digits: a
    field's array is keyed whole and exactly."""
    import flax.linen as nn

    class Gains(nn.Module):
        gains: Any = None

        @nn.compact
        def __call__(self, x):
            return x * self.gains

    gains = np.linspace(0, 1, 2000).astype(np.float32)
    key = code_keys.definition_key(Gains(gains))
    for edit in (lambda g: g.__setitem__(1000, 7.0), lambda g: g.__setitem__(0, 1e-9)):
        changed = gains.copy()
        edit(changed)
        assert code_keys.definition_key(Gains(changed)) != key
    assert code_keys.definition_key(Gains(gains.copy())) == key
    assert code_keys.definition_key(lambda v, x: x, {"gains": gains}) != code_keys.definition_key(
        lambda v, x: x, {"gains": np.where(np.arange(2000) == 1500, 0.5, gains)}
    )


def test_definition_key_sees_a_field_functions_file_and_the_globals_methods_read(
    tmp_path, monkeypatch
):
    """A Linen module's fields name a function only (`act=<function myact>`): the file
    defining it is keyed, as the `--model` file holding it often is no other class's; the
    globals its methods read are keyed by value (a file's constant set at run time), and a
    notebook class's (with the code of the notebook helpers it calls)."""
    import importlib
    import types

    net = "import flax.linen as nn\nSCALE = 1\n\nclass Net(nn.Module):\n    act: object = None\n"
    net += "\n    def __call__(self, x):\n        return self.act(x) * SCALE\n"
    (tmp_path / "field_net.py").write_text(net)
    (tmp_path / "field_act.py").write_text("def myact(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    field_net, field_act = (importlib.import_module(m) for m in ("field_net", "field_act"))
    key = lambda: code_keys.definition_key(field_net.Net(act=field_act.myact))  # noqa: E731
    before = key()
    (tmp_path / "field_act.py").write_text("def myact(x):\n    return -x\n")
    edited = key()
    assert edited != before  # field_act.py is imported by no model file: only the field
    monkeypatch.setattr(field_net, "SCALE", 3)
    assert key() != edited
    for name in ("field_net", "field_act"):
        monkeypatch.delitem(sys.modules, name)

    cell = "import flax.linen as nn\nSCALE = %d\n\ndef helper(x):\n    return x * %d\n\n"
    cell += "class Net(nn.Module):\n    def __call__(self, x):\n        return helper(x) * SCALE\n"

    def notebook(scale: int, factor: int) -> Any:
        module = types.ModuleType("notebook_globals")  # no __file__, like Jupyter's __main__
        monkeypatch.setitem(sys.modules, "notebook_globals", module)
        exec(cell % (scale, factor), module.__dict__)
        return code_keys.definition_key(module.Net())

    assert notebook(1, 1) == notebook(1, 1)
    assert len({notebook(1, 1), notebook(3, 1), notebook(1, 2)}) == 3
