"""Keys cover every argument; writes are atomic; stages are complete only when marked."""

import json
import os
import stat

import numpy as np
import pytest

from jaxdissect import store


def test_key_depends_on_every_part_not_on_order():
    base = dict(stage="pass1", layer="layer4", settings={"quantile": 0.005, "mode": "sketch"})
    k = store.key_of(**base)
    assert k == store.key_of(
        settings={"mode": "sketch", "quantile": 0.005}, layer="layer4", stage="pass1"
    )
    assert k != store.key_of(**{**base, "layer": "layer3"})
    assert k != store.key_of(**{**base, "settings": {"quantile": 0.01, "mode": "sketch"}})


def test_fingerprint_tree_sees_every_byte():
    tree = {"a": np.zeros((2, 3), np.float32), "b": {"c": np.arange(4)}}
    f = store.fingerprint_tree(tree)
    changed = {"a": tree["a"].copy(), "b": tree["b"]}
    changed["a"][1, 2] = 1e-30
    assert f != store.fingerprint_tree(changed)
    assert f != store.fingerprint_tree({"a": tree["a"].astype(np.float64), "b": tree["b"]})


def test_fingerprint_tree_reads_a_typed_prng_key_as_its_data():
    """An NNX module's state holds its Rngs and Dropout streams as typed keys (README:
    `store.fingerprint_tree(nnx.state(net))`); np.asarray of one raises TypeError."""
    import jax

    f = store.fingerprint_tree({"rng": jax.random.key(0), "w": np.zeros(2)})
    assert f != store.fingerprint_tree({"rng": jax.random.key(1), "w": np.zeros(2)})


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), store.atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_stage_done_only_after_marker(tmp_path):
    stage = store.Stage(tmp_path, "pass2", store.key_of(layer="x"))
    store.save_arrays(stage.path("arrays.npz"), {"counts": np.arange(3, dtype=np.int64)})
    assert not stage.done  # arrays written, marker not: a crash here leaves it incomplete
    stage.mark_done({"layer": "x"})
    assert stage.done
    np.testing.assert_array_equal(store.load_arrays(stage.path("arrays.npz"))["counts"], [0, 1, 2])


def test_damaged_arrays_are_one_error_naming_the_file(tmp_path):
    path = tmp_path / "stats.npz"
    store.save_arrays(path, {"x": np.arange(1000)})
    whole = path.read_bytes()
    close = whole.index(b"}", whole.index(b"'shape'"))  # a member's .npy header, unclosed:
    unclosed = whole[:close] + b"(" + whole[close + 1 :]  # numpy's tokenizer raised past us
    for damaged in (whole[:100], whole[:-40], b"not an npz", unclosed):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"^{path}: not readable arrays"):
            store.load_arrays(path)
    with pytest.raises(FileNotFoundError):
        store.load_arrays(tmp_path / "none.npz")


def test_a_json_object_read_back_or_one_error_naming_the_file(tmp_path):
    path = tmp_path / "settings.json"
    store.write_json(path, {"a": [1, 2]})
    assert store.read_json_object(path, "fix it") == {"a": [1, 2]}
    for damaged, problem in [
        (b'{"a": [1', r"not readable JSON \("),
        (b"\xff\xfe{}", r"not readable JSON \("),  # not UTF-8
        (b"[1, 2]", r"holds list, not a JSON object"),
    ]:
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"^{path}: {problem}.*; fix it$"):
            store.read_json_object(path, "fix it")
    with pytest.raises(FileNotFoundError):
        store.read_json_object(tmp_path / "none.json", "fix it")


def test_a_json_object_with_a_checksum_is_read_back_only_with_its_values(tmp_path):
    """The checksum covers the values, not the layout; `checked` readers refuse a file
    whose values changed, and read one written without a checksum as it is."""
    path = tmp_path / "out.json"
    document = {"b": [1, 2.5, None], "a": {"x": "é", "y": True}}
    store.write_json(path, document, checksum=True)
    written = store.read_json_object(path, "fix it", checked=True)
    assert written == {**document, "checksum": store.json_checksum(document)}
    path.write_text(json.dumps(written, sort_keys=True))  # laid out anew: the same values
    assert store.read_json_object(path, "fix it", checked=True) == written
    for changed in ({**written, "b": [1, 2.5000001, None]}, {**written, "c": 0}):
        path.write_text(json.dumps(changed))
        assert store.read_json_object(path, "fix it") == changed  # (not checked)
        with pytest.raises(ValueError, match=rf"^{path}: its checksum is not that of its "):
            store.read_json_object(path, "fix it", checked=True)
    store.write_json(path, document)
    assert store.read_json_object(path, "fix it", checked=True) == document


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_of_the_processs_umask_now(tmp_path, umask):
    # mkstemp makes 0600 files; results must get the mode any file the user writes gets,
    # under the umask of the moment (the parameters change it within one process).
    old = os.umask(umask)
    try:
        store.write_json(tmp_path / "results.json", {"a": 1})
        store.save_arrays(tmp_path / "stats.npz", {"x": np.zeros(2)})
        (tmp_path / "mine").write_text("")
        for name in ("results.json", "stats.npz", "mine"):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name
    finally:
        os.umask(old)


def test_atomic_open_writes_utf8_or_bytes_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    with store.atomic_open(target, newline="") as f:
        f.write("caf\u00e9\r\n")
    assert target.read_bytes() == "caf\u00e9\r\n".encode()
    with pytest.raises(RuntimeError), store.atomic_open(target) as f:
        f.write("partial")
        raise RuntimeError("killed")
    assert target.read_bytes() == "caf\u00e9\r\n".encode()
    with store.atomic_open(target, "wb") as f:
        f.write(b"\x00\xff")
    assert target.read_bytes() == b"\x00\xff"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert store.write_text(tmp_path / "t.txt", "\u00e9") == tmp_path / "t.txt"
    assert (tmp_path / "t.txt").read_bytes() == "\u00e9".encode()
