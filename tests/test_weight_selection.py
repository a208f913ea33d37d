"""One network of a checkpoint that holds several (a self-supervised run's): `entry`,
`prefix` and `drop` (`checkpoint_io`, `models/convert.py`), the hints of a file that does
not fit, and ResNets without a head."""

from __future__ import annotations

import argparse
import logging

import jax
import numpy as np
import pytest
import torch

from jaxdissect.models import load as model_load
from jaxdissect.models import zoo
from jaxdissect.models.checkpoint_io import (
    CheckpointError,
    SelectionError,
    key_groups,
    load_state_dict,
    select_keys,
)
from jaxdissect.models.convert import convert, load_variables, variables_template
from jaxdissect.models.torch_import import WeightMappingError, torch_to_flax
from tests import torch_models as tm
from tests import torch_vit
from tests.model_testing import assert_parity
from tests.vit_testing import assert_class_token_features

WIDTH = 0.25  # ResNet-18 at a quarter of its channels: the layout whole, the file small


def _resnet(seed: int, head: torch.nn.Module | None = None) -> torch.nn.Module:
    """A torch ResNet-18 (quarter width) with random weights; `head` replaces its `fc`
    (torch.nn.Identity(): none, as self-supervised backbones are saved)."""
    model = tm.randomize_(tm.ResNet(*tm.RESNET_LAYOUT["resnet18"], width=WIDTH), seed=seed)
    if head is not None:
        model.fc = head
    return model.eval()


def _mlp(seed: int) -> torch.nn.Module:
    """MoCo v2's projection head in place of `fc`: Linear, ReLU, Linear (`fc.0`, `fc.2`)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))


def _trunk(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state dict of `model` without its head, as numpy arrays."""
    return {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _moco_checkpoint(path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """MoCo v2's `checkpoint_0199.pth.tar` in small: DDP's `module.` before the query and key
    encoders (each a ResNet whose `fc` is the projection MLP) and the queue, under
    `state_dict` beside the epoch, the architecture and the optimizer's state."""
    query, key = _resnet(1, _mlp(1)), _resnet(2, _mlp(2))
    state = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v for k, v in key.state_dict().items()}
    state |= {"module.queue": torch.randn(16, 64), "module.queue_ptr": torch.zeros(1).long()}
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}
    torch.save(
        {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": optimizer}, path
    )
    return query, key


def test_moco_query_encoder_converts_headless_and_computes_as_torch(tmp_path):
    source = tmp_path / "checkpoint_0199.pth.tar"
    query, key = _moco_checkpoint(source)
    options = {"width": WIDTH}

    # Read as it is, nothing fits: the error names the encoders and the way to pick one.
    with pytest.raises(ValueError) as info:
        model_load.load("resnet18", weights=str(source), options=options)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith(
        "; the keys under 'encoder_q' fit it: models/convert.py --prefix encoder_q reads them "
        "alone (README: Self-supervised checkpoints); models/convert.py --drop fc leaves out "
        "the keys the model has no place for (a projection head's); --num_classes=0 builds "
        "resnet18 without its head"
    )

    # The query encoder alone: its projection MLP has no place in the model ...
    with pytest.raises(WeightMappingError) as info:
        convert("resnet18", source, tmp_path / "x", num_classes=0, options=options,
                prefix="encoder_q")  # fmt: skip
    assert "models/convert.py --drop fc leaves out the keys" in str(info.value)
    # ... and without the MLP, a model with a head lacks one.
    with pytest.raises(WeightMappingError) as info:
        convert("resnet18", source, tmp_path / "x", options=options,
                prefix="encoder_q", drop=["fc"])  # fmt: skip
    assert str(info.value).endswith("; --num_classes=0 builds resnet18 without its head")
    assert not (tmp_path / "x").exists()

    out = tmp_path / "moco_q"
    meta = convert("resnet18", source, out, num_classes=0, options=options,
                   prefix="module.encoder_q.", drop=["fc"])  # fmt: skip
    assert meta["selection"] == {"entry": None, "prefix": "module.encoder_q.", "drop": ["fc"]}
    model = zoo.build("resnet18", num_classes=0, **options)
    want = torch_to_flax(_trunk(query), variables_template(model))
    loaded = model_load.load("resnet18", weights=str(out))
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, want)
    other = torch_to_flax(_trunk(key), variables_template(model))
    assert not np.array_equal(
        loaded.variables["params"]["conv1"]["kernel"], other["params"]["conv1"]["kernel"]
    )


def test_dino_teachers_backbone_converts_by_entry_and_prefix(tmp_path, caplog):
    """DINO's `checkpoint.pth`: `student` (DDP: `module.backbone.`, `module.head.`) and
    `teacher` (`backbone.`, its projection `head.`), the loss's `center`, the run's
    arguments; no wrapper key."""
    teacher, student = _resnet(3, torch.nn.Identity()), _resnet(4, torch.nn.Identity())
    head = {"head.mlp.0.weight": torch.randn(32, 128), "head.last_layer.weight_g": torch.ones(8, 1)}
    source = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()}
            | {f"module.{k}": v for k, v in head.items()},
            "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()} | head,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 100,
            "args": argparse.Namespace(arch="resnet50", out_dim=65536),
            "dino_loss": {"center": torch.zeros(1, 8)},
        },
        source,
    )
    with pytest.raises(CheckpointError) as info:
        load_state_dict(source)
    assert str(info.value).endswith(
        "state dicts under 'student', 'teacher', 'dino_loss', none under ('state_dict', "
        "'model_state_dict', 'model'); read one with models/convert.py --entry=teacher "
        "(README: Self-supervised checkpoints)"
    )
    with pytest.raises(SelectionError, match=r"^entry='teachers': \S+ has no 'teachers' at its "
                       r"top level; the keys there are 'student', 'teacher', 'optimizer', "
                       r"'epoch', 'args', 'dino_loss'$"):  # fmt: skip
        load_state_dict(source, entry="teachers")
    with pytest.raises(
        SelectionError, match=r"^entry=.epoch.: \S+ holds a value of type int there"
    ):
        load_state_dict(source, entry="epoch")

    with pytest.raises(WeightMappingError, match=r"; the keys under 'backbone' fit it: models/"
                       r"convert.py --prefix backbone reads them alone \(README: Self-supervised "
                       r"checkpoints\)$"):  # fmt: skip
        convert("resnet18", source, tmp_path / "x", num_classes=0, options={"width": WIDTH},
                entry="teacher")  # fmt: skip
    with caplog.at_level(logging.INFO):
        convert("resnet18", source, tmp_path / "dino", num_classes=0, options={"width": WIDTH},
                entry="teacher", prefix="backbone")  # fmt: skip
    assert "2 keys outside 'backbone.' left out: 'head.' (2)" in caplog.text
    got, meta = load_variables(tmp_path / "dino")
    assert meta["selection"] == {"entry": "teacher", "prefix": "backbone", "drop": []}
    model = zoo.build("resnet18", num_classes=0, width=WIDTH)
    jax.tree.map(np.testing.assert_array_equal, got,
                 torch_to_flax(_trunk(teacher), variables_template(model)))  # fmt: skip
    # The student's keys carry DDP's `module.` as well: stripped before the prefix is read.
    student_state = load_state_dict(source, entry="student")
    assert select_keys(student_state, prefix="backbone").keys() == _trunk(student).keys()


def test_vissl_trunk_converts_by_a_nested_entry(tmp_path):
    """VISSL's model zoo (`model_final_checkpoint_phase*.torch`: SimCLR, PIRL, Jigsaw,
    RotNet, ...): the trunk under `classy_state_dict/base_model/model/trunk`, torchvision's
    names after `_feature_blocks.`, the heads beside it, the run's state around."""
    trunk = _resnet(6, torch.nn.Identity())
    model = {"trunk": {f"_feature_blocks.{k}": v for k, v in trunk.state_dict().items()}}
    model["heads"] = {"0.clf.0.weight": torch.ones(8, 128), "0.clf.0.bias": torch.zeros(8)}
    classy = {"base_model": {"model": model, "meta": {}}, "loss": {}, "train_phase_idx": 799}
    source = tmp_path / "model_final_checkpoint_phase799.torch"
    torch.save({"phase_idx": 799, "iteration": 1000, "classy_state_dict": classy}, source)
    entry = "classy_state_dict/base_model/model/trunk"
    convert("resnet18", source, tmp_path / "vissl", num_classes=0, options={"width": WIDTH},
            entry=entry, prefix="_feature_blocks")  # fmt: skip
    got, _ = load_variables(tmp_path / "vissl")
    model = zoo.build("resnet18", num_classes=0, width=WIDTH)
    jax.tree.map(np.testing.assert_array_equal, got,
                 torch_to_flax(_trunk(trunk), variables_template(model)))  # fmt: skip
    with pytest.raises(SelectionError, match=r"^entry='classy_state_dict/base_model/trunk': \S+ "
                       r"has no 'trunk' at classy_state_dict/base_model; the keys there are "
                       r"'model', 'meta'$"):  # fmt: skip
        load_state_dict(source, entry="classy_state_dict/base_model/trunk")


def test_a_backbone_saved_without_its_head_loads_with_num_classes_0(tmp_path):
    """DINO's and Barlow Twins' ResNet-50 files hold the trunk only (their `fc` was
    `Identity`): the hint names --num_classes=0, which builds the model without `fc`."""
    backbone = _resnet(5, torch.nn.Identity())
    torch.save(backbone.state_dict(), tmp_path / "resnet50.pth")
    options = {"width": WIDTH}
    with pytest.raises(ValueError) as info:
        model_load.load("resnet18", weights=str(tmp_path / "resnet50.pth"), options=options)
    message = str(info.value)
    assert "model variables with no checkpoint key (2): ['params/fc/bias', 'params/fc/kernel']" in (
        message
    )
    assert message.endswith("; --num_classes=0 builds resnet18 without its head")
    loaded = model_load.load(
        "resnet18", weights=str(tmp_path / "resnet50.pth"), options={**options, "num_classes": 0}
    )
    assert "fc" not in loaded.variables["params"]
    x = np.random.default_rng(1).standard_normal((1, 48, 48, 3)).astype(np.float32)
    assert_parity(loaded.module, loaded.variables, backbone, x, {"layer3": "layer3"})

    # SwAV's `swav_800ep_pretrain.pth.tar`: DDP's `module.`, its projection head and
    # prototypes beside the trunk.
    swav = {f"module.{k}": v for k, v in backbone.state_dict().items()}
    swav |= {"module.projection_head.0.weight": torch.ones(8, 128)}
    swav |= {"module.projection_head.1.running_mean": torch.ones(8)}
    swav |= {"module.prototypes.weight": torch.ones(30, 8)}
    torch.save(swav, tmp_path / "swav.pth.tar")
    with pytest.raises(ValueError) as info:
        model_load.load("resnet18", weights=str(tmp_path / "swav.pth.tar"), options=options)
    assert str(info.value).endswith(
        "; models/convert.py --drop projection_head,prototypes leaves out the keys the model "
        "has no place for (a projection head's); --num_classes=0 builds resnet18 without its head"
    )
    convert("resnet18", tmp_path / "swav.pth.tar", tmp_path / "swav", num_classes=0,
            options=options, drop=["projection_head", "prototypes"])  # fmt: skip
    got, _ = load_variables(tmp_path / "swav")
    jax.tree.map(np.testing.assert_array_equal, got, loaded.variables)


def test_select_keys_reads_whole_components_and_names_what_it_cannot_find(caplog):
    state = {
        "encoder.fc.weight": 1, "encoder.fcx.weight": 2, "encoder.fc.0.bias": 3,
        "encoder.conv.weight": 4, "encoderx.conv.weight": 5, "queue": 6,
    }  # fmt: skip
    with caplog.at_level(logging.INFO):
        got = select_keys(state, prefix="encoder.", drop=["fc"], path="f.pth")
    assert got == {"fcx.weight": 2, "conv.weight": 4}
    assert "f.pth: 2 keys outside 'encoder.' left out: 'encoderx.' (1), 'queue' (1)" in caplog.text
    assert "f.pth: 2 keys under 'fc' dropped" in caplog.text
    assert select_keys(state, drop=["queue", "encoderx"]) == {
        k: v for k, v in state.items() if k not in ("queue", "encoderx.conv.weight")
    }
    assert select_keys(state, prefix="encoder", drop=["fc."]) == got
    with pytest.raises(SelectionError, match=r"^prefix='enc': f.pth: no key starts with 'enc.'; "
                       r"the keys start with 'encoder.' \(4\), 'encoderx.' \(1\), 'queue' \(1\)$"):  # fmt: skip
        select_keys(state, prefix="enc", path="f.pth")
    with pytest.raises(SelectionError, match=r"^drop='fc.0.bias.weight': no key under the prefix "
                       r"is 'fc.0.bias.weight' or starts with 'fc.0.bias.weight.'; they start "
                       r"with 'fc.' \(2\), 'fcx.' \(1\), 'conv.' \(1\)$"):  # fmt: skip
        select_keys(state, prefix="encoder", drop=["fc.0.bias.weight"])
    # Two drops of one key: each names keys of the selection, not of what is left.
    assert select_keys(state, prefix="encoder", drop=["fc", "fc.0"]) == got


def test_key_groups_count_by_first_name():
    keys = [f"a.{i}" for i in range(3)] + ["b.x", "c", "d.y", "e.z", "f.w"]
    assert key_groups(keys) == "'a.' (3), 'b.' (1), 'c' (1), 'd.' (1), ... (6 in all)"
    assert key_groups(["x"]) == "'x' (1)"


def test_moco_v3_vit_base_encoder_converts_headless(tmp_path):
    """MoCo v3's ViT checkpoint: DDP's `module.` before `base_encoder` (timm's ViT names,
    its `head` a projection MLP with BatchNorms), `momentum_encoder` and `predictor`, under
    `state_dict`: the base encoder without its head computes as torch's class token after
    the final norm."""
    reference = torch_vit.randomize_(torch_vit.VisionTransformer(img_size=32, depth=2))
    projection = torch.nn.Sequential(
        torch.nn.Linear(192, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    )
    state = {f"module.base_encoder.{k}": v for k, v in reference.state_dict().items()
             if not k.startswith("head.")}  # fmt: skip
    state |= {f"module.base_encoder.head.{k}": v for k, v in projection.state_dict().items()}
    state |= {f"module.momentum_encoder.{k[len('module.base_encoder.') :]}": v * 0.5
              for k, v in state.items()}  # fmt: skip
    state |= {"module.predictor.0.weight": torch.ones(64, 8)}
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state}, tmp_path / "r.pth.tar")
    options = {"depth": 2, "image_size": 32, "pool_type": "tok", "gelu_approximate": False}
    convert("vit_ti16", tmp_path / "r.pth.tar", tmp_path / "mocov3", num_classes=0,
            options=options, prefix="base_encoder", drop=["head"])  # fmt: skip
    loaded = model_load.load("vit_ti16", weights=str(tmp_path / "mocov3"))
    assert_class_token_features(loaded, reference, seed=2)
