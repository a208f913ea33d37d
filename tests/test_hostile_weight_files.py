"""Hostile weight files: crafted pickles, one memory budget, zip and npz members checked
before they are read, shapes and dtypes numpy cannot make; each refused in one line."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import resource
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxdissect import cli
from jaxdissect.models import checkpoint_io, npz_file, torch_file, torch_tensors, weight_file
from jaxdissect.models import load as model_load
from jaxdissect.models.checkpoint_io import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_state_dict,
)
from tests.weights_testing import FORMATS, Payload, save_torch

REPO = Path(__file__).resolve().parents[1]


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


def test_malicious_payload_is_refused_and_never_runs(tmp_path):
    # The payload is real: a plain unpickler runs it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()

    marker = tmp_path / "pwned"
    payload = {"conv.weight": torch.ones(2), "evil": Payload(marker)}
    paths = [
        save_torch(payload, tmp_path / "evil_zip.pth", True),
        save_torch(payload, tmp_path / "evil_legacy.pth", False),
        tmp_path / "evil_raw.pkl",
    ]
    paths[2].write_bytes(pickle.dumps(Payload(marker)))
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


def _write_pickle(path: Path, payload: bytes, zip_format: bool = True) -> Path:
    """`payload` as a weight file: torch's zip layout (its data.pkl), or the bare pickle."""
    if zip_format:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
            archive.writestr("archive/byteorder", "little")
    else:
        path.write_bytes(payload)
    return path


def _craft_zip(
    path: Path, size: tuple[int, ...], stride: tuple[int, ...], state: dict | None = None
) -> None:
    """A torch-style zip whose one tensor claims `size`/`stride` over a 4-element storage
    (with `state`, the pickle then BUILDs it onto the tensor)."""
    storage = _Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", torch.FloatStorage, "0", "cpu", 4)
            return None

    buffer = io.BytesIO()
    args = (storage, 0, size, stride, False, collections.OrderedDict())
    tensor = _Reduce(torch._utils._rebuild_tensor_v2, args, state)
    Pickler(buffer, protocol=2).dump({"w": tensor})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes())


class _Reduce:
    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


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


@pytest.mark.parametrize("state", [{"stride": (-16,)}, {"offset": -8}, {"stride": (-(10**9),)}])
def test_a_pickle_rewriting_a_checked_tensor_is_refused_never_read_outside_its_storage(
    tmp_path, state
):
    """BUILD after the rebuild function checked a tensor (a frozen dataclass's attributes
    written all the same) would give it a negative stride or offset, which `as_strided`
    reads before the storage's buffer (other memory, or a crash): refused; and the cut
    checks them again."""
    path = tmp_path / "crafted.pth"
    _craft_zip(path, (4,), (1,), state)
    with pytest.raises(CheckpointError, match=r"crafted.pth: the pickle sets the state of a Te"):
        load_state_dict(path)
    storage = torch_tensors.Storage("0", torch_tensors.StorageType("Float"), 4)
    ref = torch_tensors.TensorRef(storage, 0, (4,), (1,))
    for name, value in state.items():
        object.__setattr__(ref, name, value)
    with pytest.raises(CheckpointError, match="are not whole numbers >= 0 of one rank"):
        torch_tensors.cut(ref, np.arange(4, dtype=np.float32), weight_file.Budget("x", 2**20))


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
    with pytest.raises(CheckpointError, match=r"crafted.pth: the pickle sets the state of a St"):
        load_state_dict(path)


def test_a_crafted_pickle_cannot_change_the_reader_for_later_loads(tmp_path):
    """BUILD on an allowed function (setting its `__defaults__`) is refused; it would
    otherwise break every later load in the process."""

    def u(text: str) -> bytes:
        return b"X" + len(text).to_bytes(4, "little") + text.encode()

    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}" + u("__defaults__") + b")s\x86b0}."
    crafted = _write_pickle(tmp_path / "crafted.pth", payload)
    defaults = torch_tensors.rebuild_tensor_v2.__defaults__
    with pytest.raises(CheckpointError, match=r"crafted.pth: .*state of _rebuild_tensor_v2"):
        load_state_dict(crafted)
    assert torch_tensors.rebuild_tensor_v2.__defaults__ == defaults
    good = save_torch({"w": torch.ones(2)}, tmp_path / "good.pth", True)
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
    _write_pickle(path, payload, zip_format)
    with pytest.raises(CheckpointError, match=f"^{path}: .*opcode BYTEARRAY8 at byte 3 "):
        load_state_dict(path)
    assert "SystemError" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "put", [b"r" + struct.pack("<I", 2**26), b"p%d\n" % 2**26], ids=["LONG_BINPUT", "PUT"]
)
@FORMATS
def test_a_memo_index_far_past_the_pickles_objects_is_refused_before_it_costs_memory(
    tmp_path, zip_format, put
):
    """LONG_BINPUT (or protocol 0's PUT) of object 2**26 in a pickle of 9 bytes: CPython's
    unpickler grew its memo to 2**27 entries (1 GiB, zeroed; 2**30: 16 GiB). Picklers number
    memo entries from 0 in order: refused in one line, before the unpickler runs."""
    payload = b"\x80\x02}" + put + b"."
    path = tmp_path / "memo.pth"
    _write_pickle(path, payload, zip_format)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=f"^{path}: .*PUT at byte 3 stores object 67108864"):
        load_state_dict(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**16  # KiB: < 64 MiB


def _calls_on_one_argument(glob: bytes, argument: bytes, calls: int) -> bytes:
    """A protocol-2 pickle of a list of `calls` calls of the global `glob` on one argument
    tuple (`argument`'s items, pickled once and named again: 4 bytes a call)."""
    return (
        b"\x80\x02c" + glob + b"\nq\x00(" + argument + b"tq\x01](" + b"h\x00h\x01R" * calls + b"e."
    )


def test_one_container_handed_to_calls_again_and_again_is_refused_before_it_is_copied(tmp_path):
    """A list of 5000 elements (10 KiB) handed to set, OrderedDict, a Namespace's state or a
    tensor's size in each of 500 calls: 2.5 * 10**6 elements copied (20000 in 2000 calls:
    seconds and GiBs). Copies are counted against the pickle's own size, and a size is
    refused by its rank before it is copied."""
    ones = b"](" + b"K\x01" * 5000 + b"e"
    pairs = b"](" + b"".join(b"J" + struct.pack("<i", i) + b"K\x00\x86" for i in range(5000)) + b"e"
    state = b"}q\x01(" + b"".join(b"J" + struct.pack("<i", i) + b"K\x00" for i in range(5000))
    namespace = b"\x80\x02cargparse\nNamespace\nq\x00" + state + b"u](" + b"h\x00)\x81h\x01b" * 500
    cases = {
        "set": _calls_on_one_argument(b"builtins\nset", ones, 500),
        "OrderedDict": _calls_on_one_argument(b"collections\nOrderedDict", pairs, 500),
        "Namespace": namespace + b"e.",
    }
    path = tmp_path / "copies.pth"
    for name, payload in cases.items():
        _write_pickle(path, payload)
        with pytest.raises(CheckpointError, match=r"copies more elements than it holds") as info:
            load_state_dict(path)
        assert str(info.value).startswith(f"{path}: "), name
    _craft_zip(path, (1,) * 5000, (1,) * 5000)
    with pytest.raises(CheckpointError, match=r"tensor size has 5000 dimensions, more than the 32"):
        load_state_dict(path)
    # A tensor's metadata (its conj and neg bits): refused by its length before it is copied.
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    metadata = b"}(" + b"".join(b"J" + struct.pack("<i", i) + b"K\x00" for i in range(5000)) + b"u"
    arguments = storage + b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)R" + metadata
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "archive/data.pkl",
            _calls_on_one_argument(b"torch._utils\n_rebuild_tensor_v2", arguments, 500),
        )
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", bytes(16))
    with pytest.raises(
        CheckpointError, match=r"tensor metadata of 5000 keys \(0, 1, 2\): only conj"
    ):
        load_state_dict(path)


def test_unsafe_refusals_name_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = save_torch({"w": Payload(marker)}, tmp_path / "evil.pth", True)
    with pytest.raises(SystemExit) as info:
        cli.script_main(lambda: model_load.load("alexnet", weights=str(path)))(["prog"])
    message = str(info.value)
    assert message.startswith(f"error: --weights: {path}: refusing to load global ")
    assert "\n" not in message and not marker.exists()


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


class _Deadline(Exception):
    pass


def _alarm(signum, frame):
    raise _Deadline


@FORMATS
def test_containers_and_modules_shared_in_a_pickle_are_walked_once(tmp_path, zip_format):
    """A pickle memoises what it shares: `[x, x]` nested in itself 64 times is a file of a
    few kilobytes that names 2**64 paths. Walked once per container (its sharing kept, as
    torch keeps it), it loads at once; a whole module sharing each submodule under two names
    (2**64 keys in its state dict) is refused by their count, not expanded."""
    nested = [torch.ones(2)]
    module = torch.nn.Linear(1, 1)
    for _ in range(64):
        nested = [nested, nested]
        parent = torch.nn.Module()
        parent.a, parent.b = module, module
        module = parent
    lists = save_torch({"w": torch.ones(2), "x": nested}, tmp_path / "l.pth", zip_format)
    modules = save_torch(module, tmp_path / "m.pth", zip_format)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)  # a walk of every path would never end
    try:
        got = load_checkpoint(lists)["x"]
        with pytest.raises(
            CheckpointError,
            match=r"^\S*m.pth: the pickled module \S+ (holds|names its weights by) more",
        ):
            load_state_dict(modules)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert got[0] is got[1] and got[0][0] is got[1][1]
    for _ in range(63):
        got = got[0]
    np.testing.assert_array_equal(got[0][0], np.ones(2, np.float32))


def test_a_pickled_module_named_many_times_is_made_once_and_counted_once(tmp_path):
    """A module of 2**15 keys (each submodule shared under two names) named 64 times in a
    list: one state dict, shared as the pickle shares the module (it was made 64 times).
    Under 3 distinct roots, made for each: refused once they together pass the limit."""
    module = torch.nn.Linear(1, 1)
    for _ in range(14):
        parent = torch.nn.Module()
        parent.a, parent.b = module, module
        module = parent
    roots = []
    for _ in range(3):
        root = torch.nn.Module()
        root.m = module
        roots.append(root)
    path = save_torch([module] * 64, tmp_path / "named.pth", True)
    got = load_checkpoint(path)
    assert len(got[0]) == 2 * 2**14 and all(weights is got[0] for weights in got)
    with pytest.raises(CheckpointError, match=r"holds more than 65536 submodules"):
        load_checkpoint(save_torch(roots, tmp_path / "roots.pth", True))


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch deprecates
def test_keys_nested_under_one_long_name_cost_no_more_than_the_file(tmp_path):
    """A chain of 100 containers, or submodules, each keyed by one string of 100,000
    characters (pickled once): paths of 5 * 10**8 characters in all, from a file of 100 KiB.
    The containers' paths are joined only to name a quantised tensor (and cut there); the
    module's state dict keys are counted and refused past `_MAX_KEY_CHARS`."""
    name = "k" * 10**5
    nested: object = {"w": torch.ones(1)}
    module = torch.nn.Linear(1, 1)
    for _ in range(100):
        nested = {name: nested}
        parent = torch.nn.Module()
        parent.add_module(name, module)
        module = parent
    q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    files = {
        "beside": save_torch({"state_dict": {"w": torch.ones(1)}, "x": nested}, tmp_path / "b.pth", True),
        "quantised": save_torch({"w": torch.ones(1), "x": [nested, {name: q}]}, tmp_path / "q.pth", True),
        "module": save_torch(module, tmp_path / "m.pth", True),
    }  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert list(load_state_dict(files["beside"])) == ["w"]
    with pytest.raises(CheckpointError, match=r"quantised tensor\(s\) x\.1\.k{196}\.\.\.\. Quan"):
        load_state_dict(files["quantised"])
    with pytest.raises(CheckpointError, match=r"names its weights by more than 16777216 char"):
        load_state_dict(files["module"])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**16  # KiB: < 64 MiB


def test_a_mapping_under_many_keys_is_looked_through_once(tmp_path):
    """One mapping of 6000 tensors under 6000 keys (pickled once, 200 KiB): looked through
    once, not 6000 times (3.6 * 10**7 checks, seconds; 10**5 of each: hours), and the
    refusal names five of them and their count, not all."""
    inner = {f"k{i}": torch.ones(1) for i in range(6000)}
    path = save_torch({**{f"o{i}": inner for i in range(6000)}, "x": 1}, tmp_path / "w.pth", True)
    with pytest.raises(CheckpointError, match=r"under 'o0', .* 'o4', \.\.\. \(6000 in all\), none"):
        load_state_dict(path)

    class Counted(dict):
        looks = 0

        def values(self):
            Counted.looks += 1
            return super().values()

    shared = Counted(w=np.ones(1, np.float32))
    assert checkpoint_io._tensor_dicts({f"o{i}": shared for i in range(100)}) == [
        f"o{i}" for i in range(100)
    ]
    assert Counted.looks == 1


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


def test_a_legacy_file_saved_on_a_big_endian_machine_reads_as_torch_reads_it(tmp_path):
    """The legacy format's sys info records the saving machine's byte order, but torch
    writes (and reads) every storage's size and elements little-endian whatever it was: the
    file loads with torch's values (the sizes were read big-endian: refused, or with
    elements byte-swapped)."""
    state = {"w": torch.arange(6, dtype=torch.float32) / 7, "h": torch.tensor([1.5, -2.0]).half()}
    data = save_torch(state, tmp_path / "le.pth", False).read_bytes()
    flag = b"little_endianq\x02\x88"  # BINPUT 2, NEWTRUE
    assert data.count(flag) == 1
    path = tmp_path / "be.pth"
    path.write_bytes(data.replace(flag, b"little_endianq\x02\x89"))  # NEWFALSE
    want = torch.load(path, weights_only=True)
    got = load_state_dict(path)
    for key, value in state.items():
        np.testing.assert_array_equal(want[key].numpy(), value.numpy())
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)


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
    # Sizes numpy's header parser takes and its reader does not (a TypeError came out).
    "bool in shape": ({"a.npy": _npy((True, 4), data=bytes(16))}, r"\(True, 4\), not of whole"),
    "negative shape": ({"a.npy": _npy((-2, -2), data=bytes(16))}, r"\(-2, -2\), not of whole"),
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
    data = save_torch({"w": torch.ones(2)}, tmp_path / "good.pth", True).read_bytes()
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
        (save_torch({"w": torch.ones(2)}, tmp_path / "good.pth", True), load_state_dict),
        (tmp_path / "good.npz", npz_file.load_npz),
    ]:
        path = good.with_name("v98" + good.suffix)
        path.write_bytes(_zip_flags(good.read_bytes(), version=98))
        with pytest.raises(CheckpointError, match="zip file version 9.8") as info:
            load(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
        assert "truncated or corrupt: copy or download it again" in str(info.value)
