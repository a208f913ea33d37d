"""models/convert.py: a weight file to an orbax checkpoint and back, its CLI, `--force`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxdissect.models import convert as convert_module
from jaxdissect.models import load as model_load
from jaxdissect.models.checkpoint_io import (
    CheckpointError,
)
from jaxdissect.models.convert import (
    build_from_meta,
    convert,
    load_variables,
    read_meta,
    save_variables,
    variables_template,
)
from jaxdissect.models.googlenet import GoogLeNet, googlenet
from jaxdissect.models.torch_import import WeightMappingError, torch_to_flax
from tests import torch_models_b as ref
from tests.experiment_testing import ScriptProcesses
from tests.weights_testing import save_torch

REPO = Path(__file__).resolve().parents[1]


def test_mismatched_keys_list_both_sides(tmp_path):
    state = ref.EfficientNetLite0(num_classes=4).state_dict()
    path = save_torch(state, tmp_path / "lite.pth", True)
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
    source = save_torch(
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
    source = save_torch({"teacher": state, "student": state}, tmp_path / "checkpoint.pth", True)
    args = ["--arch", "resnet18", "--input", str(source), "--output", str(tmp_path / "out")]
    done = _cli(convert_py, *args, "--entry=teacher", "--prefix=backbone", "--drop=fc,head")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"convert: --drop='head': {source}: no key under the prefix is 'head' or starts with "
        "'head.'; they start with 'fc.' (1)"
    )


def test_integer_leaves_of_an_orbax_checkpoint_are_refused(tmp_path):
    variables = {"params": {"fc": {"kernel": np.ones((2, 3), np.int8)}}}
    save_variables(tmp_path / "ckpt", variables, {"arch": "alexnet"})
    with pytest.raises(CheckpointError, match=r"params/fc/kernel is int8"):
        load_variables(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"^--weights: .*params/fc/kernel is int8"):
        model_load.load("alexnet", weights=str(tmp_path / "ckpt"))


def test_lightning_checkpoint_converts(tmp_path):
    model = ref.EfficientNetLite0(num_classes=4)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    source = save_torch(
        {"state_dict": state, "epoch": 1, "global_step": 10}, tmp_path / "l.ckpt", True
    )
    meta = convert("efficientnet_lite0", source, tmp_path / "out", num_classes=4)
    assert meta["num_classes"] == 4 and (tmp_path / "out" / "meta.json").exists()


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
    source = save_torch({"fc.weight": torch.ones(2, 2)}, home / "model.pth", True)
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
