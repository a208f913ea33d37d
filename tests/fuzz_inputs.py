"""The hostile-input campaigns of `tests/fuzz_reference.py` (its docstring says what each
checks): damaged or hostile Broden folders, weight files, results.json, converted
checkpoints, TFDS builds, flags and resume checkpoints, each read exactly or refused in
one line."""

from __future__ import annotations

import pathlib
import types
from collections.abc import Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import parallel, results
from jaxdissect.labelspace import LabelSpace

# ------------------------------------------------------------------------------- broden

# What a mutated CSV cell becomes: numbers out of range or malformed, paths that escape or
# cannot exist, separators, other scripts' digits, markup.
HOSTILE_CELLS = (
    *("", "-1", "0", "65536", "1e3", " 12 ", "NaN", "0x10", "999999999999999999999"),
    *("\u0661\u0662", "12\x00", "1;1", "3;;4", "1;999", "0;0", "a;b", '"', "<script>"),
    *("x.png", "../x.png", "/etc/passwd", "ade20k", "train", "val", "test", "32", "16"),
    *("label", "object(3)", "color(1);object(2)", "\u00e9t\u00e9"),
)


def broden_case(seed: int, base: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of one mutation of the Broden folder `base` (a copy of it
    is mutated, opened and read back, then removed)."""
    import csv
    import io
    import random
    import shutil

    from jaxdissect import cli
    from jaxdissect.data.broden import Broden

    rng = random.Random(seed)
    original = Broden.open(base)
    root = base.with_name(f"{base.name}-{seed}")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base, root)
    kind = rng.choice(["csv", "csv", "csv", "png", "jpg"])
    path = rng.choice(sorted(p for p in root.rglob(f"*.{kind}")))
    data = bytearray(path.read_bytes())
    ops = ["change", "insert", "delete", "cut"] + (["line", *["cell"] * 5] if kind == "csv" else [])
    op = rng.choice(ops)
    if op == "change":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == "insert":
        data.insert(rng.randrange(len(data) + 1), rng.choice(b',;\n0123456789-. "\x00a\xff'))
    elif op == "delete":
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 4)]
    elif op == "cut":
        del data[rng.randrange(len(data)) :]
    else:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
        r = rng.randrange(len(rows))
        if op == "line":
            rows.insert(r, rows[r])
        elif rows[r]:
            c = rng.randrange(len(rows[r]))
            rows[r][c] = rng.choice(HOSTILE_CELLS)
            op = f"cell {r},{c} = {rows[r][c]!r}"
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        data = bytearray(text.getvalue().encode())
    path.write_bytes(bytes(data))
    desc = f"{op} in {path.relative_to(root)}"
    try:
        source = Broden.open(root)
        for i in range(len(source)):
            source.read_image(i)
            labels = source.read_labels(i)
            # A damaged label PNG is read exactly or refused, never as other labels (a
            # damaged JPEG or CSV cell may read as other values: they carry no checksum).
            if kind == "png" and not all(
                np.array_equal(x, y) for x, y in zip(labels, original.read_labels(i), strict=True)
            ):
                return desc, [f"image {i}'s labels read, changed, without an error"]
        return desc, []
    except UnicodeDecodeError as e:  # a ValueError, but says nothing of the file
        return desc, [f"UnicodeDecodeError: {e}"]
    except cli.USER_ERRORS as e:
        named = str(path) in str(e) or path.name in str(e)
        return desc, [] if named else [f"{type(e).__name__} names no file: {e}"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def broden_base(work: pathlib.Path) -> pathlib.Path:
    """The tiny Broden the broden cases mutate: 8 images of 32 px, every category."""
    from jaxdissect.data import synthetic

    return synthetic.generate_tiny(work / "broden", num_images=8, size=32)


# ------------------------------------------------------------------------------ weights


def weights_bases(work: pathlib.Path) -> list[pathlib.Path]:
    """Small weight files of every format `checkpoint_io` and `npz_file` read, in `work`."""
    import torch
    from safetensors.torch import save_file

    from tests.model_testing import torchscript_save

    generator = torch.Generator().manual_seed(0)
    state = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "bn.running_mean": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(3),
        "fc.weight": torch.randn(2, 4, generator=generator).half(),
        "fc.bias": torch.randn(2, generator=generator).to(torch.bfloat16),
        "strided": torch.randn(6, 4, generator=generator)[::2],
    }
    work.mkdir(parents=True, exist_ok=True)
    torch.save(state, work / "zip.pth")
    torch.save(state, work / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": state, "epoch": 3, "arch": "resnet18"}, work / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(work / "st.safetensors"))
    np.savez(work / "w.npz", **{k: v.float().numpy() for k, v in state.items()})
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(module, work / "whole.pth")
    torch.save(module, work / "whole_legacy.pth", _use_new_zipfile_serialization=False)
    torchscript_save(module.eval(), torch.zeros(1, 3, 5, 5), work / "script.pt")
    names = ("zip.pth", "legacy.pth", "wrapped.pth", "st.safetensors", "w.npz", "whole.pth")
    return [work / n for n in (*names, "whole_legacy.pth", "script.pt")]


def weights_case(seed: int, bases: list[pathlib.Path]) -> tuple[str, list[str]]:
    """(description, failures) of one mutated copy of one of `bases` (removed after)."""
    import io
    import random
    import zipfile

    from jaxdissect.models import checkpoint_io, npz_file

    rng = random.Random(seed)
    base = rng.choice(bases)
    data = bytearray(base.read_bytes())
    op = rng.choice(["change", "change", "insert", "delete", "cut", "member"])
    if op == "change":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == "insert":
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    elif op == "delete":
        at = rng.randrange(len(data))
        del data[at : at + rng.randint(1, 8)]
    elif op == "cut":
        del data[rng.randrange(len(data)) :]
    elif zipfile.is_zipfile(base):  # a valid zip whose one member's bytes are corrupt
        out = io.BytesIO()
        with zipfile.ZipFile(base) as old, zipfile.ZipFile(out, "w") as new:
            victim = rng.choice(old.namelist())
            for name in old.namelist():
                member = bytearray(old.read(name))
                if name == victim and member:
                    for _ in range(rng.randint(1, 3)):
                        member[rng.randrange(len(member))] = rng.randrange(256)
                    if rng.random() < 0.3:
                        del member[rng.randrange(len(member)) :]
                new.writestr(name, bytes(member))
        data, op = bytearray(out.getvalue()), f"member {victim}"
    path = base.with_name(f"m{seed}{base.suffix}")
    path.write_bytes(bytes(data))
    desc = f"{op} of {base.name}"
    load = npz_file.load_npz if base.suffix == ".npz" else checkpoint_io.load_state_dict
    try:
        load(path)
        return desc, []
    except checkpoint_io.CheckpointError as e:
        return desc, [] if str(e).startswith(f"{path}: ") else [f"names no file: {e}"]
    finally:
        path.unlink()


# ---------------------------------------------------------------------------- results_json

# What a mutated results.json field becomes.
HOSTILE_VALUES = (None, "x", "", -1, 0, 3.5, 1e308, True, [], [1, 2], {}, {"a": 1})


def results_json_run(work: pathlib.Path) -> tuple[pathlib.Path, LabelSpace]:
    """A finished run's folder as the scripts built on one read it: results.json of two
    layers (written by `results.write_results_json` with the settings the pipeline writes)
    and their stats npz."""
    from jaxdissect import store

    rng = np.random.default_rng(0)
    labels = LabelSpace(
        ("color", "object", "scene"),
        ("-", "red-c", "sky", "car", "street-s"),
        np.array([-1, 0, 1, 1, 2], np.int32),
        (False, False, True),
    )
    layers = []
    for name, k in (("conv1", 3), ("top", 4)):
        inter = rng.integers(0, 50, (k, 5))
        counts = {
            "intersection": inter,
            "label_pixels": np.full(5, 100),
            "unit_pixels": np.full((k, 3), 100),
            "unit_total": np.full(k, 100),
            "images": np.int64(10),
        }
        layers.append(results.layer_result(name, counts, labels, path=f"Net/{name}"))
    settings = {
        "model": "small",
        "model_key": "k",
        "dataset": "tiny",
        "tie_rule": "strict",
        "layers": ["conv1", "top"],
        "layer_paths": {"conv1": "Net/conv1", "top": "Net/top"},
        "input_spec": {"size": 32, "mean": [0, 0, 0], "std": [1, 1, 1], "scale": 1.0, "bgr": False},
    }
    out = work / "run"
    out.mkdir(parents=True, exist_ok=True)
    results.write_results_json(out / "results.json", layers, settings)
    for stem, layer in zip(results.layer_file_stems(settings["layers"]), layers, strict=True):
        thresholds = np.ones(layer.num_units, np.float32)
        store.save_arrays(out / results.stats_npz_name(stem), {"thresholds": thresholds})
    return out, labels


def _json_paths(value: object, prefix: tuple = ()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _json_paths(v, (*prefix, i))


def results_json_case(seed: int, run: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of one structural mutation of `run`'s results.json (a field
    deleted, replaced by a value of another type, added, or an element repeated), with its
    checksum or without one, read by every reader of a finished run: each raises a user
    error naming the file or reads, with a checksum, what was written."""
    import copy
    import json
    import random
    import shutil

    from jaxdissect import cli, finished, pipeline, studies

    rng = random.Random(seed)
    document = json.loads((run / "results.json").read_text())
    checked = rng.random() < 0.5  # else a file without the checksum (or one crafted anew)
    if not checked:
        del document["checksum"]
    path = rng.choice([p for p in _json_paths(document) if p])
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    op = rng.choice(["delete", "value", "value", "add", "repeat"])
    target = parent[path[-1]]
    if op == "delete":
        del parent[path[-1]]
    elif op == "value":
        parent[path[-1]] = rng.choice(HOSTILE_VALUES)
    elif op == "add" and isinstance(target, dict):
        target[rng.choice(["zz", "mean", "layer", "units", "size"])] = rng.choice(HOSTILE_VALUES)
    elif op == "add" and isinstance(target, list):
        target.append(rng.choice(HOSTILE_VALUES))
    elif isinstance(target, list) and target:
        target.append(copy.deepcopy(target[0]))
    else:
        parent[path[-1]] = [target]
    desc = f"{op} at {'.'.join(map(str, path))}{'' if checked else ', no checksum'}"
    out = run.with_name(f"{run.name}-{seed}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run, out)
    (out / "results.json").write_text(json.dumps(document))

    def readers(folder: pathlib.Path) -> dict:
        return {
            "read_layer": lambda: [finished.read_layer(folder, name) for name in ("conv1", "top")],
            "results_rows": lambda: studies.results_rows("x", folder),
            "results_rows of top": lambda: studies.results_rows("x", folder, ["top"]),
            "results_method": lambda: studies.results_method(folder),
            "probe_set": lambda: studies.probe_set(folder),
            "follow-ons' digest": lambda: pipeline._finished_digest(folder, ["conv1", "top"]),
        }

    intact = {name: repr(read()) for name, read in readers(run).items()}
    failures = []
    try:
        for name, read in readers(out).items():
            try:
                got = repr(read()).replace(str(out), str(run))
            except cli.USER_ERRORS as e:
                if "results.json" not in str(e) and str(out) not in str(e):
                    failures.append(f"{name}: {type(e).__name__} names no file: {e}")
            except Exception as e:  # any other is the finding
                failures.append(f"{name}: {type(e).__name__}: {e}")
            else:  # (a digest is a key: one of other content, or none, is the right one)
                if checked and got != intact[name] and name != "follow-ons' digest":
                    failures.append(f"{name}: read other values than the file's as written")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return desc, failures


# ---------------------------------------------------------------------------- converted


def converted_base(work: pathlib.Path) -> pathlib.Path:
    """A converted ResNet-18 of 3 classes (zero weights), as models/convert.py writes it."""
    from jaxdissect.models import zoo
    from jaxdissect.models.convert import save_variables, variables_template

    meta = {"arch": "resnet18", "num_classes": 3, "options": {}, "input_size": 32}
    save_variables(
        work / "resnet18", variables_template(zoo.build("resnet18", num_classes=3)), meta
    )
    return work / "resnet18"


def converted_case(seed: int, base: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of one mutation of `base`'s meta.json, loaded as
    `--model=resnet18 --weights=<copy>` (the copy removed after)."""
    import json
    import random
    import shutil

    from jaxdissect import cli
    from jaxdissect.models import load as model_load

    rng = random.Random(seed)
    meta = json.loads((base / "meta.json").read_text())
    key = rng.choice([*meta, "options.x", "options.width", "options.dtype", "extra"])
    value = rng.choice((*HOSTILE_VALUES, "resnet18", "alexnet", 10**30))
    if key.startswith("options."):
        meta["options"] = meta["options"] if isinstance(meta.get("options"), dict) else {}
        meta["options"][key[8:]] = value
        desc = f"{key} = {value!r}"
    elif rng.random() < 0.3:
        meta.pop(key, None)
        desc = f"{key} deleted"
    else:
        meta[key], desc = value, f"{key} = {value!r}"
    folder = base.with_name(f"{base.name}-{seed}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    try:
        model_load.load("resnet18", weights=str(folder))
        return desc, []
    except cli.USER_ERRORS as e:
        names = (str(folder), "option", "num_classes", f"{key.removeprefix('options.')}=")
        named = any(text in str(e) for text in names)
        return desc, [] if named else [f"{type(e).__name__} names no file or option: {e}"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------- tfds


def tfds_base(work: pathlib.Path) -> pathlib.Path:
    """A TFDS build of a tiny synthetic Broden (6 images of 32 px)."""
    from jaxdissect.data import synthetic, tfds_broden

    root = synthetic.generate_tiny(work / "broden-for-tfds", num_images=6, size=32)
    return tfds_broden.build(root, work / "tfds")


def tfds_case(seed: int, build: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of one mutation of a copy of `build`, opened and read."""
    import json
    import random
    import shutil

    from jaxdissect import cli
    from jaxdissect.data import tfds_broden

    rng = random.Random(seed)
    copy = build.parent / f"copy-{seed}" / build.name
    shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.copytree(build, copy)
    path = copy / rng.choice(sorted(p.name for p in build.iterdir() if p.is_file()))
    if path.suffix == ".json" and rng.random() < 0.7:
        document = json.loads(path.read_text())
        where = rng.choice([p for p in _json_paths(document) if p])
        parent = document
        for key in where[:-1]:
            parent = parent[key]
        if rng.random() < 0.3:
            del parent[where[-1]]
            desc = f"{'.'.join(map(str, where))} deleted in {path.name}"
        else:
            parent[where[-1]] = rng.choice(HOSTILE_VALUES)
            desc = f"{'.'.join(map(str, where))} = {parent[where[-1]]!r} in {path.name}"
        path.write_text(json.dumps(document))
    else:
        data = bytearray(path.read_bytes())
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            desc = f"bytes changed in {path.name}"
        else:
            del data[rng.randrange(len(data)) :]
            desc = f"{path.name} cut"
        path.write_bytes(bytes(data))
    try:
        source = tfds_broden.TfdsBroden(copy)
        for i in range(len(source)):
            source[i]
            source.read_labels(i)
        return desc, []
    except cli.USER_ERRORS as e:
        return desc, [] if str(copy) in str(e) else [f"{type(e).__name__} names no build: {e}"]
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


# -------------------------------------------------------------------------------- flags

FLAG_VALUES = (
    *("", "0", "-1", "1", "2", "0.5", "1.5", "1e308", "nan", "inf", "-inf", "99999999999999999999"),
    *(
        "x",
        "a,b",
        ",",
        "=",
        "true",
        "none",
        "/nonexistent",
        "..",
        "~",
        "conv1",
        "top,top",
        "\u00e9",
    ),
)
# Flags left alone: one a process acts on before any JAX call, and absl's own.
_FLAGS_LEFT = ("distributed", "flagfile", "undefok", "only_check_args", "v", "verbosity")


class _Stopped(Exception):
    """Raised in place of the dissection: the flags were taken."""


def flags_case(seed: int, data: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of dissect.py run (in this process) with one or two of its
    flags at hostile values, the dissection itself replaced by a stop."""
    import random

    from absl import flags

    from jaxdissect import cli, pipeline
    from tests.experiment_testing import script

    dissect = script("dissect")
    fv = flags.FlagValues()
    dissect.define_flags(fv)
    own = sorted(n for n in fv.flag_values_dict() if n not in _FLAGS_LEFT)
    rng = random.Random(seed)
    picks = [(rng.choice(own), rng.choice(FLAG_VALUES)) for _ in range(rng.randint(1, 2))]
    desc = " ".join(f"--{n}={v!r}" for n, v in picks)
    base = [f"--data={data}", "--model=tests.fixtures.small_model:make", "--weights="]
    base += ["--noprogress", "--noreport", "--devices=1", "--batch_size=4"]
    base += [f"--output_dir={data.parent / f'flags-out-{seed}'}"]
    try:
        fv(["prog", *base, *(f"--{n}={v}" for n, v in picks)])
    except flags.Error:
        return desc, []  # absl's refusal: one line and the usage hint
    dissect_before = pipeline.dissect

    def stop(*args, **kwargs):
        raise _Stopped

    pipeline.dissect = stop
    try:
        cli.script_main(lambda: dissect.run(fv), fv, split_cpu=False)(["prog"])
        return desc, []
    except _Stopped:
        return desc, []
    except SystemExit as e:
        text = str(e.code).strip()
        return desc, [] if "\n" not in text else [f"several lines: {text[:300]}"]
    finally:
        pipeline.dissect = dissect_before


# --------------------------------------------------------------------------- checkpoint


def _damaged_copy(
    folder: pathlib.Path, seed: int, candidates: Callable[[pathlib.Path], Iterable[pathlib.Path]]
) -> tuple[pathlib.Path, str]:
    """(copy, description): a copy of the checkpoint `folder` with one of the files
    `candidates(copy)` yields changed in 1-3 bytes, or cut, as `seed` draws."""
    import random
    import shutil

    rng = random.Random(seed)
    copy = folder.with_name(f"{folder.name}-{seed}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    path = rng.choice(sorted(p for p in candidates(copy) if p.is_file()))
    data = bytearray(path.read_bytes())
    if data and rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        desc = f"bytes changed in {path.relative_to(copy)}"
    else:
        del data[rng.randrange(max(len(data), 1)) :]
        desc = f"{path.relative_to(copy)} cut"
    path.write_bytes(bytes(data))
    return copy, desc


def checkpoint_base(work: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """(folder, state): a `StreamCheckpoint` of a small state on 8 devices after batch 3."""
    from jaxdissect.checkpoint import StreamCheckpoint

    mesh = parallel.data_mesh()
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = {
        "counts": jax.device_put(jnp.arange(8 * 64, dtype=jnp.int32).reshape(8, 64), sharded),
        "values": jax.device_put(jnp.linspace(0, 1, 8 * 16).reshape(8, 16), sharded),
    }
    checkpoint = StreamCheckpoint(work / "checkpoint", every=1)
    checkpoint.maybe_save(3, state)
    checkpoint.close()
    return work / "checkpoint", state


def checkpoint_case(seed: int, base: tuple[pathlib.Path, dict]) -> tuple[str, list[str]]:
    """(description, failures) of one damaged copy of the checkpoint `base`, restored."""
    import shutil

    from jaxdissect.checkpoint import StreamCheckpoint

    folder, state = base
    copy, desc = _damaged_copy(
        folder, seed, lambda c: (p for p in c.rglob("*") if not p.name.startswith("digest"))
    )
    try:
        checkpoint = StreamCheckpoint(copy, every=1)
    except ValueError as e:  # orbax cannot open it: one line naming the folder
        first = str(e).splitlines()[0]
        return desc, [] if str(copy) in first and "\n" not in str(e) else [f"error: {e}"]
    try:
        got, step = checkpoint.restore(state)
        if step and any(not np.array_equal(got[k], state[k]) for k in state):
            return desc, ["restored other numbers"]
        return desc, []
    finally:
        checkpoint.close()
        shutil.rmtree(copy, ignore_errors=True)


# ---------------------------------------------------------------------- train_checkpoint


@flax.struct.dataclass
class _TrainState:
    step: jax.Array
    params: dict


_TRAIN_CONFIG = types.SimpleNamespace(checkpoint_every=5, keep_checkpoints=2, save_steps=())


def train_checkpoint_base(work: pathlib.Path) -> tuple[pathlib.Path, dict[int, _TrainState]]:
    """(folder, state by step): a training run's checkpoints (`training_checkpoints`) of a
    small state at steps 5 and 10, each with unlogged train metrics."""
    from jaxdissect import training_checkpoints

    states = {
        step: _TrainState(
            step=jnp.asarray(step, jnp.int32),
            params={"w": jnp.linspace(0, 1, 96).reshape(8, 12) * step, "b": jnp.arange(12.0)},
        )
        for step in (5, 10)
    }
    folder = work / "train_checkpoints"
    manager = training_checkpoints.checkpoint_manager(folder, _TRAIN_CONFIG)
    for step, state in states.items():
        metrics = [{"loss": np.float32(step), "accuracy": np.float32(0.5)}]
        training_checkpoints.save_state(manager, state, _train_rows(step), metrics)
    manager.close()
    return folder, states


def _train_rows(step: int) -> list[dict[str, float]]:
    """The metrics rows the campaign's checkpoint of `step` keeps."""
    return [{"step": float(s), "train_loss": s / 7} for s in range(0, step + 1, 5)]


def train_checkpoint_case(
    seed: int, base: tuple[pathlib.Path, dict[int, _TrainState]]
) -> tuple[str, list[str]]:
    """(description, failures) of one damaged copy of the step-10 checkpoint, resumed: the
    step-10 state, or (it deleted) the step-5 one, or one line naming the folder."""
    import shutil

    from jaxdissect import training_checkpoints

    folder, states = base
    copy, desc = _damaged_copy(folder, seed, lambda c: (c / "10").rglob("*"))
    try:
        manager = training_checkpoints.checkpoint_manager(copy, _TRAIN_CONFIG)
    except ValueError as e:  # orbax cannot open it: one line naming the folder
        ok = str(copy) in str(e) and "\n" not in str(e)
        return desc, [] if ok else [f"error: {e}"]
    try:
        template = jax.tree.map(jnp.zeros_like, states[5])
        got = training_checkpoints.restore_state(manager, template)
        if got is None:
            return desc, ["nothing restored: the step-5 checkpoint was intact"]
        want = states[int(got.step)]
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got, want)
        pending = training_checkpoints.restore_pending(manager, int(got.step))
        rows = training_checkpoints.restore_rows(manager, int(got.step))
        if (
            not all(jax.tree.leaves(same))
            or [float(m["loss"]) for m in pending] != [float(got.step)]
            or rows != _train_rows(int(got.step))
        ):
            return desc, [f"restored other numbers (step {int(got.step)})"]
        return desc, []
    finally:
        manager.close()
        shutil.rmtree(copy, ignore_errors=True)
