"""Weight files written by real torch.save / safetensors, read back without torch; conversion."""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

from jaxdissect import cli
from jaxdissect.models import checkpoint_io
from jaxdissect.models import load as model_load
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
    save_variables,
    variables_template,
)
from jaxdissect.models.googlenet import GoogLeNet, googlenet
from jaxdissect.models.torch_import import WeightMappingError, torch_to_flax
from tests import torch_models_b as ref

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


@FORMATS
def test_whole_pickled_module_is_refused_with_advice(tmp_path, zip_format):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    path = _save(model, tmp_path / "model.pth", zip_format)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.save\(model\.state_dict\(\), path\)"):
        load_state_dict(path)


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
    modules = {module for module, _ in checkpoint_io.ALLOWED_GLOBALS}
    assert modules == {"collections", "torch", "torch.cuda", "torch._utils", "torch.storage"}
    assert ("collections", "OrderedDict") in checkpoint_io.ALLOWED_GLOBALS
    assert ("builtins", "eval") not in checkpoint_io.ALLOWED_GLOBALS


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
    message = str(info.value)
    assert "checkpoint keys with no model variable" in message
    assert "_conv_stem.weight" in message  # torch side
    assert "params/conv1/conv/kernel" in message  # model side
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


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "models/convert.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_convert_cli_end_to_end(tmp_path):
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
    done = _cli("--arch", "googlenet", "--num_classes", "5", "--input", str(source),
                "--output", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
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
    failed = _cli("--arch", "googlenet", "--input", str(source), "--output", str(tmp_path / "x"))
    assert failed.returncode != 0
    assert "--arch googlenet --num_classes 1000" in failed.stderr
    assert "shape mismatch" in failed.stderr and "params/fc/kernel" in failed.stderr


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
