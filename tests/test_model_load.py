"""`models.load` names user models through `models.zoo.factory`, its errors naming `--model`."""

import pytest

from jaxdissect.models import load as model_load
from jaxdissect.models import zoo
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
            "^--model_option wdth: --model=resnet18 takes num_classes, width, batch_norm, input_spec$",
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


def _three():
    module = small_model.Small()
    return module, None, module.input_spec


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


def test_the_modules_input_spec_is_its_input():
    got = model_load.load("tests.fixtures.small_model:make")
    assert got.input_spec == small_model.Small.input_spec and got.input_spec.size == 64
