"""Flags from the settings dataclasses, one-line errors, the output_dir checks and lock."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import logging as pylogging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import pytest
from absl import flags

from jaxdissect import cli, config, engine, outdir, parallel, pipeline, store, training
from jaxdissect.models import load as model_load
from tests.experiment_testing import DISSECT_IMPORTS, QUICK, ScriptProcesses, parse, script

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Demo:
    """A demo.

    Attributes:
      mode: how,
        over two lines.
      a, b: two numbers.
      names: some names.
      workers: processes.
    """

    mode: str = config.setting("x", choices=("x", "y"))
    a: int = 1
    b: float | None = None
    names: tuple[str, ...] | None = None
    workers: int = config.setting(0, flag="demo_workers")

    def __post_init__(self):
        config.check_choices(self)
        if self.workers < 0:
            raise ValueError(f"workers={self.workers}: must be >= 0")


def test_attribute_docs_reads_shared_and_continued_entries():
    docs = config.attribute_docs(Demo)
    assert docs == {
        "mode": "how, over two lines.",
        "a": "two numbers.",
        "b": "two numbers.",
        "names": "some names.",
        "workers": "processes.",
    }


def test_flags_come_from_the_fields():
    fv = flags.FlagValues()
    cli.define_dataclass_flags(Demo, fv, defaults={"a": 5})
    fv(["prog"])
    assert fv["mode"].help == "<x|y>: how, over two lines." and fv["a"].default == 5
    assert cli.from_flags(Demo, fv) == Demo(a=5)
    fv(["prog", "--mode=y", "--b=0.5", "--names=p,q", "--demo_workers=2"])
    assert cli.from_flags(Demo, fv) == Demo("y", 5, 0.5, ("p", "q"), 2)
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["prog", "--mode=z"])  # an enum: absl refuses it while parsing
    fv(["prog", "--demo_workers=-1"])
    # The library names the parameter; the message the user reads names the flag.
    with pytest.raises(ValueError, match=r"^--demo_workers=-1: must be >= 0$"):
        cli.from_flags(Demo, fv)
    with pytest.raises(ValueError, match="no fields"):
        cli.define_dataclass_flags(Demo, flags.FlagValues(), defaults={"nope": 1})


def test_every_settings_field_has_a_documented_flag():
    for cls in (engine.Settings, pipeline.Options, training.TrainConfig, cli.Probe):
        fv = flags.FlagValues()
        cli.define_dataclass_flags(cls, fv)  # raises for a field without help
        fv(["prog"])
        assert cli.from_flags(cls, fv) == cls()  # defaults: the dataclass's, one definition


def test_library_errors_name_parameters_and_the_cli_the_flags():
    fv = flags.FlagValues()
    cli.define_dataclass_flags(engine.Settings, fv)
    cli.define_dataclass_flags(pipeline.Options, fv)
    for argv, message in [
        (["--quantile=1"], r"^--quantile=1.0: must be in \(0, 1\)"),
        (["--iou_threshold=2"], r"^--iou_threshold=2.0: must be in \[0, 1\)"),
        (["--top_images=0"], "^--top_images=0: must be >= 1$"),
        # Seeds numpy's and JAX's generators take (2**64 raised an OverflowError in a pass).
        (["--seed=18446744073709551616"], r"^--seed=18446744073709551616: must be < 2\*\*63$"),
        (["--significance_seed=-1"], "^--significance_seed=-1: must be >= 0$"),
        (["--sketch_size=32"], "^--sketch_size=32: must be a multiple of 32 and >= 64$"),
        (
            ["--sketch_size=64", "--quantile_mode=exact"],
            "^--sketch_size=64: sizes the sketch, which --quantile_mode='exact' does not use",
        ),
        (
            ["--quantile_mode=histogram", "--activation_dtype=float32"],
            "needs --activation_dtype='float16' or 'bfloat16' .got --activation_dtype='float32', "
            "--threshold_on='raw'.$",
        ),
    ]:
        fv(["prog", *argv])
        with pytest.raises(ValueError, match=message):
            cli.settings_from_flags(fv)
        fv.unparse_flags()
    fv(["prog", "--loader_workers=-1"])
    with pytest.raises(ValueError, match="^--loader_workers=-1: must be >= 0$"):
        cli.options_from_flags(fv)
    with pytest.raises(ValueError, match="^num_workers=-1"):
        pipeline.Options(num_workers=-1)
    fv.unparse_flags()
    for argv, message in [
        (["--cache_budget_bytes=-5"], "^--cache_budget_bytes=-5: must be >= 0"),  # no cache fits
        (["--noreport", "--runners_up=5"], "^--runners_up=5: only the report uses it"),  # ignored
    ]:
        fv(["prog", *argv])
        with pytest.raises(ValueError, match=message):
            cli.options_from_flags(fv)
        fv.unparse_flags()
    assert cli.flag_message("num_threads=3; quantile=0.5, --quantile=1", fv) == (
        "--loader_threads=3; --quantile=0.5, --quantile=1"
    )
    # A layout refusal in a script without --token_layout says where else to give one.
    layout = "layer 'b' has 69 tokens: ... name the layout, e.g. token_layout='5+8x8'"
    assert cli.flag_message(layout, fv) == (
        f"{layout}; this script has no --token_layout: declare a `token_layout` attribute on "
        "the model (README: Vision Transformers)"
    )
    finished = flags.FlagValues()
    cli.define_finished_dissection_flags(finished)
    assert "dissect with experiments/dissect.py --token_layout first, or declare a " in (
        cli.flag_message(layout, finished)
    )
    path = "--data=/tmp/quantile=1/split=val: no such folder"  # a path is not rewritten
    assert cli.flag_message(path, fv) == path
    with pytest.raises(ValueError, match="^resolution=8: a synthetic Broden's side must be >= 16"):
        cli.Probe(resolution=8)  # before any generation (the generator's own check is later)
    cli.Probe(data="/some/folder", resolution=8)  # a folder's images are resized to the model
    cli.define_devices_flag(fv)
    with pytest.raises(ValueError, match="^num_devices=9 but 8 devices are visible") as e:
        parallel.data_mesh(9)
    assert cli.flag_message(str(e.value), fv).startswith("--devices=9 but 8 devices")
    with pytest.raises(ValueError, match="^batch_size=12 is not divisible") as e:
        parallel.check_batch_size(12, parallel.data_mesh(8))
    assert cli.flag_message(str(e.value), fv).startswith("--batch_size=12 is not divisible")


def test_user_errors_are_one_line_with_the_traceback_at_verbosity_1(caplog):
    def run():
        raise ValueError("quantile=2: must be in (0, 1)")

    fv = flags.FlagValues()
    cli.define_dataclass_flags(engine.Settings, fv)
    fv(["prog"])
    with caplog.at_level(pylogging.DEBUG), pytest.raises(SystemExit) as e:
        cli.script_main(run, fv, split_cpu=False)(["prog"])
    assert str(e.value.code) == "error: --quantile=2: must be in (0, 1)"
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.levelno == pylogging.DEBUG and "in run" in caplog.text


def test_jax_64_bit_mode_is_one_line_before_the_run(monkeypatch):
    ran = []
    main = cli.script_main(lambda: ran.append(1), flags.FlagValues(), split_cpu=False)
    with jax.enable_x64(True), pytest.raises(SystemExit) as e:
        main(["prog"])
    assert str(e.value.code).startswith("error: JAX_ENABLE_X64 is set") and not ran


def test_a_cache_folder_that_cannot_be_written_is_one_line_before_the_run(tmp_path, monkeypatch):
    """JAXDISSECT_CACHE (or its default under $HOME) that cannot be created or written:
    every script stops first in one line naming it (PermissionError traceback before, from
    the first cached file)."""
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    ran = []
    main = cli.script_main(lambda: ran.append(1), flags.FlagValues(), split_cpu=False)
    monkeypatch.setenv("JAXDISSECT_CACHE", str(afile / "cache"))
    with pytest.raises(SystemExit) as e:
        main(["prog"])
    assert str(e.value.code) == (
        f"error: JAXDISSECT_CACHE={afile / 'cache'}: {afile} is a file, not a folder: set "
        "JAXDISSECT_CACHE to a folder you can write to"
    )
    monkeypatch.delenv("JAXDISSECT_CACHE")
    monkeypatch.setenv("HOME", str(afile))
    with pytest.raises(SystemExit) as e:
        main(["prog"])
    assert str(e.value.code).endswith("folder you can write to (unset, it is ~/.cache/jaxdissect)")
    assert not ran
    monkeypatch.setattr(cli.os, "access", lambda path, mode: path != tmp_path)
    monkeypatch.setenv("JAXDISSECT_CACHE", str(tmp_path / "new" / "cache"))
    with pytest.raises(SystemExit) as e:  # root may write anywhere: a refusal simulated
        main(["prog"])
    assert str(e.value.code).startswith(
        f"error: JAXDISSECT_CACHE={tmp_path / 'new' / 'cache'}: {tmp_path} is not writable: "
    )
    monkeypatch.undo()
    if os.path.isdir("/proc/self"):  # Linux: a folder root may write to, but not make one in
        monkeypatch.setenv("JAXDISSECT_CACHE", "/proc/nope")
        with pytest.raises(SystemExit) as e:
            main(["prog"])
        assert str(e.value.code).startswith(
            "error: JAXDISSECT_CACHE=/proc/nope: /proc cannot hold a folder ("
        )
    monkeypatch.setenv("JAXDISSECT_CACHE", str(tmp_path / "new" / "cache"))
    main(["prog"])
    assert ran and not list(tmp_path.glob("new*")) and not list(tmp_path.glob(".jaxdissect*"))


def test_a_full_disk_is_one_line_naming_the_folder_and_that_the_command_resumes(tmp_path):
    """A write refused by a full disk or quota (ENOSPC, EDQUOT; a traceback before) is one
    line naming the folder of the file (a write's own error names none: `store.atomic_path`
    adds the path it writes) and the fix; other OSErrors are not user errors."""
    target = tmp_path / "out" / "tally-conv5.csv"

    def full():
        with store.atomic_open(target):
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write raises it

    main = cli.script_main(full, flags.FlagValues(), split_cpu=False)
    with pytest.raises(SystemExit) as e:
        main(["prog"])
    assert str(e.value.code) == (
        f"error: {tmp_path / 'out'}: No space left on device (a disk or a quota is full); "
        "free space there and run the same command again (it resumes), or choose another "
        "--output_dir (or JAXDISSECT_CACHE)"
    )
    assert list(target.parent.iterdir()) == []  # no temporary file left

    def quota():
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "a" / "b.npy"))

    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(tmp_path / 'a'))}: Disk quota"):
        cli.script_main(quota, flags.FlagValues(), split_cpu=False)(["prog"])

    def nameless():
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SystemExit, match="^error: --output_dir or JAXDISSECT_CACHE=.*: No space"):
        cli.script_main(nameless, flags.FlagValues(), split_cpu=False)(["prog"])

    def other():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        cli.script_main(other, flags.FlagValues(), split_cpu=False)(["prog"])


def test_output_dir_errors_name_the_path_and_the_fix(tmp_path):
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    with pytest.raises(ValueError, match="output_dir=.*f.txt is an existing file, not a folder"):
        outdir.prepare(afile)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        outdir.prepare(afile / "sub")
    # /sys refuses new entries to everyone, root included.
    with pytest.raises(ValueError, match=r"^--output_dir=/sys/x is not writable \(.*\): choose"):
        outdir.prepare("/sys/x", name="--output_dir")
    assert outdir.prepare(tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("denied", [".lock", ".work/stages"])
def test_an_output_dir_of_another_users_run_is_refused_naming_what(tmp_path, monkeypatch, denied):
    """An earlier run's lock file or folders this user may not write (another user's run):
    refused up front naming the path (a PermissionError traceback from the lock, or from a
    stage's write after pass 1, before). Root writes anything: the refusal is simulated."""
    out = tmp_path / "out"
    (out / ".work" / "stages").mkdir(parents=True)
    (out / outdir.LOCK_FILE).touch()
    access = os.access
    monkeypatch.setattr(
        outdir.os, "access", lambda p, mode: pathlib.Path(p) != out / denied and access(p, mode)
    )
    with pytest.raises(ValueError) as e:
        outdir.prepare(out, name="--output_dir")
    assert str(e.value) == (
        f"--output_dir={out} holds {out / denied}, which this user may not write (another "
        "user's run?): choose another --output_dir, or ask its owner to remove it"
    )
    monkeypatch.undo()
    assert outdir.prepare(out) == out


_HOLDER = """
import sys, time
from jaxdissect import outdir
with outdir.locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(300)
"""


def _holder(path: pathlib.Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture(scope="module")
def scripts():
    """The experiment scripts' processes, forked from one that imported dissect.py's modules."""
    with ScriptProcesses(
        *DISSECT_IMPORTS, "jaxdissect.models.zoo", "jaxdissect.models.resnet"
    ) as processes:
        yield processes


def test_a_second_run_on_a_locked_output_dir_says_who_holds_it(tmp_path, scripts):
    holder = _holder(tmp_path)
    try:
        busy = pytest.raises(outdir.OutputDirBusy, match=rf"in use by pid {holder.pid} \(")
        with busy, outdir.locked(tmp_path):
            pass
        # The script: one line naming the flag and the holder, exit 1, nothing written.
        done = _script(scripts, "dissect", f"--output_dir={tmp_path}", cache=tmp_path / "cache")
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(
            f"error: --output_dir={tmp_path} is in use by pid {holder.pid} ("
        )
        assert lines[0].endswith("wait for that run to finish, or choose another --output_dir")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The OS released the killed holder's lock.
    with outdir.locked(tmp_path):
        assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()
        with outdir.locked(tmp_path):  # this process's own hold: a library call under a script's
            pass
        with outdir.locked(tmp_path / "sub"):
            pass
    # Emptied on release: a process that held it earlier can never read its own pid there
    # while another has just taken the lock, and go on as if the hold were its own.
    assert (tmp_path / ".lock").read_text() == ""
    holder = _holder(tmp_path)  # released by the outer block
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_a_failed_run_leaves_no_folder_it_created_empty(tmp_path):
    """Every script claims --output_dir through `cli.claim_output_dir`: a run that fails
    before writing removes the folder it created, and only that one."""

    class Failed(Exception):
        pass

    new = tmp_path / "new" / "out"
    with pytest.raises(Failed), cli.claim_output_dir(new):
        assert (new / outdir.LOCK_FILE).exists()
        raise Failed
    assert not new.exists() and (tmp_path / "new").is_dir()  # its parent was not claimed
    (existing := tmp_path / "existing").mkdir()
    with pytest.raises(Failed), cli.claim_output_dir(existing):
        raise Failed
    assert sorted(p.name for p in existing.iterdir()) == [".lock"]  # the user's folder stays
    written = tmp_path / "written"
    with pytest.raises(Failed), cli.claim_output_dir(written):
        (written / "tally.csv").write_text("")
        raise Failed
    assert sorted(p.name for p in written.iterdir()) == [".lock", "tally.csv"]
    with cli.claim_output_dir(done := tmp_path / "done"):
        pass
    assert done.is_dir()  # a run that ends well keeps its folder


def test_the_python_api_holds_the_output_dir(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(outdir.OutputDirBusy, match=rf"^output_dir={tmp_path} is in use by pid"):
            pipeline.dissect(None, [], [], engine.Settings(), tmp_path, dataset_name="none")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing written


def _script(
    scripts: ScriptProcesses, name: str, *argv: str, cache: pathlib.Path
) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAXDISSECT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return scripts.run(ROOT / "experiments" / f"{name}.py", *argv, env=env)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quantile=1"], r"--quantile=1.0: must be in \(0, 1\)"),
        (["--max_images=0"], "--max_images=0: must be >= 1"),
        (["--iou_threshold=2"], r"--iou_threshold=2.0: must be in \[0, 1\)"),
        (["--input_size=0"], "--input_size=0: must be a whole number >= 1"),
        (["--data=/no/broden"], "--data=/no/broden: no such folder; download and unzip Broden"),
        (
            [f"--flagfile={ROOT}/experiments/configs/resnet18_places365.flags"],
            "download and unzip Broden.*; and --weights=ckpt/resnet18_places365: no such file or "
            "directory; convert your PyTorch checkpoint into it first: python models/convert.py "
            "--arch resnet18 --num_classes 365",
        ),
        (["--layers=re:("], "--layers: 're:\\(' is not a regular expression"),
        (["--token_layout=1+14"], r"--token_layout='1\+14': expected \[prefix\+\]HxW\[\+suffix\]"),
        (
            ["--model_option=wdth=2", "--num_classes=365"],
            "--num_classes, --model_option wdth: --weights=pretrained is the shipped",
        ),
        (
            ["--model=resnet18", "--weights=", "--model_option=wdth=2"],
            "--model_option wdth: --model=resnet18 takes num_classes, width, batch_norm",
        ),
    ],
)
def test_bad_flags_fail_in_one_line_before_loading(tmp_path, scripts, argv, message):
    cache = tmp_path / "cache"
    started = time.monotonic()
    done = _script(scripts, "dissect", *argv, f"--output_dir={tmp_path / 'out'}", cache=cache)
    elapsed = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and re.search(message, lines[0])
    assert not cache.exists() and not (tmp_path / "out").exists()  # no data, no output
    assert elapsed < 120  # imports only (seconds when the machine is idle)


def test_input_size_resizes_to_it_and_keys_the_results(tmp_path, caplog, monkeypatch):
    """--input_size is the side the probe images are resized to instead of the model's own
    (64 here, as the probe images): the resize is logged once, naming both sizes and the
    flag; results.json records the size, and it keys the stored stages (the same output_dir
    at the model's own size recomputes, without the resize and its message). A model that
    declares no default_layers, without --layers, is refused in one line listing its
    layers, leaving no output folder behind."""
    from jaxdissect.data import synthetic
    from tests.experiment_testing import run_script

    broden = synthetic.generate_tiny(tmp_path / "broden", num_images=13)
    out = tmp_path / "out"
    (tmp_path / "bare_model.py").write_text(
        "from tests.fixtures.small_model import Small\n\n"
        "class Bare(Small):\n    default_layers = ()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bare = ("--model=bare_model:Bare", "--weights=", f"--data={broden}", *QUICK)
    with pytest.raises(ValueError) as refused:
        run_script("dissect", *bare, f"--output_dir={out}")
    assert str(refused.value) == (
        "--layers is empty and --model=bare_model:Bare declares no default_layers: name the "
        "layers to dissect, e.g. --layers=conv1; its layers: conv1, conv2, head"
    )
    assert not out.exists()
    monkeypatch.delitem(sys.modules, "bare_model")
    common = (
        "--model=tests.fixtures.small_model:make",
        f"--data={broden}",
        "--layers=conv1",
        *QUICK,
        f"--output_dir={out}",
    )

    def settings() -> dict:
        return json.loads((out / "results.json").read_text())["settings"]

    resized = re.compile(r"probe images are 64x64 and the model's input 48x48: .*--input_size")
    with caplog.at_level(pylogging.INFO):
        run_script("dissect", *common, "--input_size=48")
    assert len([r for r in caplog.records if resized.search(r.getMessage())]) == 1
    small = settings()
    assert small["input_spec"]["size"] == 48
    caplog.clear()
    with caplog.at_level(pylogging.INFO):
        run_script("dissect", *common)
    assert "resized" not in caplog.text
    own = settings()
    assert own["input_spec"] == {**small["input_spec"], "size": 64}
    assert own["thresholds"] != small["thresholds"]  # not the stages stored at 48
    assert "matmul_precision" not in own
    import jax

    with jax.default_matmul_precision("highest"):
        run_script("dissect", *common)
    assert settings()["matmul_precision"] == "highest"


def test_a_set_matmul_precision_keys_the_stages():
    """JAX's default matmul precision changes the activations on GPU (TensorFloat-32) and TPU
    (bfloat16 passes): a run with one set (JAX_DEFAULT_MATMUL_PRECISION, or the context
    manager) never reuses stages stored without it; without one the key is as before."""
    import jax

    from jaxdissect import code_keys, store
    from tests.fixtures.small_model import MODULE

    info = pipeline.ModelInfo(MODULE, {}, None, "small", "weights")
    default = info.stage_key
    assert pipeline.matmul_precision() is None
    assert default == store.key_of(
        model="weights",
        weights=store.fingerprint_tree({}),
        definition=code_keys.definition_key(MODULE, {}),
        code=code_keys.code_fingerprint(),
        token_layout=None,
    )
    keys = set()
    for precision in ("highest", "tensorfloat32", "bfloat16"):
        with jax.default_matmul_precision(precision):
            assert pipeline.matmul_precision() == precision
            keys.add(info.stage_key)
    assert len(keys) == 3 and default not in keys


def test_missing_training_exports_say_train_first(tmp_path):
    export = "runs/none/weights/step_002000"
    assert model_load.missing_weights_advice("", export).endswith(model_load.TRAIN_COMMAND)
    with pytest.raises(FileNotFoundError, match="train first: python experiments/train.py"):
        model_load.check_request("resnet18", export)
    with pytest.raises(ValueError, match="only available offline for efficientnet_lite0"):
        model_load.check_request("resnet18", "pretrained")


def test_no_tpu_note_in_the_log():
    def record(msg: str, level: int = pylogging.INFO) -> pylogging.LogRecord:
        return pylogging.LogRecord("jax", level, "/x/xla_bridge.py", 1, msg, None, None)

    note = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: no such file"
    assert not cli._not_noise(record(note))
    assert cli._not_noise(record("Unable to initialize backend 'cuda': something"))
    assert cli._not_noise(record("dissecting"))


def test_compilation_cache_keeps_every_executable_where_jax_is_told(tmp_path, monkeypatch):
    import jax

    session = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the test session's (conftest.py)
    try:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
        cli.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        monkeypatch.setenv("JAXDISSECT_CACHE", str(tmp_path / "root"))
        cli.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "root" / "xla")
    finally:
        monkeypatch.undo()
        assert os.environ["JAX_COMPILATION_CACHE_DIR"] == session
        cli.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == session


@pytest.mark.parametrize(
    "name,splits",
    [("dissect", True), ("significance", True), ("train", False), ("concept_vectors", False)],
)
def test_scripts_split_the_cpu_unless_they_train(monkeypatch, name, splits):
    """Dissecting scripts make a CPU device per core; training's results would depend on
    it (gradient sums round differently on another number of devices): train.py and the
    concept-vector probes do not."""
    calls = []
    monkeypatch.setattr(parallel, "split_cpu", lambda: calls.append(1))
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)
    flag = inspect.getclosurevars(script(name).main).nonlocals["split_cpu"]
    cli.script_main(lambda: None, split_cpu=flag)([name])
    assert calls == ([1] if splits else [])


def test_default_output_dirs_are_named_after_the_weights(tmp_path, monkeypatch):
    """Two checkpoints of one architecture get two default folders; built-in weights and
    a random init keep `runs/<model>`."""
    assert cli.run_name("efficientnet_lite0", "pretrained") == "efficientnet_lite0"
    assert cli.run_name("resnet18", "") == cli.run_name("resnet18", None) == "resnet18"
    assert cli.run_name("resnet18", "ckpt/places.pth.tar") == "resnet18_places"
    assert cli.run_name("resnet18", "/a/b/ft.safetensors") == "resnet18_ft"
    assert cli.run_name("alexnet", "ckpt/alexnet_places365/") == "alexnet_alexnet_places365"
    assert cli.run_name("pkg.mod:make", "w.npz") == "pkg.mod_make_w"
    export = "runs/train_small_cnn/weights/step_002000"
    assert cli.run_name(None, export) == "train_small_cnn_step_002000"
    assert cli.run_name("small_cnn", export) == "small_cnn_train_small_cnn_step_002000"

    class Claimed(Exception):
        pass

    def claim(path):
        raise Claimed(path)

    monkeypatch.setattr(cli, "claim_output_dir", claim)
    weights = tmp_path / "mine.pth"
    weights.write_bytes(b"")
    for name, prefix in (("dissect", ""), ("compositional", "compositional_")):
        argv = ("--model=resnet18", f"--weights={weights}", "--num_classes=10")
        with pytest.raises(Claimed) as claimed:
            script(name).run(parse(name, *argv))
        assert str(claimed.value) == os.path.join("runs", f"{prefix}resnet18_mine")


def _run(name: str, *argv: str) -> object:
    return script(name).run(parse(name, *argv))


def test_study_scripts_take_the_model_options_dissect_takes(tmp_path):
    """significance, rotation and ablation take --num_classes and --model_option for --model
    (e.g. a Places checkpoint's 365 classes), a compare.py --dissect entry its OPTIONS;
    each is checked before anything slow starts, naming the flags given."""
    for name in ("significance", "rotation"):
        with pytest.raises(ValueError, match="^--num_classes=-1: must be a whole number"):
            _run(name, "--model=resnet18", "--weights=", "--num_classes=-1", "--data=synthetic")
    for name in ("significance", "rotation", "compositional"):
        # A class count --model_option gives is named as that flag's, not --num_classes's.
        with pytest.raises(ValueError, match="^--model_option num_classes=-1: must be a whole"):
            _run(name, "--model=resnet18", "--weights=", "--model_option=num_classes=-1")
    predictions = ("--task=predictions", "--model=resnet18", "--weights=", "--data=synthetic")
    with pytest.raises(ValueError, match="^--model_option nope: --model=resnet18 takes "):
        _run("ablation", *predictions, "--model_option=nope=2")
    with pytest.raises(ValueError, match="^--num_classes: --task=training .*drop --num_classes,"):
        _run("ablation", "--num_classes=5")
    with pytest.raises(ValueError, match="^--model_option: --task=training "):
        _run("ablation", "--model_option=width=0.5")
    export = tmp_path / "export"
    export.mkdir()
    (export / training.META_FILE).write_text('{"classes": ["a"], "train": {}}')
    with pytest.raises(ValueError, match="^--num_classes: --weights=.* is a training export"):
        cli.check_model_flags(parse("significance", f"--weights={export}", "--num_classes=5"))
    compare = script("compare")
    entry = compare.parse_entry("places|resnet18|r18.pth.tar|layer4|num_classes=365")
    assert entry == ("places", "resnet18", "r18.pth.tar", ["layer4"], {"num_classes": 365})
    assert compare.parse_entry("a|resnet18||layer4")[4] == {}
    with pytest.raises(ValueError, match=r"^--dissect=a\|...: OPTIONS num_classes=-1: must be"):
        _run("compare", "--dissect=a|resnet18||layer4|num_classes=-1", "--data=synthetic")
    # The entry and its part are named, never dissect.py's flags (compare has none of them).
    with pytest.raises(ValueError, match=r"^--dissect='a\|[^:]*': OPTIONS='n': expected key="):
        compare.parse_entry("a|resnet18||layer4|n")
    missing = tmp_path / "none"
    with pytest.raises(FileNotFoundError) as refused:
        _run("compare", f"--dissect=a|resnet18|{missing}.pth|layer4", "--data=synthetic")
    assert str(refused.value) == f"--dissect=a|...: WEIGHTS={missing}.pth: no such file"
    with pytest.raises(
        FileNotFoundError, match=r"^--dissect=a\|...: WEIGHTS=\S+: no such file "
    ) as refused:
        _run("compare", f"--dissect=a|resnet18|{missing}|layer4|num_classes=3", "--data=synthetic")
    assert "convert.py --arch resnet18 --num_classes 3 --input" in str(refused.value)


def test_a_repeated_category_is_refused_before_the_data_is_opened(tmp_path):
    """--categories=color,color needs no dataset to refuse: one line naming the flag, before
    a missing --data (or a synthetic Broden's generation, or a Broden's walk)."""
    missing = tmp_path / "none"
    with pytest.raises(ValueError, match=r"^--categories=color,color: color given more than once"):
        _run("dissect", "--categories=color,color", f"--data={missing}")


def test_eval_data_errors_name_eval_data(tmp_path):
    """ablation.py's task data: a missing --eval_data is named as such, not as --data."""
    export = tmp_path / "step_000010"
    export.mkdir()
    (export / "meta.json").write_text('{"classes": ["a-s", "b-s"], "input_size": 32}')
    fv = parse("ablation", f"--weights={export}", f"--eval_data={tmp_path / 'none'}")
    with pytest.raises(FileNotFoundError, match=r"^--eval_data=\S+none: no such folder"):
        cli.training_task(fv)


def test_an_accuracy_on_another_validation_split_is_refused(tmp_path):
    """The classes alone were checked: rotation.py and ablation.py on a synthetic set of
    other --synthetic_images (same scenes) measured "validation" accuracy on another split,
    whose images were partly the export's training images (of a 2,000-image set's 600 val
    images, 278 are train images of the 4,000-image set). The export keeps its val split's
    key; an export without one (older) is not checked."""
    from jaxdissect import scenes
    from jaxdissect.data import synthetic

    root = synthetic.generate(tmp_path / "broden", num_images=48, size=32, workers=1)
    kw = dict(resolution=32, synthetic_images=0, cache_dir=tmp_path)
    task = scenes.open_scene_task(str(root), **kw)
    export = tmp_path / "step_000010"
    export.mkdir()
    meta = {"classes": list(task.class_names), "input_size": 32}
    fv = parse("rotation", f"--weights={export}", f"--data={root}", "--resolution=32")
    for key, refused in [(None, False), (task.val.key(), False), (task.train.key(), True)]:
        (export / "meta.json").write_text(json.dumps({**meta, "val_split": key} if key else meta))
        if refused:
            with pytest.raises(ValueError, match="^--data's validation split is not the one"):
                cli.training_task(fv)
        else:
            assert cli.training_task(fv).val.key() == task.val.key()


def test_ablation_summary_of_a_class_without_evaluation_images():
    """A class none of the evaluation images holds has no accuracy (null in ablation.json):
    its summary line says so instead of failing to format None."""
    summary = script("ablation")._summary_line
    units = [{"unit": 3, "name": "sky-s"}, {"unit": 1, "name": ""}]
    curve = {"n": [0, 1, 8], "class_accuracy": [None] * 3, "others_accuracy": [0.5, 0.4, 0.25]}
    line = summary({"class": "desert-s", "curve": curve, "units": units})
    assert line == "desert-s: no images of this class in the evaluation data"
    curve = {"n": [0, 1, 8], "class_accuracy": [0.75, 0.5, 0.0], "others_accuracy": [None] * 3}
    line = summary({"class": "forest-s", "curve": curve, "units": units})
    assert line == (
        "forest-s: accuracy 0.750 -> 0.000 with the top 8 removed (others - -> -); "
        "top units 3 (sky-s), 1 (-)"
    )


def test_a_tilde_in_a_path_flag_is_the_home_folder_everywhere(tmp_path, monkeypatch):
    """`--output_dir=~/run` (the shell leaves `~` after `=`, and in a flagfile): the
    scripts' path flags are expanded once before the run, and `pipeline.dissect` reads its
    `output_dir` as `outdir` does (it wrote a folder named `~` beside the home one)."""
    from absl import flags

    from jaxdissect import capture, pipeline

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    fv = flags.FlagValues()
    for name in ("output_dir", "weights", "data", "eval_data", "layers"):
        flags.DEFINE_string(name, None, "", flag_values=fv)
    fv(
        [
            "prog",
            "--output_dir=~/run",
            "--weights=~",
            "--data=synthetic",
            "--layers=~x",
            "--eval_data=~/e",
        ]
    )
    seen = {}
    cli.script_main(lambda: seen.update(fv.flag_values_dict()), fv, split_cpu=False)(["prog"])
    assert seen["output_dir"] == str(home / "run") and seen["weights"] == str(home)
    assert seen["eval_data"] == str(home / "e")
    assert seen["data"] == "synthetic" and seen["layers"] == "~x"  # not a path flag

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(capture, "make_tap", stop)
    info = pipeline.ModelInfo(None, None, None, "m", "k")
    with pytest.raises(Stop):
        pipeline.dissect(info, ["l"], None, None, "~/out", dataset_name="d")
    assert (home / "out").is_dir() and not (tmp_path / "~").exists()


def test_a_positional_argument_is_one_line_naming_its_flagfile(tmp_path, scripts):
    """A flagfile line without '--' (`quantile=0.01`) became a positional argument, answered
    by the whole usage text and 'unexpected arguments'; now one line names the argument,
    the flagfile it came from and the '--' it needs."""
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--noprogress\nquantile=0.01\n")
    done = scripts.run(ROOT / "experiments" / "dissect.py", f"--flagfile={flagfile}", timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: unexpected argument 'quantile=0.01' in --flagfile={flagfile}: a flag needs "
        "'--' before it: --quantile=0.01"
    ]
    with pytest.raises(SystemExit, match=r"^error: unexpected argument '/x' \(and 1 more\): "):
        cli.refuse_arguments(["/x", "y"], given=["/x", "y"])


@pytest.mark.parametrize("name", ["dissect", "significance", "rotation", "ablation", "compare"])
def test_seed_help_says_it_is_also_the_random_inits(name):
    """--seed seeds the sketch and, with --weights=, the random init (engine.Settings)."""
    fv = flags.FlagValues()
    script(name).define_flags(fv)
    assert "sketch" in fv["seed"].help and "random init (`--weights=`)" in fv["seed"].help


def test_resolution_given_with_a_broden_folder_must_be_its_size(tmp_path):
    """--resolution sizes a synthetic Broden or picks a TFDS build: given with a Broden
    folder of another size it is refused in one line (not silently ignored); the folder's
    own size, or no --resolution, is accepted."""
    from tests.broden_testing import tiny_broden

    root = tiny_broden(tmp_path / "broden").root  # 8x8 images
    wrong = (
        rf"^--resolution=64: --data={re.escape(str(root))} is a Broden folder of 8x8 images, "
        r"read at their own size \(.*\); give --resolution=8 or none"
    )
    with pytest.raises(ValueError, match=wrong + ", or resize .* with --input_size$"):
        cli.probe_from_flags(parse("dissect", f"--data={root}", "--resolution=64"))
    for given in (["--resolution=8"], [], [f"--output_dir={tmp_path / 'out'}"]):
        assert cli.probe_from_flags(parse("dissect", f"--data={root}", *given)).data == str(root)
    for out in (root, root / "runs"):  # results written among the data: refused
        with pytest.raises(ValueError, match=r"^--output_dir=.*: it lies in the probe set's"):
            cli.probe_from_flags(parse("dissect", f"--data={root}", f"--output_dir={out}"))
    # A script with no --input_size is not told to use it.
    fv = parse("training_dynamics", f"--data={root}", "--resolution=64")
    with pytest.raises(ValueError, match=wrong + "$"):
        cli.probe_from_flags(fv)


def test_an_input_size_past_the_largest_is_refused():
    """--input_size=10**30 overflowed in the dry run's convolution shapes (a traceback)."""
    cli.check_input_size(8192)
    with pytest.raises(ValueError, match=r"^input_size=8193: must be a whole number >= 1 .*8192"):
        cli.check_input_size(8193)
