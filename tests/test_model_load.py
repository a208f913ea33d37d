"""`models.load` names user models through `models.zoo.factory`, its errors naming `--model`."""

import dataclasses
import json
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdissect import store
from jaxdissect.models import load as model_load
from jaxdissect.models import zoo
from jaxdissect.preprocess import InputSpec
from tests.fixtures import small_model


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("lenet", "unknown architecture 'lenet': one of alexnet, "),
        ("tests.fixtures.nowhere:make", "cannot import 'tests.fixtures.nowhere'"),
        ("tests.fixtures.small_model:Small.nothing", "has no attribute 'Small.nothing'"),
    ],
)
def test_model_errors_are_the_zoos_naming_the_flag(spec, reason):
    with pytest.raises(ValueError, match=reason) as from_zoo:
        zoo.factory(spec)
    with pytest.raises(ValueError) as from_load:
        model_load.load(spec)
    assert str(from_load.value) == f"--model={spec!r}: {from_zoo.value}"
    if "cannot import" in reason:  # before any data: the module is looked for, not run
        with pytest.raises(ValueError) as from_check:
            model_load.check_request(spec, None)
        assert str(from_check.value) == str(from_load.value)


def test_unknown_architecture_is_refused_before_loading_anything():
    with pytest.raises(ValueError, match="^--model='lenet': unknown architecture"):
        model_load.check_request("lenet", None)


def test_dotted_attribute():
    assert zoo.factory("tests.fixtures.small_model:Small.__call__") is small_model.Small.__call__


@pytest.mark.parametrize(
    ("model", "weights", "options", "message"),
    [
        (
            "tests.fixtures.small_model:make",
            None,
            {"widht": 2},
            "^--model_option widht: --model=tests.fixtures.small_model:make takes no options$",
        ),
        (
            "resnet18",
            None,
            {"num_classes": 5, "wdth": 0.5},
            "^--model_option wdth: --model=resnet18 takes num_classes, width, batch_norm, caffe_maxpool, "
            "input_spec$",
        ),
        (
            "vit_ti16",
            None,
            {"image_size": 64, "bogus": 3},
            "^--model_option bogus: --model=vit_ti16 takes num_classes, patch_size, width, ",
        ),
        (
            "tests.fixtures.small_model:Small",
            None,
            {"bogus": 1},
            "^--model_option bogus: --model=tests.fixtures.small_model:Small takes input_spec$",
        ),
        (
            "tests.fixtures.small_model:MODULE",
            None,
            {"input_spec": None},
            "^--model_option input_spec: --model=tests.fixtures.small_model:MODULE is a module, ",
        ),
        (
            "efficientnet_lite0",
            "pretrained",
            {"num_classes": 5},
            "^--num_classes: --weights=pretrained is the shipped ImageNet ",
        ),
    ],
)
def test_options_a_model_does_not_take_are_named(model, weights, options, message):
    """An option the factory does not take, or options for a model that takes none, fail in
    one line naming `--model_option` (never a TypeError, never silently ignored)."""
    with pytest.raises(ValueError, match=message):
        model_load.load(model, weights=weights, options=options)


def test_a_num_classes_option_is_named_by_the_flag_that_gave_it():
    """num_classes from --model_option is named as --model_option's, from --num_classes as
    --num_classes (`check_request`'s num_classes is --num_classes's value)."""
    make = "tests.fixtures.small_model:make"
    with pytest.raises(ValueError, match=f"^--model_option num_classes: --model={make} takes no"):
        model_load.check_request(make, None, None, {"num_classes": 5})
    with pytest.raises(ValueError, match=f"^--num_classes: --model={make} takes no options$"):
        model_load.check_request(make, None, 5, {"num_classes": 5})
    with pytest.raises(ValueError, match="^--model_option num_classes=0: must be a whole number"):
        model_load.check_request("alexnet", None, None, {"num_classes": 0})


SMALL_CNN = "jaxdissect.models.small_cnn:small_cnn"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_classes": 0}, r"^--num_classes=0: must be a whole number >= 1$"),
        ({"num_classes": -1}, r"^--num_classes=-1: must be a whole number >= 1$"),
        ({"num_classes": 2.5}, r"^--num_classes=2.5: must be a whole number >= 1$"),
        (
            {"width": "abc"},
            r"^--model_option width='abc': --model=jaxdissect.models.small_cnn:small_cnn takes width as a number$",
        ),
        (
            {"batch_norm": 3},
            r"^--model_option batch_norm=3: --model=jaxdissect.models.small_cnn:small_cnn takes batch_norm as true or false$",
        ),
    ],
)
def test_options_of_the_wrong_type_are_named(options, message):
    """A class count below 1 or an option of another type than the factory annotates fail
    in one line naming the flag (they were a ZeroDivisionError, a reshape TypeError or a
    TypeError deep in the module), before anything is built."""
    with pytest.raises(ValueError, match=message):
        model_load.check_request(SMALL_CNN, None, options.get("num_classes"), options)
    model_load.check_request(SMALL_CNN, None, 3, {"num_classes": 3, "width": 1})  # int: a number


def _three():
    module = small_model.Small()
    return module, None, module.input_spec


def test_variables_larger_than_the_machine_are_refused_before_any_is_made(monkeypatch):
    """A mistyped width (200 for 2.0: ResNet-18's variables would take 1.6 TiB) is one line
    naming the model and the fix; init sized its arrays and hung before. The limit is this
    machine's memory: a small model under a small limit shows where it cuts, to the byte."""
    with pytest.raises(ValueError, match=r"^--model=resnet18: its variables would take 1,66"):
        model_load.load("resnet18", weights="", options={"width": 200})
    x = jnp.zeros((1, 8, 8, 3))
    module = small_model.Small()
    nbytes = sum(a.nbytes for a in jax.tree.leaves(model_load.init_variables(module, x)))
    monkeypatch.setattr(model_load, "physical_memory_bytes", lambda: nbytes - 1)
    with pytest.raises(model_load.VariablesTooLarge, match="check its options"):
        model_load.init_variables(module, x)
    monkeypatch.setattr(model_load, "physical_memory_bytes", lambda: nbytes)
    got = model_load.init_variables(module, x, seed=3)
    want = module.init(jax.random.key(3), x)  # the same numbers as an init of its own
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(
    ("factory", "what"),
    [
        (_three, "a 3-tuple"),
        (lambda: None, "a NoneType"),
        (lambda: [small_model.Small()], "a list"),
    ],
)
def test_a_factory_giving_no_module_is_named(monkeypatch, factory, what):
    monkeypatch.setattr(small_model, "odd", factory, raising=False)
    with pytest.raises(ValueError, match=f"^--model=tests.fixtures.small_model:odd gave {what};"):
        model_load.load("tests.fixtures.small_model:odd")


class _NeedsWidth(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.width, (3, 3), name="conv1")(x)


class _NnxNeedsRngs(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 4):
        self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)

    def __call__(self, x):
        return self.conv1(x)


@pytest.mark.parametrize(
    ("factory", "missing", "options"),
    [
        (_NeedsWidth, "width", {}),
        (_NnxNeedsRngs, "rngs", {}),
        (_NnxNeedsRngs, "rngs", {"width": 2}),
    ],
)
def test_a_required_parameter_no_option_gives_is_named(monkeypatch, factory, missing, options):
    """A TypeError traceback from the call (an NNX class's signature reads as its
    metaclass's *args, **kwargs, so options were not checked against it either)."""
    monkeypatch.setattr(small_model, "odd", factory, raising=False)
    with pytest.raises(
        ValueError,
        match=f"^--model=tests.fixtures.small_model:odd: missing a required argument: '{missing}'",
    ):
        model_load.load("tests.fixtures.small_model:odd", options=options)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: _NnxNeedsRngs(nnx.Rngs(0)),
        lambda: ((lambda v, x: {"scaled": x * v["w"]}), {"w": jnp.ones(3)}),
    ],
)
@pytest.mark.parametrize("weights", [None, ""])
def test_a_random_init_of_a_model_carrying_its_own_weights_is_refused(
    monkeypatch, factory, weights
):
    """An NNX module or a function ran on the weights its factory gave, as if initialised
    at --seed (a 'random init' baseline that was the model itself)."""
    monkeypatch.setattr(small_model, "odd", factory, raising=False)
    spec = "tests.fixtures.small_model:odd"
    with pytest.raises(
        ValueError,
        match=f"^--weights= means a random init at --seed, but --model={spec} is no Linen",
    ):
        model_load.load(spec, weights=weights, seed=3)
    assert model_load.load(spec, weights="pretrained").name == spec


def test_the_modules_input_spec_is_its_input():
    got = model_load.load("tests.fixtures.small_model:make")
    assert got.input_spec == small_model.Small.input_spec and got.input_spec.size == 64


class _PlainAttribute(nn.Module):
    """The README's other spelling: a class attribute without a field annotation, which
    Linen wraps as a method (an `InputSpec` is callable)."""

    input_spec = InputSpec(32, (0.0,) * 3, (1.0,) * 3, scale=1 / 255)

    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3), name="conv1")(x)


class _NotASpec(_PlainAttribute):
    input_spec = "imagenet"


def test_an_input_spec_class_attribute_is_the_input(monkeypatch):
    from jaxdissect import interventions, training

    want = _PlainAttribute.__dict__["input_spec"].__wrapped__
    assert isinstance(want, InputSpec) and not isinstance(_PlainAttribute().input_spec, InputSpec)
    monkeypatch.setattr(small_model, "plain", _PlainAttribute, raising=False)
    got = model_load.load("tests.fixtures.small_model:plain")
    assert got.input_spec == want and got.input_spec.size == 32
    assert training.training_input_spec(_PlainAttribute(), 48) == dataclasses.replace(want, size=48)
    assert interventions.intervene(_PlainAttribute(), {}).input_spec == want
    monkeypatch.setattr(small_model, "odd", _NotASpec, raising=False)
    with pytest.raises(
        ValueError,
        match="^--model=tests.fixtures.small_model:odd: the model's "
        "input_spec attribute is str, not an InputSpec",
    ):
        model_load.load("tests.fixtures.small_model:odd")


@pytest.mark.parametrize(
    "args, named",
    [
        ((224, (0.5, 0.5), (0.2,) * 3), r"mean=\(0.5, 0.5\)\): three finite numbers"),
        ((224, (0.5,) * 3, (0.2, 0.2, float("nan"))), r"std=\(0.2, 0.2, nan\)\): three"),
        ((224, (0.5,) * 3, (0.2, 0.0, 0.2)), r"std=\(0.2, 0.0, 0.2\)\): each channel's"),
        ((0, (0.5,) * 3, (0.2,) * 3), r"size=0\): a whole number"),
        ((10**30, (0.5,) * 3, (0.2,) * 3), r"size=10{30}\): a whole number of pixels in \[1, 8"),
    ],
)
def test_an_input_spec_that_cannot_normalise_three_channels_is_refused_naming_it(args, named):
    """Two means failed in the dissection's first batch with a broadcasting traceback."""
    with pytest.raises(ValueError, match=f"^InputSpec\\({named}"):
        InputSpec(*args)


@pytest.fixture(scope="module")
def converted_alexnet(tmp_path_factory):
    """A converted AlexNet of 3 classes at width 0.25 (zero weights), as convert.py writes it."""
    from jaxdissect.models.convert import save_variables, variables_template

    path = tmp_path_factory.mktemp("converted") / "alexnet3"
    model = zoo.build("alexnet", num_classes=3, width=0.25)
    meta = {"arch": "alexnet", "num_classes": 3, "options": {"width": 0.25, "dropout": True}}
    save_variables(path, variables_template(model), meta)
    return str(path)


def test_a_damaged_input_size_in_a_converted_meta_is_one_line(converted_alexnet, tmp_path):
    """meta.json's input_size of 10**30 (a damaged export) overflowed in the dry run's
    convolution shapes (a traceback); now one line naming the folder."""
    import json
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(converted_alexnet, folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "input_size": 10**30}))
    with pytest.raises(
        ValueError, match=f"^--weights={folder}: its meta.json's input_size=10{{30}}"
    ):
        model_load.load("alexnet", weights=str(folder))


def test_a_converted_checkpoint_gives_its_classes_and_options(converted_alexnet, tmp_path):
    got = model_load.load("alexnet", weights=converted_alexnet)
    assert got.module.num_classes == 3 and got.module.width == 0.25
    assert got.variables["params"]["classifier"]["6"]["kernel"].shape[-1] == 3
    same = model_load.load("alexnet", weights=converted_alexnet, options={"num_classes": 3})
    assert same.key == got.key
    # The key takes the fingerprint meta.json records (checked by the load), the one a
    # conversion from before it was recorded gets by hashing the variables.
    from jaxdissect.models.convert import META_FILE, VARIABLES_FINGERPRINT

    older = tmp_path / "older"
    shutil.copytree(converted_alexnet, older)
    meta = json.loads((older / META_FILE).read_text())
    del meta[VARIABLES_FINGERPRINT]
    (older / META_FILE).write_text(json.dumps(meta))
    assert model_load.load("alexnet", weights=str(older)).key == got.key


def test_a_converted_checkpoint_refuses_other_classes_in_one_line(converted_alexnet):
    message = (
        f"^--num_classes=1000: --weights={converted_alexnet} was converted with 3 classes; "
        "pass --num_classes=3 or leave it out$"
    )
    with pytest.raises(ValueError, match=message):
        model_load.check_request("alexnet", converted_alexnet, 1000)  # before anything loads
    with pytest.raises(ValueError, match=message):
        model_load.load("alexnet", weights=converted_alexnet, options={"num_classes": 1000})


def test_a_converted_checkpoint_of_another_architecture_names_its_own(converted_alexnet):
    message = (
        f"^--weights={converted_alexnet} holds weights of 'alexnet', not of "
        "--model=efficientnet_lite0: pass --model=alexnet$"
    )
    with pytest.raises(ValueError, match=message):
        model_load.load("efficientnet_lite0", weights=converted_alexnet)


def test_a_converted_checkpoint_that_does_not_fit_the_options_is_one_line(converted_alexnet):
    with pytest.raises(ValueError) as info:
        model_load.load("alexnet", weights=converted_alexnet, options={"width": 0.5})
    message = str(info.value)
    assert message.startswith(f"--weights={converted_alexnet} does not fit --model=alexnet: ")
    assert "shape mismatch: " in message and "\n" not in message


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"options": {"width": 0.25, "colour": 1}}, r"option colour: alexnet takes "),
        ({"options": {"width": "wide"}}, r"option width='wide': alexnet takes width as "),
        ({"num_classes": "3"}, r"num_classes='3': must be a whole number >= 1"),
    ],
)
def test_a_converted_checkpoint_whose_meta_does_not_fit_is_one_line(
    converted_alexnet, tmp_path, meta, message
):
    """A meta.json edited after conversion (options the architecture does not take, or of
    another type) is checked as conversion checked it: the constructor raised a TypeError."""
    path = tmp_path / "edited"
    shutil.copytree(converted_alexnet, path)
    written = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**written, **meta}))
    for check in (
        lambda: model_load.check_request("alexnet", str(path)),
        lambda: model_load.load("alexnet", weights=str(path)),
    ):
        with pytest.raises(ValueError, match=message) as info:
            check()
        text = str(info.value)
        assert text.startswith(f"--weights={path}: its meta.json records ") and "\n" not in text
        assert text.endswith("; convert the weights again")


@pytest.mark.parametrize("name", ["gone.pth", "gone.pth.tar", "gone.safetensors", "gone.ckpt"])
def test_a_missing_weight_file_is_no_such_file(tmp_path, name):
    weights = str(tmp_path / name)
    assert model_load.missing_weights_advice("resnet18", weights, 365) == (
        f"--weights={weights}: no such file"
    )
    with pytest.raises(FileNotFoundError, match=f"^--weights={weights}: no such file$"):
        model_load.check_request("resnet18", weights, 365)


def test_a_missing_directory_gets_the_convert_command(tmp_path):
    weights = str(tmp_path / "ckpt" / "resnet18_places365")
    advice = model_load.missing_weights_advice("resnet18", weights, 365)
    assert advice.endswith(f"--num_classes 365 --input <checkpoint.pth> --output {weights}")


def test_an_option_replacing_a_converted_ones_is_logged(converted_alexnet, caplog):
    """An option that does not change shapes (here `dropout`) may replace the converted
    one, but not silently."""
    with caplog.at_level("WARNING"):
        got = model_load.load("alexnet", weights=converted_alexnet, options={"width": 0.25})
        assert got.module.width == 0.25 and "replaces" not in caplog.text  # the same value
        got = model_load.load("alexnet", weights=converted_alexnet, options={"dropout": False})
    assert got.module.dropout is False
    assert f"--model_option dropout=False replaces what {converted_alexnet} was converted " in (
        caplog.text
    )


def test_pretrained_is_the_weights_a_factory_gives(monkeypatch):
    """The default --weights=pretrained takes a user factory's variables; a factory giving a
    module alone is told to pass --weights (or --weights= for a random init)."""
    model_load.check_request("tests.fixtures.small_model:make", "pretrained")
    got = model_load.load("tests.fixtures.small_model:make", weights="pretrained")
    want = small_model.make()[1]
    assert store.fingerprint_tree(got.variables) == store.fingerprint_tree(want)
    with pytest.raises(
        ValueError,
        match="^--model=tests.fixtures.small_model:Small gives a module "
        "without weights, .*--weights= for a random init",
    ):
        model_load.load("tests.fixtures.small_model:Small", weights="pretrained")
    with pytest.raises(
        ValueError,
        match="^--weights=pretrained is only available offline for .*, or pass --weights= "
        "for a random init",
    ):
        model_load.check_request("resnet18", "pretrained")

    # Any other --weights replaces the factory's: empty is a random init at --seed.
    def seven():
        module = small_model.Small()
        return module, model_load.init_variables(module, jnp.zeros((1, 64, 64, 3)), seed=7)

    monkeypatch.setattr(small_model, "seven", seven, raising=False)
    fingerprint = lambda seed: store.fingerprint_tree(  # noqa: E731
        model_load.load("tests.fixtures.small_model:seven", weights=None, seed=seed).variables
    )
    assert fingerprint(0) == store.fingerprint_tree(want) != fingerprint(7)
    assert fingerprint(7) == store.fingerprint_tree(seven()[1])


def test_a_key_of_no_variable_of_an_own_model_says_torch_rename(tmp_path):
    """A checkpoint key the twin of a user's model has no variable for is refused naming
    it, with the `torch_rename` remedy (a zoo architecture's refusal does not offer it)."""
    import safetensors.numpy

    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    state = {"conv1.weight": z(8, 3, 3, 3), "conv1.bias": z(8), "conv2.weight": z(12, 8, 3, 3)}
    state |= {"conv2.bias": z(12), "head.weight": z(5, 12), "head.bias": z(5), "aux.weight": z(2)}
    path = tmp_path / "twin.safetensors"
    safetensors.numpy.save_file(state, str(path))
    with pytest.raises(ValueError) as refused:
        model_load.load("tests.fixtures.small_model:Small", weights=str(path))
    assert "no model variable (1): ['aux.weight']" in str(refused.value)
    assert str(refused.value).endswith(model_load.OWN_MODEL_MAPPING_ADVICE)
    assert "`torch_rename(key)` static method on the model class" in str(refused.value)


class _Upsampler(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        return nn.ConvTranspose(4, (2, 2), strides=(2, 2), name="up")(x)


def test_torch_weights_onto_an_own_conv_transpose_are_refused(tmp_path, monkeypatch):
    """A ConvTranspose2d weight of equal in/out channels has the shape the conv rule gives a
    Flax ConvTranspose kernel, but not its layout (torch's [in, out, kh, kw], flipped): it
    loaded with no complaint and wrong outputs. Refused naming the layer, unless the class
    maps the file itself."""
    import safetensors.numpy

    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    state = {"conv1.weight": z(4, 3, 3, 3), "conv1.bias": z(4)}
    state |= {"up.weight": z(4, 4, 2, 2), "up.bias": z(4)}
    path = tmp_path / "up.safetensors"
    safetensors.numpy.save_file(state, str(path))
    monkeypatch.setattr(small_model, "Up", _Upsampler, raising=False)
    with pytest.raises(ValueError, match=r"^--weights=.*: .* ConvTranspose at up: torch's"):
        model_load.load("tests.fixtures.small_model:Up", weights=str(path))

    class MapsItself(_Upsampler):
        @staticmethod
        def import_state_dict(state_dict, variables):
            return variables

    monkeypatch.setattr(small_model, "Up", MapsItself)
    assert model_load.load("tests.fixtures.small_model:Up", weights=str(path)).variables


def test_weights_for_a_module_that_carries_its_own_are_refused(tmp_path, monkeypatch):
    """An NNX module (or a function) keeps its own state: a --weights file or folder would
    be dropped without a word, so it is refused."""
    from flax import nnx

    monkeypatch.setattr(
        small_model, "nnx_conv", lambda: nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), raising=False
    )
    weights = tmp_path / "w.npz"
    np.savez(weights, kernel=np.zeros((3, 3, 3, 4), np.float32))
    with pytest.raises(ValueError, match="^--weights=.*w.npz: --model=.*nnx_conv is no Linen"):
        model_load.load("tests.fixtures.small_model:nnx_conv", weights=str(weights))
    got = model_load.load("tests.fixtures.small_model:nnx_conv", weights="pretrained")
    assert got.variables is None  # the module's own state, as built


def test_an_nnx_module_with_a_dropout_loads_keyed_by_its_state(monkeypatch):
    """An NNX Dropout keeps its random stream in the module's state as a typed PRNG key,
    which numpy cannot hold: the load keyed the state through np.asarray and raised
    TypeError."""
    from flax import nnx

    def make(seed):
        def build():
            net = nnx.Sequential(
                nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(seed))
            )
            net.eval()
            return net

        return build

    monkeypatch.setattr(small_model, "nnx_drop0", make(0), raising=False)
    monkeypatch.setattr(small_model, "nnx_drop1", make(1), raising=False)
    a = model_load.load("tests.fixtures.small_model:nnx_drop0", weights="pretrained")
    b = model_load.load("tests.fixtures.small_model:nnx_drop1", weights="pretrained")
    assert a.variables is None and a.key != b.key  # the stream's key is in the key


def test_a_weights_folder_without_meta_names_the_flag(tmp_path):
    """A folder that is no converted checkpoint: the line names --weights (it named the
    path alone)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^--weights=.*empty: .*no meta.json.*convert"):
        model_load.check_request("alexnet", str(tmp_path / "empty"))


@pytest.mark.parametrize("width", [0.0, -1.0, float("nan"), 2.0**26, 1e308])
def test_a_width_that_leaves_no_channel_count_is_one_line(width):
    """Widths under 0 or NaN, or so large that channel counts leave int32 (1e308 raised an
    OverflowError from `int(inf)`), are refused naming width."""
    from jaxdissect.models.layers import scale_channels

    assert (scale_channels(64, 0.25), scale_channels(64, 1e-9)) == (16, 1)
    message = "^" + re.escape(f"width={width}: must be > 0 and keep channel counts under 2**31")
    with pytest.raises(ValueError, match=message):
        scale_channels(64, width)
    with pytest.raises(ValueError, match=message):
        model_load.load("resnet18", options={"width": width})
