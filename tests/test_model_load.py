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
