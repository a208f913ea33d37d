"""Dissecting a ViT: the engine on token layers against the numpy reference; the NNX twin;
a big_vision-format .npz dissected from its flagfile."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxdissect import capture, cli, driver, engine, parallel, quantiles, results
from jaxdissect.data import synthetic
from jaxdissect.data.broden import Broden
from jaxdissect.models import vit, vit_nnx
from jaxdissect.models.load import init_variables
from jaxdissect.preprocess import InputSpec
from tests import reference
from tests.experiment_testing import (
    QUICK,
    ROOT,
    TINY_SIZE,
    ScriptProcesses,
    parse,
    run_script,
    script,
)
from tests.test_cli import _script

pytestmark = pytest.mark.xdist_group("vit")

SPEC = InputSpec(32, (120.0, 120.0, 120.0), (60.0, 60.0, 60.0))
# A tiny ViT: 4x4 patches of 8 px at 32 px, a class token, 2 blocks of width 24.
TINY = dict(
    width=24, depth=2, mlp_dim=48, num_heads=2, patch_size=8, image_size=32, pool_type="tok"
)
LAYERS = ("block0", "mlp1", "block1")


def vit_scenes_2_blocks(*, num_classes: int = 17, image_size: int = 96) -> vit.ViT:
    """`vit.vit_scenes` with 2 of its 6 blocks: a `--arch` for train.py that compiles fast."""
    return vit.vit_scenes(num_classes=num_classes, image_size=image_size).clone(depth=2)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = synthetic.generate_tiny(tmp_path_factory.mktemp("tiny") / "broden", num_images=13)
    return Broden.open(root)


@pytest.fixture(scope="module")
def linen_vit():
    model = vit.ViT(num_classes=3, **TINY)
    variables = init_variables(model, jnp.zeros((1, 32, 32, 3)), seed=4)
    return model, variables


def _reference(model, variables, probe, settings):
    """Token activations image by image (Linen's capture_intermediates), class token dropped
    and the 16 patch tokens laid out row-major on 4x4 by hand; thresholds and counts by the
    reference definitions."""
    paths = {name: model.layer_aliases[name].split("/") for name in LAYERS}
    acts = {name: [] for name in LAYERS}
    forward = jax.jit(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    )
    for i in range(len(probe)):
        _, state = forward(variables, SPEC(jnp.asarray(probe.read_image(i))[None]))
        for name, path in paths.items():
            node = state["intermediates"]
            for part in path:
                node = node[part]
            tokens = np.asarray(node["__call__"][0][0])  # [17, C]
            grid = np.zeros((4, 4, tokens.shape[-1]), np.float32)
            for r in range(4):
                for c in range(4):
                    grid[r, c] = tokens[1 + 4 * r + c]
            acts[name].append(grid.astype(settings.activation_dtype).astype(np.float32))
    examples = [probe[i] for i in range(len(probe))]
    pixel = np.stack([e["pixel_labels"] for e in examples])
    scalar = np.stack([e["image_labels"] for e in examples])
    out = {}
    for name in LAYERS:
        a = np.stack(acts[name])
        thresholds = quantiles.reference_threshold(a.reshape(-1, a.shape[-1]), settings.quantile)
        out[name] = (
            thresholds,
            reference.reference_dissect(
                a, thresholds, pixel, scalar, probe.labels, restriction=settings.restriction
            ),
        )
    return out


def _dissect(model, variables, probe, settings, devices, steps=None):
    tap = capture.make_tap(model, variables, LAYERS, input_shape=(32, 32, 3))
    dissector = engine.Dissector(
        tap,
        probe,
        settings,
        input_spec=SPEC,
        model_key="tiny-vit",
        mesh=parallel.data_mesh(devices),
        progress=False,
        num_threads=0,
        steps=steps,
    )
    stats = dissector.run(tap.variables)
    return {name: stats[path] for name, path in zip(tap.names, tap.layers, strict=True)}


# float16 activations (the default): the reference's forward and the engine's fused one
# differ in the last float32 bits (LayerNorm, softmax fuse differently), so exact float32
# thresholds differ by an ulp; rounded to float16 they agree on these inputs.
SETTINGS = engine.Settings(
    quantile=0.05, quantile_mode="exact", activation_dtype="float16", batch_size=8
)


@pytest.fixture(scope="module")
def steps():
    """The passes' steps, compiled once for the Linen ViT and its NNX twin (forwards differ)."""
    return driver.Steps()


@pytest.fixture(scope="module")
def linen_dissection(linen_vit, probe, steps):
    """The Linen ViT dissected on 8 devices (`tests/test_engine.py` compares 1 and 8; the
    scripts' tests below dissect ViTs on 1, the big_vision one in the default quantile mode)."""
    model, variables = linen_vit
    return _dissect(model, variables, probe, SETTINGS, 8, steps)


def test_token_layers_match_the_reference(linen_vit, linen_dissection, probe):
    model, variables = linen_vit
    got = linen_dissection
    want = _reference(model, variables, probe, SETTINGS)
    for name in LAYERS:
        thresholds, ref = want[name]
        np.testing.assert_array_equal(got[name].thresholds, thresholds, err_msg=name)
        for key in ("intersection", "label_pixels", "unit_pixels", "unit_total"):
            np.testing.assert_array_equal(
                got[name].counts[key], ref["counts"][key], err_msg=f"{name} {key}"
            )
        best = results.layer_result(name, got[name].counts, probe.labels).best_label.tolist()
        assert best == [u["label"] for u in ref["units"]], name


def test_nnx_twin_dissects_to_the_same_numbers(linen_vit, linen_dissection, probe, steps):
    """Exact thresholds: equal only where the twin's activations round to the same float16s."""
    model, variables = linen_vit
    twin = vit_nnx.from_linen(model, variables["params"])
    linen = linen_dissection
    nnx_ = _dissect(twin, None, probe, SETTINGS, 8, steps)
    for name in LAYERS:
        np.testing.assert_array_equal(linen[name].thresholds, nnx_[name].thresholds)
        for key, value in linen[name].counts.items():
            np.testing.assert_array_equal(value, nnx_[name].counts[key], err_msg=f"{name} {key}")


def test_big_vision_npz_dissected_from_its_flagfile(tmp_path):
    """The flagfile's model with random weights written as a big_vision .npz; the script
    makes a JAX CPU device of each core (`parallel.split_cpu`)."""
    flagfile = ROOT / "experiments" / "configs" / "vit_ti16_big_vision.flags"
    lines = [ln for ln in flagfile.read_text().splitlines() if ln.startswith("--")]
    classes = int(next(ln for ln in lines if ln.startswith("--num_classes=")).split("=")[1])
    model = vit.vit_ti16(pool_type="tok", num_classes=classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    rng = np.random.default_rng(0)
    flat = traverse_util.flatten_dict(shapes["params"], sep="/")
    arrays = {k: (rng.standard_normal(s.shape) * 0.05).astype(np.float32) for k, s in flat.items()}
    np.savez(tmp_path / "bv.npz", **arrays)
    out = tmp_path / "out"
    with ScriptProcesses() as scripts:  # one run: nothing to import ahead of it
        done = _script(
            scripts,
            "dissect",
            f"--flagfile={flagfile}",
            f"--weights={tmp_path / 'bv.npz'}",
            "--synthetic_images=8",  # one batch: what the assertions read needs no more
            "--batch_size=8",
            "--layers=block0,mlp11",
            "--noreport",
            f"--output_dir={out}",
            cache=tmp_path / "cache",
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == f"Results: {out / 'results.json'}"  # --noreport
    data = json.loads((out / "results.json").read_text())
    layers = {layer["layer"]: layer for layer in data["layers"]}
    assert set(layers) == {"block0", "mlp11"}
    cores = len(os.sched_getaffinity(0))
    assert data["settings"]["devices"] == parallel.cpu_device_count(cores)
    assert layers["mlp11"]["path"] == "Transformer/encoderblock_11/MlpBlock_0/gelu"
    assert len(layers["block0"]["units"]) == 192 and len(layers["mlp11"]["units"]) == 768
    assert pathlib.Path(out / "tally-mlp11.csv").exists()


def test_small_vit_trains_and_dissects_from_its_export(tmp_path):
    """train.py exports the ViT's image_size (its position embeddings' grid), so the export
    dissects at the training resolution: 48 px, 12 px patches, a 4x4 map per block."""
    # 32 images: two training batches; the export's resolution needs no more.
    broden = synthetic.generate(tmp_path / "broden1_48", num_images=32, size=TINY_SIZE, workers=1)
    data = (f"--data={broden}", f"--resolution={TINY_SIZE}")
    run_script(
        "train",
        *data,
        f"--arch={__name__}:vit_scenes_2_blocks",
        "--optimizer=adam",
        "--steps=2",
        "--batch_size=16",
        "--save_steps=0,2",
        "--devices=1",
        "--noprogress",
        f"--output_dir={tmp_path / 'train'}",
    )
    meta = json.loads((tmp_path / "train" / "weights" / "step_000002" / "meta.json").read_text())
    assert meta["options"]["image_size"] == TINY_SIZE
    rows = run_script(
        "compare",
        f"--dissect=vit||{tmp_path / 'train' / 'weights' / 'step_000002'}|block0,block1",
        *data,
        "--split=all",
        "--batch_size=16",
        "--devices=1",
        "--noprogress",
        f"--output_dir={tmp_path / 'compare'}",
    )
    assert [(r["layer"], r["path"], r["num_units"]) for r in rows] == [
        ("block0", "Transformer/encoderblock_0", 64),
        ("block1", "Transformer/encoderblock_1", 64),
    ]


def test_token_layout_flag_reads_the_tokens_as_named(tmp_path):
    """--token_layout reads a model's tokens and keys the stored stages. A model with a class
    token, 4x4 patches and 3 registers after them, declaring only its patch size: without a
    layout it is refused (the registers' place is unknown); read as all before (4+4x4), then
    as they are (1+4x4+3) into the same output directory, which recomputes; results.json
    records each layer's layout. A layout of the wrong token count, or of another grid than
    the patch size gives, is refused naming the flag."""
    broden = synthetic.generate_tiny(tmp_path / "broden", num_images=13)
    out = tmp_path / "out"
    common = (
        "--model=tests.fixtures.token_model:make",
        "--weights=",
        f"--data={broden}",
        "--layers=tokens",
        *QUICK,
        f"--output_dir={out}",
    )

    def units() -> tuple[dict, list]:
        data = json.loads((out / "results.json").read_text())
        layer = data["layers"][0]
        return data["settings"], [(u["label"], u["iou"]) for u in layer["units"]]

    for layout, message in [
        (None, r"20 tokens: 4x4 patches and 4 others, .* token_layout='4\+4x4'"),
        ("1+4x4", r"20 tokens, token_layout='1\+4x4' covers 17"),
        ("2+2x8+2", r"token_layout='2\+2x8\+2' has a 2x8 grid, but the model's patch_size"),
    ]:
        fv = parse("dissect", *common, *([f"--token_layout={layout}"] if layout else []))
        with pytest.raises(ValueError, match=message) as e:
            script("dissect").run(fv)
        assert "--token_layout" in cli.flag_message(str(e.value), fv)
    run_script("dissect", *common, "--token_layout=4+4x4")
    before_settings, before = units()
    assert before_settings["token_layouts"] == {"tokens": "4+4x4"}
    run_script("dissect", *common, "--token_layout=1+4x4+3")
    settings, named = units()
    assert (
        settings["token_layout"] == "1+4x4+3" and settings["token_layouts"]["tokens"] == "1+4x4+3"
    )
    assert named != before  # not the stored stages of the other layout
