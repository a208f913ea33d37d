"""Weight files written by real torch.save / safetensors, read back without torch; conversion."""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import re
import resource
import shlex
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util

from jaxdissect import cli
from jaxdissect.models import convert as convert_module
from jaxdissect.models import load as model_load
from jaxdissect.models import npz_file, torch_file, torch_import, torch_tensors, weight_file
from jaxdissect.models.checkpoint_io import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_state_dict,
)
from jaxdissect.models.convert import (
    build_from_meta,
    convert,
    load_variables,
    read_meta,
    save_variables,
    variables_template,
)
from jaxdissect.models.densenet import DenseNet, legacy_key_rename
from jaxdissect.models.googlenet import GoogLeNet, googlenet
from jaxdissect.models.torch_import import WeightMappingError, torch_to_flax
from tests import torch_models as tm
from tests import torch_models_b as ref
from tests.experiment_testing import ScriptProcesses
from tests.model_testing import torchscript_save

REPO = Path(__file__).resolve().parents[1]
FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def _save(obj, path: Path, zip_format: bool) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


def _torch_value(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _tricky_state_dict() -> collections.OrderedDict:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, 6, generator=gen)
    shared = torch.arange(12, dtype=torch.float32)
    return collections.OrderedDict(
        weight=torch.randn(3, 4, generator=gen),
        permuted=base.permute(2, 0, 1),  # non-contiguous view
        sliced=base[1:, ::2, 3],  # storage offset and strides
        channels_last=torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last),
        expanded=torch.randn(3, 1, generator=gen).expand(3, 4),  # stride 0
        shared_a=shared[:6],  # two tensors on one storage
        shared_b=shared.view(3, 4)[:, 1],
        half=torch.randn(5, generator=gen).half(),
        bfloat=torch.randn(2, 3, generator=gen).bfloat16(),
        double=torch.randn(2, generator=gen).double(),
        long=torch.arange(-3, 4),
        int=torch.tensor([1, -2], dtype=torch.int32),
        bool=torch.tensor([True, False]),
        byte=torch.tensor([0, 255], dtype=torch.uint8),
        uint16=torch.tensor([1, 65535], dtype=torch.uint16),  # _rebuild_tensor_v3
        scalar=torch.tensor(3.5),
        count=torch.tensor(7),  # like num_batches_tracked
        empty=torch.zeros(0, 3),
    )


@FORMATS
def test_state_dict_matches_torch(tmp_path, zip_format):
    state = _tricky_state_dict()
    loaded = load_state_dict(_save(state, tmp_path / "w.pth", zip_format))
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        want = _torch_value(tensor)
        got = loaded[key]
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert got.flags.c_contiguous, key
    assert loaded["bfloat"].dtype == np.float32
    assert loaded["scalar"].shape == ()


@FORMATS
def test_parameters_load_as_arrays(tmp_path, zip_format):
    layer = torch.nn.Linear(3, 2)
    loaded = load_state_dict(_save(layer.state_dict(keep_vars=True), tmp_path / "p.pt", zip_format))
    np.testing.assert_array_equal(loaded["weight"], layer.weight.detach().numpy())


@FORMATS
def test_places_style_wrapped_checkpoint(tmp_path, zip_format):
    weight = torch.randn(8, 3, 3, 3)
    checkpoint = {
        "epoch": 90,
        "arch": "resnet18",
        "state_dict": collections.OrderedDict(
            [("module.conv1.weight", weight), ("module.fc.bias", torch.zeros(365))]
        ),
        "best_prec1": torch.tensor(54.7),
    }
    path = _save(checkpoint, tmp_path / "resnet18_places365.pth.tar", zip_format)
    loaded = load_state_dict(path)
    assert sorted(loaded) == ["conv1.weight", "fc.bias"]
    np.testing.assert_array_equal(loaded["conv1.weight"], weight.numpy())
    whole = load_checkpoint(path)
    assert whole["epoch"] == 90 and whole["arch"] == "resnet18"
    assert whole["best_prec1"] == np.float32(54.7)


def test_safetensors(tmp_path):
    arrays = {
        "conv.weight": np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32),
        "half": np.arange(4, dtype=np.float16),
        "ids": np.arange(3, dtype=np.int64),
        "bf": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
    }
    path = tmp_path / "w.safetensors"
    safetensors.numpy.save_file(arrays, str(path))
    loaded = load_state_dict(path)
    for key in ("conv.weight", "half", "ids"):
        assert loaded[key].dtype == arrays[key].dtype
        np.testing.assert_array_equal(loaded[key], arrays[key])
    assert loaded["bf"].dtype == np.float32
    np.testing.assert_array_equal(loaded["bf"], [1.5, -2.0])
    # Recognised by content as well as by name.
    renamed = tmp_path / "weights.bin"
    path.rename(renamed)
    assert sorted(load_state_dict(renamed)) == sorted(arrays)


# A module whose import leaves a mark: a load that imported the pickled model's classes
# (as torch.load does) would make it again.
_MARKING_MODULE = """
import os, pathlib, torch
pathlib.Path(os.environ["JAXDISSECT_TEST_IMPORTED"]).touch()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)  # its bias: a None parameter
        self.bn = torch.nn.BatchNorm2d(4)
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        self.again = self.bn  # one module under two names: both in state_dict()
"""


@FORMATS
def test_whole_pickled_module_reads_as_its_state_dict_without_importing_it(
    tmp_path, monkeypatch, zip_format
):
    """`torch.save(model)` (NetDissect-Lite's DenseNet-161 and ResNet-50 Places365 files):
    its state dict as torch gives it (keys, order, values; non-persistent buffers left out),
    its classes never imported and nothing of the pickle run, alone, under a wrapper key or
    inside DataParallel (whose `module.` the load strips)."""
    imported, ran = tmp_path / "imported", tmp_path / "pwned"
    (tmp_path / "marking_net.py").write_text(_MARKING_MODULE)
    monkeypatch.setenv("JAXDISSECT_TEST_IMPORTED", str(imported))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("marking_net", None)  # an earlier case's
    import marking_net

    model = marking_net.Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_()
        model.bn.num_batches_tracked += 7
    model.evil = _Payload(ran)  # an attribute that would run a command when unpickled
    want = collections.OrderedDict((k, v.numpy()) for k, v in model.state_dict().items())
    assert "again.weight" in want and "scratch" not in want and "conv.bias" not in want
    files = {
        "model": _save(model, tmp_path / "whole.pth", zip_format),
        "wrapped": _save({"model": model, "epoch": 3}, tmp_path / "wrapped.pth", zip_format),
        "parallel": _save(torch.nn.DataParallel(model), tmp_path / "dp.pth", zip_format),
    }
    imported.unlink()
    del sys.modules["marking_net"]
    for name, path in files.items():
        got = load_state_dict(path)
        assert list(got) == list(want), name
        for key, value in want.items():
            assert got[key].dtype == value.dtype, (name, key)
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")
    assert isinstance(load_checkpoint(files["model"]), torch_file.ModuleWeights)
    assert repr(load_checkpoint(files["wrapped"])["model"].qualified) == "'marking_net.Net'"
    assert not imported.exists() and "marking_net" not in sys.modules and not ran.exists()


_MARKING_TENSOR = """
import os, pathlib, torch
pathlib.Path(os.environ["JAXDISSECT_TEST_IMPORTED"]).touch()


class Marked(torch.Tensor):
    pass
"""


@FORMATS
def test_tensors_with_python_attributes_load_and_subclasses_are_named_unimported(
    tmp_path, monkeypatch, zip_format
):
    """A tensor with attributes (`t.note = ...`) is pickled through `_rebuild_from_type_v2`:
    its data loads, in a state dict or as a whole module's buffer; a subclass of Tensor is
    refused by its name, its module never imported."""
    tagged = torch.randn(3, 2)
    tagged.note = "x"
    norm = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        norm.running_mean.uniform_()
    norm.running_mean.note = 1
    got = load_state_dict(_save({"w": tagged, "b": torch.ones(2)}, tmp_path / "t.pth", zip_format))
    np.testing.assert_array_equal(got["w"], tagged.numpy())
    whole = load_state_dict(_save(norm, tmp_path / "whole.pth", zip_format))
    np.testing.assert_array_equal(whole["running_mean"], norm.running_mean.numpy())
    assert list(whole) == list(norm.state_dict())

    imported = tmp_path / "imported"
    (tmp_path / "marking_tensor.py").write_text(_MARKING_TENSOR)
    monkeypatch.setenv("JAXDISSECT_TEST_IMPORTED", str(imported))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("marking_tensor", None)
    import marking_tensor

    path = _save(
        {"w": torch.ones(2).as_subclass(marking_tensor.Marked)}, tmp_path / "s.pth", zip_format
    )
    imported.unlink()
    del sys.modules["marking_tensor"]
    with pytest.raises(
        UnsafeCheckpointError,
        match=r"^.*s\.pth: refusing to load marking_tensor\.Marked: the weights are tensors of",
    ):
        load_state_dict(path)
    assert not imported.exists() and "marking_tensor" not in sys.modules


_SCRIPTABLE = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        self.class_embedding = torch.nn.Parameter(torch.randn(4))
        self.scale = 2.0  # an attribute that is no weight

    def forward(self, x):
        return self.head(self.bn1(self.conv1(x)).mean((2, 3), keepdim=True)) * self.scale
"""


@pytest.mark.parametrize("how", ["trace", "script"])
def test_a_torchscript_archive_reads_as_its_state_dict(tmp_path, monkeypatch, how):
    """`torch.jit.save` of a traced or scripted module (OpenAI's CLIP `.pt` files are such
    archives): its tensors, its submodules' too, are `state_dict()`'s; its code is not run."""
    (tmp_path / "scriptable_net.py").write_text(_SCRIPTABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("scriptable_net", None)
    import scriptable_net

    model = scriptable_net.Net().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_()
    torchscript_save(model, torch.zeros(1, 3, 6, 6), tmp_path / "net.pt", script=how == "script")
    del sys.modules["scriptable_net"]
    got = load_state_dict(tmp_path / "net.pt")
    want = model.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)


def test_a_pickled_module_that_is_not_one_is_named(tmp_path):
    """Crafted or damaged modules: one that contains itself, one whose parameter is no
    tensor, one without its submodules' mapping (no module at all: refused by name)."""
    looped = torch.nn.Sequential(torch.nn.Linear(2, 2))
    looped._modules["me"] = looped
    odd = torch.nn.Linear(2, 2)
    odd._parameters["weight"] = 3
    broken = torch.nn.Linear(2, 2)
    del broken.__dict__["_modules"]
    for model, message in (
        (looped, r"the pickled module torch\.nn\.modules\.container\.Sequential contains itself"),
        (odd, r"weight of the pickled torch\.nn\.modules\.linear\.Linear is a int, not a"),
        (broken, r"refusing to load torch\.nn\.modules\.linear\.Linear: the file pickles it, "),
    ):
        path = _save(model, tmp_path / "crafted.pth", True)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}"):
            load_state_dict(path)


def test_a_pickle_naming_thousands_of_globals_is_refused_before_it_costs_memory(tmp_path):
    """Each class a pickle names outside the tables costs a stand-in type: a crafted file
    naming one after another is stopped at `_MAX_STAND_INS`."""
    names = b"".join(b"cm\nC%d\n0" % i for i in range(torch_file._MAX_STAND_INS + 1))
    path = tmp_path / "many.pkl"
    path.write_bytes(b"\x80\x02" + names + b"}.")
    with pytest.raises(CheckpointError, match=r"names more than 4096 classes and functions"):
        load_state_dict(path)
    path.write_bytes(b"\x80\x02" + names[: names.index(b"cm\nC4096")] + b"}.")
    with pytest.raises(CheckpointError, match=r"^.*: not a torch weight file \(no legacy magic"):
        load_state_dict(path)  # 4096 pass; then the pickle is no torch file's


def test_a_whole_densenet_pickled_with_torchvisions_old_names_loads(tmp_path):
    """As NetDissect-Lite's whole_densenet161_places365_python36.pth.tar: a DenseNet pickled
    whole in torch's legacy format by a torchvision that named a dense layer's parts
    `norm.1`, `conv.1`, ...: the weights of the same model's state dict today."""
    config = {"growth_rate": 4, "block_config": (1, 2), "num_init_features": 8}
    reference = tm.randomize_(tm.DenseNet(**config, num_classes=3))
    torch.save(reference.state_dict(), tmp_path / "state.pth")
    for layer in [m for m in reference.modules() if isinstance(m, tm._DenseLayer)]:
        layer._modules = collections.OrderedDict(
            (re.sub(r"^(norm|relu|conv)(\d)$", r"\1.\2", k), v) for k, v in layer._modules.items()
        )
    _save(reference, tmp_path / "whole.pth", False)
    old = load_state_dict(tmp_path / "whole.pth")
    assert "features.denseblock2.denselayer2.norm.1.running_var" in old
    template = variables_template(DenseNet(**config, num_classes=3), 32)
    got, want = (
        torch_to_flax(weights, template, rename=legacy_key_rename)
        for weights in (old, load_state_dict(tmp_path / "state.pth"))
    )
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_whole_pickled_resnet_loads_as_its_state_dict_does(tmp_path):
    reference = tm.randomize_(tm.ResNet(*tm.RESNET_LAYOUT["resnet18"], num_classes=3))
    torch.save(reference, tmp_path / "whole.pth")
    torch.save(reference.state_dict(), tmp_path / "state.pth")
    got, want = (
        model_load.load("resnet18", weights=str(tmp_path / name), options={"num_classes": 3})
        for name in ("whole.pth", "state.pth")
    )
    jax.tree.map(np.testing.assert_array_equal, got.variables, want.variables)


class _Payload:
    """Would run a shell command when unpickled by an unrestricted unpickler."""

    def __init__(self, marker: Path):
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_payload_is_refused_and_never_runs(tmp_path):
    # The payload is real: a plain unpickler runs it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "pwned"
    payload = {"conv.weight": torch.ones(2), "evil": _Payload(marker)}
    paths = [
        _save(payload, tmp_path / "evil_zip.pth", True),
        _save(payload, tmp_path / "evil_legacy.pth", False),
        tmp_path / "evil_raw.pkl",
    ]
    paths[2].write_bytes(pickle.dumps(_Payload(marker)))
    for path in paths:
        with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|nt\.system") as info:
            load_state_dict(path)
        assert info.value.global_name.endswith(".system")
        assert not marker.exists(), path


def test_allowed_globals_are_only_tensor_plumbing():
    modules = {module for module, _ in torch_file.ALLOWED_GLOBALS}
    assert modules == {
        "argparse",
        "collections",
        "torch",
        "torch.cuda",
        "torch._tensor",
        "torch._utils",
        "torch.storage",
    }
    assert {name for module, name in torch_file.ALLOWED_GLOBALS if module == "argparse"} == {
        "Namespace"
    }
    assert ("collections", "OrderedDict") in torch_file.ALLOWED_GLOBALS
    assert ("builtins", "eval") not in torch_file.ALLOWED_GLOBALS


class _Storage:
    """Pickled as a persistent storage id by `_craft_zip`."""


def _craft_zip(path: Path, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    """A torch-style zip whose one tensor claims `size`/`stride` over a 4-element storage."""
    storage = _Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", torch.FloatStorage, "0", "cpu", 4)
            return None

    buffer = io.BytesIO()
    args = (storage, 0, size, stride, False, collections.OrderedDict())
    Pickler(buffer, protocol=2).dump({"w": _Reduce(torch._utils._rebuild_tensor_v2, args)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes())


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_tensor_reading_past_its_storage_is_rejected(tmp_path):
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    _craft_zip(good, (2, 2), (1, 2))
    np.testing.assert_array_equal(load_state_dict(good)["w"], [[0, 2], [1, 3]])
    _craft_zip(bad, (1000,), (1,))
    with pytest.raises(CheckpointError, match="past its storage"):
        load_state_dict(bad)
    # Zero strides repeat the storage: a small expansion loads, 2**31 floats do not.
    _craft_zip(good, (3, 4), (0, 1))
    np.testing.assert_array_equal(load_state_dict(good)["w"], [[0, 1, 2, 3]] * 3)
    _craft_zip(bad, (2**31,), (0,))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"size \(2147483648,\), stride \(0,\) would take"):
        load_state_dict(bad)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**16  # KiB: < 64 MiB


def test_a_crafted_pickle_that_breaks_a_stand_in_is_one_error(tmp_path):
    """BUILD on torch.FloatStorage's stand-in renames its dtype: a CheckpointError naming
    the file, not a KeyError from inside the reader."""

    def u(text: str) -> bytes:
        return b"X" + len(text).to_bytes(4, "little") + text.encode()

    payload = (
        b"\x80\x02}"
        + u("w")
        + b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + u("storage")
        + b"ctorch\nFloatStorage\n}"
        + u("name")
        + u("Nope")
        + b"sb"
        + u("0")
        + u("cpu")
        + b"K\x04tQK\x00K\x04\x85K\x01\x85\x89)tRs."
    )
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", bytes(16))
    with pytest.raises(CheckpointError, match=r"crafted.pth: not a state dict this reader takes"):
        load_state_dict(path)


def test_a_crafted_pickle_cannot_change_the_reader_for_later_loads(tmp_path):
    """BUILD on an allowed function (setting its `__defaults__`) is refused; it would
    otherwise break every later load in the process."""

    def u(text: str) -> bytes:
        return b"X" + len(text).to_bytes(4, "little") + text.encode()

    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}" + u("__defaults__") + b")s\x86b0}."
    crafted = tmp_path / "crafted.pth"
    with zipfile.ZipFile(crafted, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
    defaults = torch_tensors.rebuild_tensor_v2.__defaults__
    with pytest.raises(CheckpointError, match=r"crafted.pth: .*state of _rebuild_tensor_v2"):
        load_state_dict(crafted)
    assert torch_tensors.rebuild_tensor_v2.__defaults__ == defaults
    good = _save({"w": torch.ones(2)}, tmp_path / "good.pth", True)
    np.testing.assert_array_equal(load_state_dict(good)["w"], [1, 1])


@pytest.mark.parametrize("tail", [b"abc", bytes(600)])
@FORMATS
def test_protocol_5_out_of_band_data_is_refused_before_the_unpickler_sees_it(
    tmp_path, capfd, zip_format, tail
):
    """A BYTEARRAY8 declaring a terabyte (one damaged byte can make one): refused in one
    line naming the opcode, without CPython's unpickler trying to allocate it or printing
    "SystemError: deallocated bytearray object has exported buffers"."""
    payload = b"\x80\x02]\x96" + struct.pack("<Q", 10**12) + tail
    path = tmp_path / "damaged.pth"
    if zip_format:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
            archive.writestr("archive/byteorder", "little")
    else:
        path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=f"^{path}: .*opcode BYTEARRAY8 at byte 3 "):
        load_state_dict(path)
    assert "SystemError" not in capfd.readouterr().err


def test_not_a_weight_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"hello, world")
    with pytest.raises(CheckpointError):
        load_state_dict(path)


def test_mismatched_keys_list_both_sides(tmp_path):
    state = ref.EfficientNetLite0(num_classes=4).state_dict()
    path = _save(state, tmp_path / "lite.pth", True)
    with pytest.raises(WeightMappingError) as info:
        convert("googlenet", path, tmp_path / "out", num_classes=4)
    # One line: a few names of each side (sorted) and how many there are, then the advice.
    message = str(info.value)
    assert "\n" not in message
    torch_side = re.search(
        r"checkpoint keys with no model variable \((\d+)\): \[([^]]*)\]", message
    )
    model_side = re.search(
        r"model variables with no checkpoint key \((\d+)\): \[([^]]*)\]", message
    )
    assert int(torch_side[1]) > 5 and torch_side[2].startswith("'_blocks.0.")  # torch side
    assert int(model_side[1]) > 5 and "'batch_stats/conv1/bn/mean'" in model_side[2]  # model side
    assert torch_side[2].endswith(", ...") and torch_side[2].count("'") == 10
    assert message.endswith("check the architecture and num_classes, or strip a wrapper prefix "
                            "(e.g. 'module.')")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_orbax_round_trip(tmp_path):
    variables = {
        "params": {"fc": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
        "batch_stats": {"bn": {"mean": np.ones(3, np.float32)}},
    }
    meta = {"arch": "alexnet", "num_classes": 3, "options": {"width": 0.5}}
    save_variables(tmp_path / "ckpt", variables, meta)
    restored, restored_meta = load_variables(tmp_path / "ckpt")
    np.testing.assert_array_equal(
        restored["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"]
    )
    np.testing.assert_array_equal(
        restored["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"]
    )
    assert {k: restored_meta[k] for k in meta} == meta
    with pytest.raises(FileExistsError):
        save_variables(tmp_path / "ckpt", variables, meta)
    save_variables(tmp_path / "ckpt", variables, {**meta, "num_classes": 4}, force=True)
    assert load_variables(tmp_path / "ckpt")[1]["num_classes"] == 4


def test_a_damaged_converted_checkpoint_is_one_line_naming_it(tmp_path):
    variables = {"params": {"fc": {"kernel": np.ones((2, 3), np.float32)}}}
    meta = {"arch": "alexnet", "num_classes": 3}
    save_variables(tmp_path / "ok", variables, meta)
    damaged = {
        "garbled": lambda d: (d / "variables" / "_METADATA").write_text("{not json"),
        "no_variables": lambda d: shutil.rmtree(d / "variables"),
    }
    for name, damage in damaged.items():
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        damage(tmp_path / name)
        with pytest.raises(CheckpointError, match=f"^{tmp_path / name}: not a readable converted "
                           "checkpoint .*convert the weights again") as info:  # fmt: skip
            load_variables(tmp_path / name)
        assert "\n" not in str(info.value)
    (tmp_path / "ok" / "meta.json").write_text(json.dumps({**meta, "options": [1]}))
    with pytest.raises(CheckpointError, match="'options' are not a JSON object"):
        read_meta(tmp_path / "ok")


def test_converted_variables_changed_on_disk_are_refused(tmp_path, monkeypatch):
    """Orbax's array files carry no checksum: bytes changed in them can read back as other
    weights (ad hoc, 14 of 300 damaged copies did). meta.json records the variables'
    fingerprint, and a load that reads other numbers is refused, naming the folder; a
    conversion from before that field loads as it did."""
    import orbax.checkpoint as ocp

    variables = {"params": {"fc": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    save_variables(tmp_path / "ckpt", variables, {"arch": "alexnet", "num_classes": 3})
    restore = ocp.StandardCheckpointer.restore

    def one_weight_changed(self, *args, **kwargs):  # what such damage reads back
        tree = restore(self, *args, **kwargs)
        tree["params"]["fc"]["kernel"] = np.asarray(tree["params"]["fc"]["kernel"]) + 1
        return tree

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", one_weight_changed)
    with pytest.raises(CheckpointError) as info:
        load_variables(tmp_path / "ckpt")
    assert str(info.value).startswith(f"{tmp_path / 'ckpt'}: its variables are not those ")
    assert str(info.value).endswith("convert the weights again with models/convert.py")
    meta_path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta[convert_module.VARIABLES_FINGERPRINT]  # written by older code
    meta_path.write_text(json.dumps(meta))
    got, _ = load_variables(tmp_path / "ckpt")
    np.testing.assert_array_equal(got["params"]["fc"]["kernel"], np.arange(1, 7).reshape(2, 3))


@pytest.fixture(scope="module")
def convert_py():
    """models/convert.py's processes, forked from one that imported its modules once."""
    with ScriptProcesses(
        *("absl.app", "flax.linen", "orbax.checkpoint", "jaxdissect.models.load"),
        *("jaxdissect.models.zoo", "jaxdissect.models.checkpoint_io"),
    ) as processes:
        yield processes


def _cli(convert_py: ScriptProcesses, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return convert_py.run(REPO / "models" / "convert.py", *args, cwd=REPO, env=env, timeout=120)


def test_convert_cli_end_to_end(tmp_path, convert_py):
    torch.manual_seed(0)
    # torchvision GoogLeNet keys with aux heads, DataParallel prefix, Places-style wrapper,
    # legacy format: everything the CLI must see through.
    torch_model = ref.GoogLeNet(num_classes=5, aux_logits=True)
    ref.randomize_batch_norm(torch_model)
    state = {f"module.{k}": v for k, v in torch_model.state_dict().items()}
    source = _save(
        {"epoch": 1, "arch": "googlenet", "state_dict": state, "best_prec1": 1.0},
        tmp_path / "googlenet_places.pth.tar",
        False,
    )
    out = tmp_path / "converted"
    done = _cli(convert_py, "--arch", "googlenet", "--num_classes", "5", "--input", str(source),
                "--output", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    # orbax's per-checkpoint INFO lines (~40) are kept out of the log (cli.quiet_library_logs)
    assert not [line for line in done.stderr.splitlines() if line.startswith("I")], done.stderr
    variables, meta = load_variables(out)
    assert meta["arch"] == "googlenet" and meta["num_classes"] == 5
    assert meta["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    model = build_from_meta(meta)
    want = torch_to_flax(
        {k: v.numpy() for k, v in torch_model.state_dict().items()},
        variables_template(googlenet(num_classes=5)),
        rename=GoogLeNet.torch_rename,
    )
    np.testing.assert_array_equal(
        variables["params"]["inception4e"]["branch2"]["1"]["conv"]["kernel"],
        want["params"]["inception4e"]["branch2"]["1"]["conv"]["kernel"],
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["conv1"]["bn"]["var"], want["batch_stats"]["conv1"]["bn"]["var"]
    )
    assert isinstance(model, GoogLeNet) and model.num_classes == 5

    # Wrong class count: the error names the flags and lists both sides.
    failed = _cli(
        convert_py, "--arch", "googlenet", "--input", str(source), "--output", str(tmp_path / "x")
    )
    assert failed.returncode != 0
    assert "--arch googlenet --num_classes 1000" in failed.stderr
    assert "shape mismatch" in failed.stderr and "params/fc/kernel" in failed.stderr


def test_convert_cli_selection_flags_reach_the_reader(tmp_path, convert_py):
    """--entry, --prefix and --drop are `convert`'s parameters; a selection that names nothing
    is one line naming its flag."""
    state = {"backbone.fc.weight": torch.ones(2, 3), "head.weight": torch.ones(2, 2)}
    source = _save({"teacher": state, "student": state}, tmp_path / "checkpoint.pth", True)
    args = ["--arch", "resnet18", "--input", str(source), "--output", str(tmp_path / "out")]
    done = _cli(convert_py, *args, "--entry=teacher", "--prefix=backbone", "--drop=fc,head")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"convert: --drop='head': {source}: no key under the prefix is 'head' or starts with "
        "'head.'; they start with 'fc.' (1)"
    )


# --- integer / quantised weights, corrupt files --------------------------------------------


def test_integer_weights_are_refused_naming_the_tensor(tmp_path):
    template = {"params": {"fc": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(2)}}}
    state = {"fc.weight": np.ones((2, 3), np.int8), "fc.bias": np.zeros(2, np.float32)}
    with pytest.raises(WeightMappingError, match=r"fc\.weight is int8.*float model"):
        torch_to_flax(state, template)
    # From a file: safetensors keeps the int8 dtype; the model loader names --weights.
    path = tmp_path / "int8.safetensors"
    safetensors.numpy.save_file({"features.0.weight": np.ones((64, 3, 11, 11), np.int8)}, path)
    assert load_state_dict(path)["features.0.weight"].dtype == np.int8
    with pytest.raises(ValueError, match=r"--weights.*features\.0\.weight is int8"):
        model_load.load("alexnet", weights=str(path), options={"num_classes": 3})


def test_integer_leaves_of_an_orbax_checkpoint_are_refused(tmp_path):
    variables = {"params": {"fc": {"kernel": np.ones((2, 3), np.int8)}}}
    save_variables(tmp_path / "ckpt", variables, {"arch": "alexnet"})
    with pytest.raises(CheckpointError, match=r"params/fc/kernel is int8"):
        load_variables(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"^--weights: .*params/fc/kernel is int8"):
        model_load.load("alexnet", weights=str(tmp_path / "ckpt"))


@FORMATS
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch deprecates
def test_quantised_tensors_are_refused_naming_them(tmp_path, zip_format):
    state = collections.OrderedDict(
        fine=torch.ones(2),
        q=torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8),
        qc=torch.quantize_per_channel(
            torch.randn(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0, torch.quint8
        ),
    )
    path = _save(state, tmp_path / "q.pth", zip_format)
    with pytest.raises(CheckpointError, match=r"quantised tensor\(s\) q, qc\. Quantised") as info:
        load_state_dict(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


@pytest.mark.parametrize("cut", ["empty", "header", "body", "garbage"])
def test_corrupt_safetensors_is_one_line_naming_weights(tmp_path, cut):
    good = tmp_path / "good.safetensors"
    safetensors.numpy.save_file({"w": np.ones((4, 4), np.float32)}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(
        {
            "empty": b"",
            "header": data[:20],
            "body": data[:-10],
            "garbage": data[:8] + b"x" * (len(data) - 8),
        }[cut]
    )
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state_dict(bad)
    with pytest.raises(SystemExit) as info:
        cli.script_main(lambda: model_load.load("alexnet", weights=str(bad)))(["prog"])
    message = str(info.value)
    assert message.startswith(f"error: --weights: {bad}: not a readable .safetensors file")
    assert "copy or download it again" in message and "\n" not in message


# --- corrupt zips, wrapper layouts, the file named in every refusal ---------------------


def _zip_with_known_storage(tmp_path: Path) -> tuple[Path, bytes]:
    """A zip state dict whose one storage is 4096 ones: (path, the file's bytes)."""
    path = _save({"w": torch.ones(4096)}, tmp_path / "good.pth", True)
    return path, path.read_bytes()


@pytest.mark.parametrize("damage", ["crc", "half", "tail", "offset", "disks"])
def test_corrupt_or_truncated_zip_is_one_line_naming_the_file(tmp_path, damage):
    _, data = _zip_with_known_storage(tmp_path)
    end = data.rindex(b"PK\x05\x06")  # the end of central directory record
    if damage == "crc":  # bytes changed inside a storage record: its CRC-32 fails
        at = data.index(np.ones(16, "<f4").tobytes())
        data = data[:at] + b"\x00" * 16 + data[at + 16 :]
    elif damage == "offset":  # the directory's start moved on: entries' offsets < 0 (OSError)
        at = data.rindex(b"PK\x06\x06") + 48  # torch writes zip64 ends: its offset is read
        start = struct.unpack_from("<Q", data, at)[0] + 4096
        data = data[:at] + struct.pack("<Q", start) + data[at + 8 :]
    elif damage == "disks":  # a zip64 locator claiming 2 disks (zipfile.is_zipfile raised)
        data = data[:end] + b"PK\x06\x07" + struct.pack("<IQI", 0, 0, 2) + data[end:]
    else:  # the zip's directory (at its end) is missing
        data = data[: len(data) // 2] if damage == "half" else data[:-100]
    bad = tmp_path / "bad.pth"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError, match="truncated or corrupt: copy or download it again"):
        load_state_dict(bad)
    with pytest.raises(SystemExit) as info:
        cli.script_main(lambda: model_load.load("alexnet", weights=str(bad)))(["prog"])
    message = str(info.value)
    assert message.startswith(f"error: --weights: {bad}: ") and "\n" not in message


def test_truncated_legacy_file_says_so(tmp_path):
    data = _save({"w": torch.ones(4096)}, tmp_path / "good.pth", False).read_bytes()
    for cut in (len(data) // 2, 40):  # inside the storage's bytes; inside the pickles
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"^{bad}: .*truncated or corrupt: copy"):
            load_state_dict(bad)


@pytest.mark.parametrize("load", [load_state_dict, npz_file.load_npz])
def test_a_directory_missing_or_unopenable_path_is_named(tmp_path, load, monkeypatch):
    (tmp_path / "adir.pth").mkdir()
    with pytest.raises(CheckpointError, match=r"adir\.pth: is a directory, not a weight file$"):
        load(tmp_path / "adir.pth")
    with pytest.raises(CheckpointError, match=r"gone\.pth: no such file$"):
        load(tmp_path / "gone.pth")
    # A FIFO or a device: opening or reading it would block or never end.
    os.mkfifo(tmp_path / "pipe.pth")
    for special in (tmp_path / "pipe.pth", "/dev/zero"):
        with pytest.raises(CheckpointError, match=r": not a regular file \(a FIFO, socket or"):
            load(special)
    # A file this user may not read (root reads any: the refusal is simulated) is not
    # called damaged.
    locked = _save({"w": torch.ones(3)}, tmp_path / "locked.pth", True)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(weight_file, "open", denied, raising=False)
    with pytest.raises(
        CheckpointError,
        match=r"locked\.pth: cannot be opened \(Permission denied\); check that this user may read",
    ):
        load(locked)


@FORMATS
@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoints_with_arguments_load(tmp_path, zip_format, wrapper):
    """torchvision's reference scripts and DeiT keep the weights under 'model', and most
    training scripts save their argparse.Namespace beside them: read as data."""
    weight = torch.randn(4, 3)
    checkpoint = {
        wrapper: collections.OrderedDict([("module.fc.weight", weight)]),
        "epoch": 3,
        "args": argparse.Namespace(lr=0.1, arch="resnet18", milestones=[30, 60]),
    }
    path = _save(checkpoint, tmp_path / "checkpoint.pth", zip_format)
    loaded = load_state_dict(path)
    assert list(loaded) == ["fc.weight"]
    np.testing.assert_array_equal(loaded["fc.weight"], weight.numpy())
    args = load_checkpoint(path)["args"]
    assert isinstance(args, torch_file.Namespace)
    assert vars(args) == {"lr": 0.1, "arch": "resnet18", "milestones": [30, 60]}


def test_objects_beside_the_weights_are_inert_records_and_open_no_door_to_code(tmp_path, caplog):
    """A training checkpoint's config objects (a class of the script's, Hydra's, a payload
    in an argparse.Namespace) beside clean weights: the weights load, the objects stay
    records named in the log, and nothing of theirs runs; in the weights, refused."""
    marker = tmp_path / "pwned"
    checkpoint = {
        "state_dict": {"w": torch.ones(2)},
        "args": argparse.Namespace(x=_Payload(marker)),
        "hyper_parameters": {"loss": _Payload(marker), "config": collections.Counter(a=1)},
    }
    path = _save(checkpoint, tmp_path / "evil_args.pth", True)
    with caplog.at_level("INFO"):
        np.testing.assert_array_equal(load_state_dict(path)["w"], np.ones(2, np.float32))
    assert re.search(
        r"beside the weights, pickled (posix|nt)\.system, collections\.Counter", caplog.text
    )
    args = load_checkpoint(path)["args"]
    assert isinstance(args.x, torch_file.PickledObject) and "not run" in repr(args.x)
    assert not marker.exists()
    checkpoint["state_dict"]["evil"] = _Payload(marker)
    path = _save(checkpoint, tmp_path / "evil_weights.pth", True)
    with pytest.raises(UnsafeCheckpointError, match=r"global (posix|nt)\.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_weights_under_two_wrapper_keys_are_refused(tmp_path):
    state = {"fc.weight": torch.ones(2, 2)}
    path = _save({"state_dict": state, "model": state, "epoch": 1}, tmp_path / "two.pth", True)
    with pytest.raises(CheckpointError, match=r"several keys \['state_dict', 'model'\]"):
        load_state_dict(path)


def test_state_dicts_under_other_keys_are_named(tmp_path, caplog):
    """A self-supervised run's checkpoint (DINO's `student` and `teacher`, no wrapper key):
    refused in one line naming the state dicts it holds and how to read one; timm's
    `state_dict` beside `state_dict_ema`: the first is read, the other named in the log."""
    state = {"backbone.cls_token": torch.zeros(1, 1, 4), "head.weight": torch.ones(2, 4)}
    dino = {"student": state, "teacher": state, "epoch": 3, "optimizer": {"state": {}}}
    path = _save(dino, tmp_path / "checkpoint.pth", True)
    with pytest.raises(
        CheckpointError,
        match=r"^\S+checkpoint.pth: state dicts under 'student', 'teacher', none under .*"
        r"read one with models/convert.py --entry=teacher \(README: Self-supervised "
        r"checkpoints\)$",
    ):
        load_state_dict(path)
    timm = {"state_dict": state, "state_dict_ema": state, "epoch": 3}
    with caplog.at_level("INFO"):
        got = load_state_dict(_save(timm, tmp_path / "timm.pth", True))
    assert sorted(got) == sorted(state)
    assert "under 'state_dict' are read; beside them, state dicts under 'state_dict_ema'" in (
        caplog.text
    )


def _fc_template(*scope: str) -> dict:
    layer = {"fc": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    for name in reversed(scope):
        layer = {name: layer}
    return {"params": layer}


def test_lightning_model_prefix_is_stripped_where_the_keys_then_fit():
    state = {"model.fc.weight": np.ones((2, 3), np.float32), "model.fc.bias": np.ones(2)}
    got = torch_to_flax(state, _fc_template())
    np.testing.assert_array_equal(got["params"]["fc"]["kernel"], np.ones((3, 2)))
    # A model whose own module is called `model` keeps the prefix.
    got = torch_to_flax(state, _fc_template("model"))
    np.testing.assert_array_equal(got["params"]["model"]["fc"]["bias"], np.ones(2))


def test_two_keys_of_one_variable_are_refused_naming_both():
    """A renamed key beside the name it is renamed to (Hugging Face's ResNet stem beside
    torchvision's): neither is read silently over the other."""
    state = {"fc.weight": np.ones((2, 3), np.float32), "head.weight": np.zeros((2, 3))}
    with pytest.raises(WeightMappingError, match=r"^'fc.weight' and 'head.weight' both map to "
                       r"params/fc/kernel; save the state dict of one model only$"):  # fmt: skip
        torch_to_flax(state, _fc_template(), rename=lambda k: k.replace("head.", "fc."))


def test_a_converters_two_keys_of_one_name_are_refused():
    """The namings' converters (timm's and Hugging Face's to torchvision's) refuse a file
    holding both namings of one weight, as `RenamedKeys` does for any update."""
    from jaxdissect.models import convnext

    state = {"head.fc.weight": np.ones((2, 3)), "classifier.2.weight": np.zeros((2, 3))}
    with pytest.raises(WeightMappingError, match=r"^two checkpoint keys are both "
                       r"'classifier.2.weight' once renamed; save the state dict of one"):  # fmt: skip
        convnext.timm_to_torchvision(state)
    renamed = torch_import.RenamedKeys(a=1)
    with pytest.raises(WeightMappingError, match="both 'a' once renamed"):
        renamed.update({"b": 2}, a=3)


def test_torch_compile_prefix_is_stripped(tmp_path):
    """`torch.compile(model).state_dict()` names each key `_orig_mod.<key>`: such a file
    loads as the model's own, with the same weights."""
    reference = tm.randomize_(tm.ResNet(*tm.RESNET_LAYOUT["resnet18"], num_classes=3))
    # Not run (its state dict is what matters): no backend's compiler is needed.
    compiled = torch.compile(reference, backend="eager")
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    torch.save(compiled.state_dict(), tmp_path / "compiled.pth")
    torch.save(reference.state_dict(), tmp_path / "plain.pth")
    # torch.compile(DDP(model)) nests the prefixes the other way round.
    nested = {f"_orig_mod.module.{k}": v for k, v in reference.state_dict().items()}
    torch.save(nested, tmp_path / "compiled_ddp.pth")
    got, nested, want = (
        model_load.load("resnet18", weights=str(tmp_path / name), options={"num_classes": 3})
        for name in ("compiled.pth", "compiled_ddp.pth", "plain.pth")
    )
    jax.tree.map(np.testing.assert_array_equal, got.variables, want.variables)
    jax.tree.map(np.testing.assert_array_equal, nested.variables, want.variables)


def test_places365_alexnets_data_parallel_features_load(tmp_path):
    """The Places365 AlexNet file (trained by the PyTorch ImageNet example, which wraps
    AlexNet's `features` alone in DataParallel) keys `features.module.0.weight` under
    `state_dict`, beside `module.`-free classifier keys: it loads as the plain state dict,
    with DDP's `module.` before it as well."""
    reference = tm.randomize_(tm.AlexNet(num_classes=3, width=0.25))
    plain = reference.state_dict()
    inner = {re.sub(r"^features\.", "features.module.", k): v for k, v in plain.items()}
    assert "features.module.0.weight" in inner and "classifier.1.weight" in inner
    torch.save(plain, tmp_path / "plain.pth")
    torch.save({"epoch": 90, "arch": "alexnet", "state_dict": inner}, tmp_path / "places.pth.tar")
    torch.save({f"module.{k}": v for k, v in inner.items()}, tmp_path / "both.pth")
    options = {"num_classes": 3, "width": 0.25}
    want = model_load.load("alexnet", weights=str(tmp_path / "plain.pth"), options=options)
    for name in ("places.pth.tar", "both.pth"):
        got = model_load.load("alexnet", weights=str(tmp_path / name), options=options)
        jax.tree.map(np.testing.assert_array_equal, got.variables, want.variables)


def test_lightning_checkpoint_converts(tmp_path):
    model = ref.EfficientNetLite0(num_classes=4)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    source = _save({"state_dict": state, "epoch": 1, "global_step": 10}, tmp_path / "l.ckpt", True)
    meta = convert("efficientnet_lite0", source, tmp_path / "out", num_classes=4)
    assert meta["num_classes"] == 4 and (tmp_path / "out" / "meta.json").exists()


def test_unsafe_refusals_name_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = _save({"w": _Payload(marker)}, tmp_path / "evil.pth", True)
    with pytest.raises(SystemExit) as info:
        cli.script_main(lambda: model_load.load("alexnet", weights=str(path)))(["prog"])
    message = str(info.value)
    assert message.startswith(f"error: --weights: {path}: refusing to load global ")
    assert "\n" not in message and not marker.exists()


def test_mismatch_errors_are_one_line_naming_the_scripts_flags(tmp_path):
    """dissect.py's flag is --model (not convert.py's --arch); shape errors list a few."""
    template = variables_template(googlenet(num_classes=5))
    state = {
        "conv1.conv.weight": np.zeros((64, 3, 7, 7), np.float32),
        **{f"extra{i}.weight": np.zeros((2, 2), np.float32) for i in range(9)},
    }
    with pytest.raises(WeightMappingError) as info:
        torch_to_flax(state, template)
    message = str(info.value)
    assert "\n" not in message and "--arch" not in message
    assert "checkpoint keys with no model variable (9): ['extra0.weight', " in message
    assert message.count("extra") == 5
    # Many shapes that differ: the first three and the count, on one line.
    wide = {p: np.zeros(np.shape(a)[:-1] + (np.shape(a)[-1] + 1,), np.float32)
            for p, a in traverse_util.flatten_dict(template).items()}  # fmt: skip
    with pytest.raises(WeightMappingError) as info:
        torch_import.fit_variables(
            wide, template, source_keys={}, unmatched=[], advice=""
        )  # fmt: skip
    message = str(info.value)
    assert message.startswith("shape mismatch: ") and "\n" not in message
    assert message.count(" vs model ") == 3 and message.endswith(f"({len(wide)} in all)")
    # Through the loader: --weights and --model named, never --arch.
    path = tmp_path / "w.safetensors"
    safetensors.numpy.save_file(dict(state), path)
    with pytest.raises(ValueError) as info:
        model_load.load("googlenet", weights=str(path), options={"num_classes": 5})
    message = str(info.value)
    assert message.startswith(f"--weights={path} does not fit --model=googlenet: ")
    assert "check --model and --num_classes" in message
    assert "--arch" not in message and "\n" not in message


# --- convert.py --force and its paths -----------------------------------------------------


_VARIABLES = {"params": {"fc": {"kernel": np.ones((2, 3), np.float32)}}}
_META = {"arch": "alexnet", "num_classes": 3}


def test_force_replaces_only_an_earlier_conversion(tmp_path):
    # A directory holding other files: refused with --force, nothing deleted.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("keep me")
    with pytest.raises(
        FileExistsError, match=r"holds files a conversion does not write \(important"
    ):
        save_variables(victim, _VARIABLES, _META, force=True)
    assert (victim / "important.txt").read_text() == "keep me"
    # An existing file: refused, kept.
    afile = tmp_path / "r18.pth"
    afile.write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="is a file, not a converted checkpoint directory"):
        save_variables(afile, _VARIABLES, _META, force=True)
    assert afile.read_bytes() == b"weights"
    # The directory holding the input: refused before anything is read or deleted.
    home = tmp_path / "v2"
    home.mkdir()
    (home / "model.pth").write_bytes(b"the input")
    for output in (home, home / "model.pth"):
        with pytest.raises(FileExistsError, match="is or holds the input"):
            convert("alexnet", home / "model.pth", output, num_classes=3, force=True)
    assert (home / "model.pth").read_bytes() == b"the input"
    # An earlier conversion (or an empty directory) is replaced.
    (tmp_path / "empty").mkdir()
    for output in (tmp_path / "empty", tmp_path / "empty"):
        save_variables(output, _VARIABLES, _META, force=True)
    assert sorted(os.listdir(tmp_path / "empty")) == ["meta.json", "variables"]
    # A name that only starts like a conversion's is no conversion's: refused, kept.
    (tmp_path / "empty" / "variables_notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"does not write \(variables_notes.txt\)"):
        save_variables(tmp_path / "empty", _VARIABLES, _META, force=True)
    (tmp_path / "empty" / "variables_notes.txt").unlink()
    # A replacement that fails leaves the old checkpoint whole and no staging folder.
    before = read_meta(tmp_path / "empty")
    with pytest.raises(ValueError, match="Unsupported data type"):  # orbax's, mid-write
        save_variables(tmp_path / "empty", {"params": object()}, _META, force=True)
    assert read_meta(tmp_path / "empty") == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_convert_cli_refuses_bad_paths_in_one_line(tmp_path, convert_py):
    home = tmp_path / "v2"
    home.mkdir()
    source = _save({"fc.weight": torch.ones(2, 2)}, home / "model.pth", True)
    (home / "other.pth").write_bytes(b"other")
    (tmp_path / "adir.pth").mkdir()
    cases = {
        "holds the input": ["--input", str(source), "--output", str(home), "--force"],
        "is a directory, not a weight file": [
            "--input", str(tmp_path / "adir.pth"), "--output", str(tmp_path / "out")
        ],
        "is or holds the input": ["--input", str(source), "--output", str(source), "--force"],
    }  # fmt: skip
    for reason, args in cases.items():
        done = _cli(convert_py, "--arch", "alexnet", "--num_classes", "3", *args)
        assert done.returncode == 1, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("convert: --") and reason in last, done.stderr
        assert "Traceback" not in done.stderr
    assert sorted(os.listdir(home)) == ["model.pth", "other.pth"]


def test_convert_cli_checks_options_and_output_before_reading_the_input(tmp_path, convert_py):
    """An option the architecture does not take or of another type, --num_classes below 0
    (1 for architectures that need a head) and an --output under a file are one line naming the flag, before the input is read
    (the input here does not exist; they were a TypeError or found after reading it)."""
    (tmp_path / "afile").write_text("")
    cases = {
        ("--option", "foo=1"): "convert: --option foo: resnet18 takes width, ",
        ("--option", "width=abc"): "convert: --option width='abc': resnet18 takes width as",
        ("--num_classes=-1",): "convert: --num_classes=-1: must be a whole number >= 0",
        ("--output", str(tmp_path / "afile" / "x")): "afile is a file, not a directory",
    }
    for extra, message in cases.items():
        args = ["--arch", "resnet18", "--input", str(tmp_path / "missing.pth")]
        done = _cli(convert_py, *args, "--output", str(tmp_path / "out"), *extra)
        assert done.returncode == 1, done.stderr
        assert message in done.stderr.strip().splitlines()[-1], done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


# --- hostile files: one memory budget, shapes numpy cannot make, zip members (review T) ---


def _craft_tensors(
    path: Path,
    tensors: dict,
    numel: int = 4,
    *,
    method: int = zipfile.ZIP_STORED,
    pkl_method: int = zipfile.ZIP_STORED,
) -> None:
    """A torch-style zip of `tensors` (key -> `_Reduce` or (size, stride)) over one storage."""
    storage = _Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    def tensor(size, stride):
        args = (storage, 0, size, stride, False, collections.OrderedDict())
        return _Reduce(torch._utils._rebuild_tensor_v2, args)

    obj = {k: tensor(*v) if isinstance(v, tuple) else v(tensor) for k, v in tensors.items()}
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo("archive/data.pkl"), buffer.getvalue(), pkl_method)
        archive.writestr("archive/byteorder", "little")
        data = np.arange(numel, dtype="<f4").tobytes()
        archive.writestr(zipfile.ZipInfo("archive/data/0"), data, method)


def _declare_size(path: Path, member: str, size: int) -> None:
    """Make the zip directory entry of `member` declare `size` unpacked bytes (a bomb's lie)."""
    data = bytearray(path.read_bytes())
    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        (name_len,) = struct.unpack("<H", data[at + 28 : at + 30])
        if data[at + 46 : at + 46 + name_len] == member.encode():
            data[at + 24 : at + 28] = struct.pack("<I", size)
            break
        at += 4
    path.write_bytes(bytes(data))


def test_one_memory_budget_for_the_whole_file(tmp_path, monkeypatch):
    """Expanded tensors count by the bytes they make, summed over the file; a tensor the
    pickle names several times, or views of the same elements (tied weights), are cut
    once, as torch shares them."""
    monkeypatch.setattr(weight_file, "_BUDGET_EXTRA_BYTES", 2**16)

    def wide(i):  # ~16 KiB out of one float, each view its own size
        return ((2**12 - i,), (0,))

    path = tmp_path / "w.pth"
    _craft_tensors(path, {f"w{i}": wide(i) for i in range(3)}, numel=1)
    assert sum(v.nbytes for v in load_state_dict(path).values()) == 4 * (3 * 2**12 - 3)
    _craft_tensors(path, {f"w{i}": wide(i) for i in range(5)}, numel=1)
    with pytest.raises(
        CheckpointError,
        match=r"^\S*w.pth: tensor of size \(\d+,\), stride "
        r"\(0,\) would take the memory .* crafted or corrupt",
    ):
        load_state_dict(path)
    _craft_tensors(path, {f"w{i}": wide(0) for i in range(5)}, numel=1)  # tied: one view
    tied = load_state_dict(path)
    assert all(v is tied["w0"] for v in tied.values()) and tied["w0"].shape == (2**12,)

    def shared(tensor):
        one = tensor(*wide(0))
        return [one] * 5

    _craft_tensors(path, {"w": shared}, numel=1)
    got = load_checkpoint(path)["w"]
    assert all(a is got[0] for a in got) and got[0].shape == (2**12,)


def test_zip_members_are_checked_before_they_are_read(tmp_path):
    path = tmp_path / "w.pth"
    _craft_tensors(path, {"w": ((4,), (1,))}, method=zipfile.ZIP_DEFLATED)
    np.testing.assert_array_equal(load_state_dict(path)["w"], np.arange(4))  # deflate is read
    for member in ("archive/data/0", "archive/data.pkl"):
        _craft_tensors(path, {"w": ((4,), (1,))}, method=zipfile.ZIP_DEFLATED,
                       pkl_method=zipfile.ZIP_DEFLATED)  # fmt: skip
        _declare_size(path, member, 2**32 - 1)  # a bomb: 4 GiB from a few bytes
        with pytest.raises(CheckpointError, match=f"member {member} .4294967295 bytes unpacked"):
            load_state_dict(path)
    _craft_tensors(path, {"w": ((4,), (1,))}, method=zipfile.ZIP_BZIP2)
    with pytest.raises(CheckpointError, match="archive/data/0 is compressed with zip method 12"):
        load_state_dict(path)
    _craft_tensors(path, {"w": ((4,), (1,))}, numel=2, method=zipfile.ZIP_DEFLATED)
    _declare_size(path, "archive/data/0", 16)  # the size, not the bytes, is compared
    with pytest.raises(CheckpointError, match=r"storage 0: 16 bytes for 2 elements"):
        load_state_dict(path)


def _legacy_file(path: Path, numel: int) -> None:
    """A legacy torch file whose one storage declares `numel` floats and holds 16 bytes."""
    storage = _Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", torch.FloatStorage, "0", "cpu", numel, None)
            return None

    buffer = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, buffer, protocol=2)
    args = (storage, 0, (1,), (1,), False, collections.OrderedDict())
    Pickler(buffer, protocol=2).dump({"w": _Reduce(torch._utils._rebuild_tensor_v2, args)})
    pickle.dump(["0"], buffer, protocol=2)
    buffer.write(struct.pack("<q", numel) + bytes(16))
    path.write_bytes(buffer.getvalue())


def test_legacy_storage_larger_than_the_file_is_refused_unread(tmp_path):
    path = tmp_path / "w.pth"
    _legacy_file(path, 4)
    assert load_state_dict(path)["w"].shape == (1,)
    for numel in (2**40, 2**62):
        _legacy_file(path, numel)
        with pytest.raises(CheckpointError, match=r"w.pth: ends inside storage 0; .* again$"):
            load_state_dict(path)


def _npy(shape: tuple, descr: object = "<f4", data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


NPZ_CASES = {
    "truncated": ({"a.npy": _npy((100,), data=bytes(40))}, r"\(400 bytes\) but holds 40 bytes"),
    "shape 2**40": ({"a.npy": _npy((2**40,))}, r"declares shape \(1099511627776,\)"),
    "shape 2**62": ({"a.npy": _npy((2**62,))}, r"too large for any array"),
    "zero beside huge": ({"a.npy": _npy((0, 2**62, 4))}, r"too large for any array"),
    "rank 40": ({"a.npy": _npy((1,) * 40, data=bytes(4))}, r"40 dimensions"),
    "records": ({"a.npy": _npy((1,), [("x", "<f4")], bytes(4))}, r"records of dtype"),
    "objects": ({"a.npy": _npy((1,), "|O", bytes(8))}, r"holds pickled objects"),
    "bad header": ({"a.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': 'x'}   \n"}, "no readable"),
    # An unclosed bracket: numpy's header parser raised tokenize.TokenError.
    "open header": ({"a.npy": b"\x93NUMPY\x01\x00\x0e\x00{'shape': (1, \n"}, "no readable"),
    "text member": ({"a.npy": _npy((1,), data=bytes(4)), "notes.txt": b"hi"}, r"notes.txt is not"),
    "torch file": ({"archive/data.pkl": b"."}, r"torch.save file: name it .pth"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_bad_npz_is_one_accurate_line_before_np_load(tmp_path, case):
    members, message = NPZ_CASES[case]
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=message) as info:
        npz_file.load_npz(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    if case != "objects":
        assert "pickled" not in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**16  # KiB


def test_npz_members_are_checked_before_np_load(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float64)}
    np.savez_compressed(tmp_path / "ok.npz", **arrays)
    got = npz_file.load_npz(tmp_path / "ok.npz")
    assert got.keys() == arrays.keys()
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr(zipfile.ZipInfo("a.npy"), _npy((4,), data=bytes(16)), zipfile.ZIP_BZIP2)
    with pytest.raises(CheckpointError, match="a.npy is compressed with zip method 12"):
        npz_file.load_npz(bomb)
    np.save(tmp_path / "one.npy", np.ones(2))
    os.replace(tmp_path / "one.npy", tmp_path / "one.npz")
    with pytest.raises(CheckpointError, match=r"one.npz: holds one array \(np.save\)"):
        npz_file.load_npz(tmp_path / "one.npz")
    (tmp_path / "text.npz").write_text("hello, world")
    with pytest.raises(CheckpointError, match=r"text.npz: not a readable .npz file \(not a zip\)"):
        npz_file.load_npz(tmp_path / "text.npz")


def test_shapes_numpy_cannot_make_are_one_line(tmp_path):
    path = tmp_path / "w.pth"
    # The stride of a dim of size 1 steps nowhere: even a huge one loads.
    _craft_zip(path, (1, 2), (2**70, 1))
    np.testing.assert_array_equal(load_state_dict(path)["w"], [[0, 1]])
    _craft_zip(path, (1,), (2**62,))
    np.testing.assert_array_equal(load_state_dict(path)["w"], [0])
    for size, message in [
        ((0, 2**62), r"of shape \(0, 4611686018427387904\) is too large for any array"),
        ((0, 2**40, 2**40), "too large for any array"),
        ((1,) * 65, "has 65 dimensions, more than the 32"),
        ((0,) + (1,) * 64, "has 65 dimensions"),
    ]:
        _craft_zip(path, size, (1,) * len(size))
        with pytest.raises(CheckpointError, match=message) as info:
            load_state_dict(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("dtype,nbytes", [("F8_E4M3", 2), ("F8_E5M2", 2), ("F4", 1)])
def test_safetensors_of_a_dtype_numpy_lacks_names_it(tmp_path, dtype, nbytes):
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "w": {"dtype": dtype, "shape": [2], "data_offsets": [4, 4 + nbytes]},
    }
    path = _safetensors(tmp_path / "fp8.safetensors", header, bytes(4 + nbytes))
    with pytest.raises(CheckpointError, match=f"cannot hold: {dtype} \\(w\\). Save the weights as"):
        load_state_dict(path)
    with pytest.raises(SystemExit) as info:
        cli.script_main(lambda: model_load.load("alexnet", weights=str(path)))(["prog"])
    assert str(info.value).startswith(f"error: --weights: {path}: tensors of a dtype")


def _zip_flags(
    data: bytes,
    *,
    method: int | None = None,
    encrypted: bool = False,
    version: int | None = None,
) -> bytes:
    """`data` (a zip) with every entry's method, encryption flag or version needed changed."""
    out = bytearray(data)
    for signature, method_at, flags_at, version_at in (
        (b"PK\x03\x04", 8, 6, 4),
        (b"PK\x01\x02", 10, 8, 6),
    ):
        at = out.find(signature)
        while at != -1:
            if method is not None:
                out[at + method_at : at + method_at + 2] = struct.pack("<H", method)
            if encrypted:
                out[at + flags_at] |= 1
            if version is not None:
                out[at + version_at : at + version_at + 2] = struct.pack("<H", version)
            at = out.find(signature, at + 4)
    return bytes(out)


def test_unsupported_zip_methods_and_encryption_are_one_line(tmp_path):
    data = _save({"w": torch.ones(2)}, tmp_path / "good.pth", True).read_bytes()
    for name, changed, message in [
        ("m99.pth", _zip_flags(data, method=99), "compressed with zip method 99"),
        ("locked.pth", _zip_flags(data, encrypted=True), "is encrypted; save the file again"),
    ]:
        path = tmp_path / name
        path.write_bytes(changed)
        with pytest.raises(CheckpointError, match=message) as info:
            load_state_dict(path)
        assert str(info.value).startswith(f"{path}: ")
        with pytest.raises(SystemExit) as info:
            cli.script_main(lambda path=path: model_load.load("alexnet", weights=str(path)))(["p"])
        assert str(info.value).startswith(f"error: --weights: {path}: ")
        assert "\n" not in str(info.value)


def test_a_zip_version_zipfile_cannot_read_is_one_line(tmp_path):
    """Entries that need zip version 9.8: zipfile raised NotImplementedError."""
    np.savez(tmp_path / "good.npz", w=np.ones(2, np.float32))
    for good, load in [
        (_save({"w": torch.ones(2)}, tmp_path / "good.pth", True), load_state_dict),
        (tmp_path / "good.npz", npz_file.load_npz),
    ]:
        path = good.with_name("v98" + good.suffix)
        path.write_bytes(_zip_flags(good.read_bytes(), version=98))
        with pytest.raises(CheckpointError, match="zip file version 9.8") as info:
            load(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
        assert "truncated or corrupt: copy or download it again" in str(info.value)


def test_a_key_both_with_and_without_module_prefix_is_refused(tmp_path):
    state = {"module.fc.weight": torch.ones(2, 2), "fc.weight": torch.zeros(2, 2)}
    path = _save(state, tmp_path / "both.pth", True)
    with pytest.raises(CheckpointError, match=r"both.pth: holds both 'module.fc.weight' and "
                       r"'fc.weight'"):  # fmt: skip
        load_state_dict(path)
    path = _save({"module.fc.weight": torch.ones(2, 2)}, tmp_path / "one.pth", True)
    assert list(load_state_dict(path)) == ["fc.weight"]
