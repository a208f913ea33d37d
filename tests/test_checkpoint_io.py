"""Weight files written by real torch.save / safetensors, read back without torch: formats,
whole pickled models, wrappers and prefixes, refusals that name the file."""

from __future__ import annotations

import argparse
import collections
import os
import re
import struct
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util

from jaxdissect import cli
from jaxdissect.models import load as model_load
from jaxdissect.models import npz_file, torch_file, torch_import, weight_file
from jaxdissect.models.checkpoint_io import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_state_dict,
)
from jaxdissect.models.convert import (
    variables_template,
)
from jaxdissect.models.densenet import DenseNet, legacy_key_rename
from jaxdissect.models.googlenet import googlenet
from jaxdissect.models.torch_import import WeightMappingError, torch_to_flax
from tests import torch_models as tm
from tests.model_testing import torchscript_save
from tests.weights_testing import FORMATS, Payload, save_torch

REPO = Path(__file__).resolve().parents[1]


def _torch_value(t: torch.Tensor) -> np.ndarray:
    t = t.resolve_conj().resolve_neg()
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
        # Lazy views whose elements are stored conjugated or negated (metadata's bits).
        conjugate=torch.randn(3, dtype=torch.complex64, generator=gen).conj(),
        negative=torch.randn(2, 3, dtype=torch.complex64, generator=gen).conj().imag,
    )


@FORMATS
def test_state_dict_matches_torch(tmp_path, zip_format):
    state = _tricky_state_dict()
    loaded = load_state_dict(save_torch(state, tmp_path / "w.pth", zip_format))
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
    assert state["negative"].is_neg() and state["conjugate"].is_conj()


@FORMATS
def test_parameters_load_as_arrays(tmp_path, zip_format):
    layer = torch.nn.Linear(3, 2)
    loaded = load_state_dict(
        save_torch(layer.state_dict(keep_vars=True), tmp_path / "p.pt", zip_format)
    )
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
    path = save_torch(checkpoint, tmp_path / "resnet18_places365.pth.tar", zip_format)
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
    model.evil = Payload(ran)  # an attribute that would run a command when unpickled
    want = collections.OrderedDict((k, v.numpy()) for k, v in model.state_dict().items())
    assert "again.weight" in want and "scratch" not in want and "conv.bias" not in want
    files = {
        "model": save_torch(model, tmp_path / "whole.pth", zip_format),
        "wrapped": save_torch({"model": model, "epoch": 3}, tmp_path / "wrapped.pth", zip_format),
        "parallel": save_torch(torch.nn.DataParallel(model), tmp_path / "dp.pth", zip_format),
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
    got = load_state_dict(
        save_torch({"w": tagged, "b": torch.ones(2)}, tmp_path / "t.pth", zip_format)
    )
    np.testing.assert_array_equal(got["w"], tagged.numpy())
    whole = load_state_dict(save_torch(norm, tmp_path / "whole.pth", zip_format))
    np.testing.assert_array_equal(whole["running_mean"], norm.running_mean.numpy())
    assert list(whole) == list(norm.state_dict())

    imported = tmp_path / "imported"
    (tmp_path / "marking_tensor.py").write_text(_MARKING_TENSOR)
    monkeypatch.setenv("JAXDISSECT_TEST_IMPORTED", str(imported))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("marking_tensor", None)
    import marking_tensor

    path = save_torch(
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
        path = save_torch(model, tmp_path / "crafted.pth", True)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}"):
            load_state_dict(path)


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
    save_torch(reference, tmp_path / "whole.pth", False)
    old = load_state_dict(tmp_path / "whole.pth")
    assert "features.denseblock2.denselayer2.norm.1.running_var" in old
    template = variables_template(DenseNet(**config, num_classes=3), 32)
    got, want = (
        torch_to_flax(weights, template, rename=legacy_key_rename)
        for weights in (old, load_state_dict(tmp_path / "state.pth"))
    )
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_whole_pickled_resnet_loads_as_its_state_dict_does(tmp_path, caplog):
    """... and one whose convolutions are dilated (a dilated ResNet: its weights fit, its
    numbers are another network's) says so, naming them."""
    reference = tm.randomize_(tm.ResNet(*tm.RESNET_LAYOUT["resnet18"], num_classes=3))
    torch.save(reference, tmp_path / "whole.pth")
    torch.save(reference.state_dict(), tmp_path / "state.pth")
    with caplog.at_level("WARNING"):
        got, want = (
            model_load.load("resnet18", weights=str(tmp_path / name), options={"num_classes": 3})
            for name in ("whole.pth", "state.pth")
        )
    jax.tree.map(np.testing.assert_array_equal, got.variables, want.variables)
    assert "dilates" not in caplog.text
    for conv in (reference.layer4[0].conv2, reference.layer4[1].conv2):
        conv.dilation, conv.padding = (2, 2), (2, 2)
    torch.save(reference, tmp_path / "dilated.pth")
    with caplog.at_level("WARNING"):
        load_state_dict(tmp_path / "dilated.pth")
    assert "dilates 2 convolutions (layer4.0.conv2 (2, 2), layer4.1.conv2 (2, 2)), which" in (
        caplog.text
    )


def test_not_a_weight_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"hello, world")
    with pytest.raises(CheckpointError):
        load_state_dict(path)


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
    path = save_torch(state, tmp_path / "q.pth", zip_format)
    with pytest.raises(CheckpointError, match=r"quantised tensor\(s\) q, qc\. Quantised") as info:
        load_state_dict(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


@FORMATS
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")  # torch's beta
@pytest.mark.filterwarnings("ignore:ComplexHalf support:UserWarning")
def test_sparse_meta_and_float8_tensors_are_refused_naming_them_and_what_to_save(
    tmp_path, zip_format
):
    """Tensors this reader does not make: named with what to save instead, not refused as a
    global that "could run code" (sparse, meta) or by the reader's own stand-in class
    (float8, complex32)."""
    cases = {
        r"sparse tensor\(s\) w\. Sparse weights are not read: save them dense": torch.eye(
            2
        ).to_sparse(),
        r"sparse tensor\(s\) w\. Sparse": torch.eye(2).to_sparse_csr(),
        r"meta tensor\(s\) w\. Tensors on the meta device hold no": torch.empty(2, device="meta"),
        r"tensor\(s\) w of dtype torch.float8_e4m3fn: numpy holds no such dtype": torch.zeros(
            2, dtype=torch.float8_e4m3fn
        ),
        r"tensor\(s\) w of dtype torch.complex32: numpy": torch.zeros(2, dtype=torch.complex32),
    }
    for message, tensor in cases.items():
        path = save_torch({"b": torch.ones(1), "w": tensor}, tmp_path / "w.pth", zip_format)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}") as info:
            load_state_dict(path)
        assert not isinstance(info.value, UnsafeCheckpointError) and "\n" not in str(info.value)


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
    path = save_torch({"w": torch.ones(4096)}, tmp_path / "good.pth", True)
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
    data = save_torch({"w": torch.ones(4096)}, tmp_path / "good.pth", False).read_bytes()
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
    locked = save_torch({"w": torch.ones(3)}, tmp_path / "locked.pth", True)

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
    path = save_torch(checkpoint, tmp_path / "checkpoint.pth", zip_format)
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
        "args": argparse.Namespace(x=Payload(marker)),
        "hyper_parameters": {"loss": Payload(marker), "config": collections.Counter(a=1)},
    }
    path = save_torch(checkpoint, tmp_path / "evil_args.pth", True)
    with caplog.at_level("INFO"):
        np.testing.assert_array_equal(load_state_dict(path)["w"], np.ones(2, np.float32))
    assert re.search(
        r"beside the weights, pickled (posix|nt)\.system, collections\.Counter", caplog.text
    )
    args = load_checkpoint(path)["args"]
    assert isinstance(args.x, torch_file.PickledObject) and "not run" in repr(args.x)
    assert not marker.exists()
    checkpoint["state_dict"]["evil"] = Payload(marker)
    path = save_torch(checkpoint, tmp_path / "evil_weights.pth", True)
    with pytest.raises(UnsafeCheckpointError, match=r"global (posix|nt)\.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_weights_under_two_wrapper_keys_are_refused(tmp_path):
    state = {"fc.weight": torch.ones(2, 2)}
    path = save_torch({"state_dict": state, "model": state, "epoch": 1}, tmp_path / "two.pth", True)
    with pytest.raises(CheckpointError, match=r"several keys \['state_dict', 'model'\]"):
        load_state_dict(path)


def test_state_dicts_under_other_keys_are_named(tmp_path, caplog):
    """A self-supervised run's checkpoint (DINO's `student` and `teacher`, no wrapper key):
    refused in one line naming the state dicts it holds and how to read one; timm's
    `state_dict` beside `state_dict_ema`: the first is read, the other named in the log."""
    state = {"backbone.cls_token": torch.zeros(1, 1, 4), "head.weight": torch.ones(2, 4)}
    dino = {"student": state, "teacher": state, "epoch": 3, "optimizer": {"state": {}}}
    path = save_torch(dino, tmp_path / "checkpoint.pth", True)
    with pytest.raises(
        CheckpointError,
        match=r"^\S+checkpoint.pth: state dicts under 'student', 'teacher', none under .*"
        r"read one with models/convert.py --entry=teacher \(README: Self-supervised "
        r"checkpoints\)$",
    ):
        load_state_dict(path)
    timm = {"state_dict": state, "state_dict_ema": state, "epoch": 3}
    with caplog.at_level("INFO"):
        got = load_state_dict(save_torch(timm, tmp_path / "timm.pth", True))
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


def test_a_key_both_with_and_without_module_prefix_is_refused(tmp_path):
    state = {"module.fc.weight": torch.ones(2, 2), "fc.weight": torch.zeros(2, 2)}
    path = save_torch(state, tmp_path / "both.pth", True)
    with pytest.raises(CheckpointError, match=r"both.pth: holds both 'module.fc.weight' and "
                       r"'fc.weight'"):  # fmt: skip
        load_state_dict(path)
    path = save_torch({"module.fc.weight": torch.ones(2, 2)}, tmp_path / "one.pth", True)
    assert list(load_state_dict(path)) == ["fc.weight"]
