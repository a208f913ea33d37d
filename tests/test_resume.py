"""A dissection killed with SIGKILL or interrupted (Ctrl-C) resumes from its checkpoint and
ends identical."""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import actcache, capture, checkpoint, engine, outdir, parallel, store
from jaxdissect.checkpoint import StreamCheckpoint
from jaxdissect.data import synthetic
from jaxdissect.data.broden import Broden
from jaxdissect.models.load import init_variables
from jaxdissect.preprocess import InputSpec
from tests.experiment_testing import DISSECT_IMPORTS, ScriptProcesses

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return synthetic.generate_tiny(tmp_path_factory.mktemp("resume") / "broden", num_images=24)


DISSECT = ROOT / "experiments" / "dissect.py"


# The killed runs and their resume checkpoint every batch; the uninterrupted run keeps the
# default (50 batches: none in its 12-batch passes), as a run never stopped needs none.
EVERY_BATCH = "--checkpoint_every=1"


def _flags(data, out, *extra):
    return [
        "--model=tests.fixtures.small_model:make",
        "--weights=",
        f"--data={data}",
        f"--output_dir={out}",
        "--batch_size=2",
        "--progress=false",
        "--activation_cache=disk",
        "--loader_threads=0",
        "--top_images=3",
        *extra,
    ]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


@pytest.fixture
def scripts():
    """Every run (the uninterrupted one, the killed ones, the last resume) its own process,
    forked from one that imported dissect.py's modules once."""
    with ScriptProcesses(*DISSECT_IMPORTS, "tests.fixtures.small_model") as processes:
        yield processes


def _steps(out, stage):
    """The checkpointed steps of `stage` (pass 2's under its thresholds' folder). Entries
    orbax deletes as this looks are skipped (`os.walk` ignores them), and step folders are
    not entered: with a checkpoint every batch, a recursive glob met a vanished folder so
    often that it saw nothing until the run was nearly done."""
    root = out / ".work" / "checkpoints"
    steps = []
    for folder, subfolders, _ in os.walk(root):
        relative = pathlib.Path(folder).relative_to(root).parts
        if relative and not relative[0].startswith(f"{stage}-"):
            subfolders.clear()
        elif folder.endswith("-devices"):
            steps += [int(name) for name in subfolders if name.isdigit()]
            subfolders.clear()
    return steps


def _stored(out, stage):
    """Whether `stage` is stored (its outputs marked done) in the run's work folder."""
    return any((out / ".work" / "stages").glob(f"{stage}-*/{store.DONE}"))


def _outputs(out):
    doc = json.loads((out / "results.json").read_text())
    doc["settings"].pop("thresholds")  # compared separately below, exactly
    tallies = {p.name: p.read_text() for p in sorted(out.glob("tally-*.csv"))}
    return doc, tallies, json.loads((out / "results.json").read_text())["settings"]["thresholds"]


def _kill_during(scripts, flags, out, stage, sig=signal.SIGKILL, attempts=1):
    """Start dissect.py with `flags` (a process of its own, forked by `scripts`), send `sig`
    once `stage` has checkpointed 3 batches; return that step and the run's stderr.

    A run that had written its results when the signal was sent (a loaded machine kept
    this poll waiting) and then ended normally, or that the signal stopped after `stage`
    was stored, is tried again, `out` put back as it was, up to `attempts` times; one that
    ends normally after a signal sent mid-run fails.
    """
    backup = out.with_name(out.name + "-before")
    if attempts > 1:
        shutil.copytree(out, backup, symlinks=True)
    for attempt in range(attempts):
        proc = scripts.start(DISSECT, *flags, env=_env())
        deadline = time.time() + 300
        seen = []
        while time.time() < deadline and proc.poll() is None:
            seen = [s for s in _steps(out, stage) if s >= 3] if out.exists() else []
            if seen:
                break
            time.sleep(0.01)
        finished = (out / "results.json").exists()  # its work done: a signal may come late
        if proc.poll() is None:
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=300)
        # Interrupted after `stage` was stored, before its checkpoints were removed: a rerun
        # reuses the stored stage instead of resuming, so this attempt shows nothing.
        stored = proc.returncode != 0 and _stored(out, stage)
        if (proc.returncode == 0 and finished or stored) and attempt + 1 < attempts:
            shutil.rmtree(out)
            shutil.copytree(backup, out, symlinks=True)
            continue
        assert seen, f"the run finished before it could be killed during {stage}"
        assert proc.returncode == (-sig if sig == signal.SIGKILL else 130), stderr[-3000:]
        return max(seen), stderr


@pytest.mark.slow
def test_killed_runs_resume_identically(tiny_data, tmp_path, scripts):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run = scripts.run(DISSECT, *_flags(tiny_data, ref), env=_env())
    assert run.returncode == 0, run.stderr[-3000:]

    # Killed in pass 1, restarted and killed again in pass 2, restarted to the end.
    step, _ = _kill_during(scripts, _flags(tiny_data, killed, EVERY_BATCH), killed, "pass1")
    assert 3 <= step < 12  # mid-pass: 24 images in batches of 2
    assert not (killed / "results.json").exists()  # a killed run leaves no complete result
    # Ctrl-C, as a checkpoint may be being written: one line, exit status 130.
    flags = _flags(tiny_data, killed, EVERY_BATCH, "--verbosity=-1")
    _, stderr = _kill_during(scripts, flags, killed, "pass2", signal.SIGINT, attempts=3)
    assert stderr.strip().splitlines()[-1] == "interrupted: run the same command again to resume"
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    assert not (killed / "results.json").exists()
    checkpoints = killed / ".work" / "checkpoints"
    assert [p.name.split("-")[0] for p in checkpoints.iterdir()] == ["pass2"]  # pass 1 stored
    run = scripts.run(DISSECT, *_flags(tiny_data, killed, EVERY_BATCH, "--verbosity=0"), env=_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pass2: resuming after batch" in run.stderr
    assert list(checkpoints.iterdir()) == []  # both passes stored: nothing left to resume
    for out in (ref, killed):  # disk caches are deleted once both passes are stored
        assert not list((out / ".work").glob("activations/**/*.npy"))
    got, want = _outputs(killed), _outputs(ref)
    assert got[2] == want[2]  # thresholds, bit for bit (JSON floats round-trip exactly)
    assert got[1] == want[1]  # tally CSVs
    assert got[0]["layers"] == want[0]["layers"]


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(4, (3, 3), strides=4, name="conv")(x)).mean((1, 2))


class _Killed:
    """A probe set whose image `at` cannot be read: the run stops there, as if killed."""

    def __init__(self, source, at=None):
        self.source, self.at = source, at

    def __len__(self):
        return len(self.source)

    def __getattr__(self, name):
        return getattr(self.source, name)

    def read_image(self, i):
        if i == self.at:
            raise KeyboardInterrupt(f"killed at image {i}")
        return self.source.read_image(i)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """(probe set of 24 images at 32 px, run(source, cache, work_dir) -> the layer's stats)."""
    root = tmp_path_factory.mktemp("in_process") / "broden"
    probe = Broden.open(synthetic.generate_tiny(root, num_images=24, size=32))
    model = _Net()
    variables = init_variables(model, jnp.zeros((1, 32, 32, 3)))
    tap = capture.make_tap(model, variables, "conv", input_shape=(32, 32, 3))
    settings = engine.Settings(quantile=0.05, quantile_mode="exact", batch_size=4)

    def run(source, cache="none", work_dir=None):
        return engine.Dissector(
            tap,
            source,
            settings,
            input_spec=InputSpec(32, (120.0,) * 3, (60.0,) * 3),
            model_key="net",
            mesh=parallel.data_mesh(1),
            progress=False,
            num_threads=0,
            work_dir=work_dir,
            activation_cache=cache,
            checkpoint_every=2,
        ).run(tap.variables)["conv"]

    return probe, run


def _assert_same_counts(got, want):
    for key, counts in want.counts.items():
        np.testing.assert_array_equal(got.counts[key], counts, err_msg=key)


def test_pass2_reads_no_batch_a_killed_run_of_another_cache_kind_never_wrote(in_process, tmp_path):
    """Killed with a host cache (checkpoint 2), killed with a disk cache started at the
    checkpoint (checkpoint 4), finished with a disk cache: the counts are a clean run's."""
    probe, run = in_process
    clean = run(probe)
    for cache, at in (("host", 13), ("disk", 17)):  # killed in batches 3 and 4
        with pytest.raises(KeyboardInterrupt):
            run(_Killed(probe, at), cache, tmp_path / "work")
    resumed = run(probe, "disk", tmp_path / "work")
    np.testing.assert_array_equal(resumed.thresholds, clean.thresholds)
    _assert_same_counts(resumed, clean)
    assert not list((tmp_path / "work").rglob("*.npy"))  # the disk cache is gone
    # A killed disk run's files are removed by a run that finishes with another kind.
    with pytest.raises(KeyboardInterrupt):
        run(_Killed(probe, 9), "disk", tmp_path / "again")
    assert list((tmp_path / "again").rglob("*.npy"))
    run(probe, "host", tmp_path / "again")
    assert not list((tmp_path / "again").rglob("*.npy"))


def test_a_finished_run_removes_the_work_killed_runs_of_other_settings_left(in_process, tmp_path):
    """A disk cache and a pass checkpoint a killed run left under other keys (other
    settings) would never be resumed once another dissection finishes there: it removes
    them, as it does its own."""
    probe, run = in_process
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):  # in pass 1, after its checkpoint at batch 2
        run(_Killed(probe, 9), "disk", work)
    [cache] = (work / "activations").iterdir()
    [checkpoint] = (work / "checkpoints").glob("pass1-*")
    cache.rename(cache.with_name("other-settings"))  # as a run of other settings left them
    checkpoint.rename(checkpoint.with_name("pass1-other-settings"))
    assert list((work / "activations").rglob("*.npy"))
    run(probe, "host", work)
    assert not list((work / "activations").rglob("*")) and not list(
        (work / "checkpoints").glob("pass*")
    )


def test_taking_an_output_dirs_lock_removes_what_a_killed_holder_was_writing(tmp_path):
    """The temporary files a killed run left (`.name.<12 hex>.tmp`, untouched for a minute)
    go when the next run takes the folder's lock; another process's fresh one, or a file
    of another name, stays."""
    old, fresh = tmp_path / ".tally-a.csv.0123456789ab.tmp", tmp_path / ".x.npz.ba9876543210.tmp"
    nested = tmp_path / ".work" / "stages" / "s" / ".arrays.npz.00112233aabb.tmp"
    kept = [fresh, tmp_path / "notes.tmp", tmp_path / ".x.npz.0123.tmp"]
    for path in [old, nested, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    for path in (old, nested):
        os.utime(path, (time.time() - 120,) * 2)
    with outdir.locked(tmp_path):
        assert not old.exists() and not nested.exists()
        assert all(p.exists() for p in kept)


# Holds `<argv[1]>/.lock` as a run whose pid is `argv[2]` (of another host or container).
_OTHER_HOST = """
import fcntl, sys
f = open(sys.argv[1] + "/.lock", "a+")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.write(f"pid {sys.argv[2]} (dissect.py on another host)\\n")
f.flush()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_run_elsewhere_with_this_pid_is_not_taken_for_this_process(tmp_path):
    """The lock's file names its holder's pid; a run on another host or in another container
    (a shared output_dir) may have this process's pid: its hold is refused like any other
    (this process went on as if the hold were its own, and two runs wrote one folder)."""
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_HOST, str(tmp_path), str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        busy = pytest.raises(outdir.OutputDirBusy, match=r"dissect.py on another host")
        with busy, outdir.locked(tmp_path):
            pass
    finally:
        other.communicate("")


def test_a_hold_nests_in_its_own_calls_not_in_another_threads(tmp_path):
    """A hold inside this call's hold goes on under it; another thread's is another run's,
    refused (both went on, writing one folder)."""
    import concurrent.futures

    def hold() -> None:
        with outdir.locked(tmp_path):
            pass

    with outdir.locked(tmp_path):
        hold()  # nested: goes on
        busy = pytest.raises(outdir.OutputDirBusy, match="is in use by pid")
        with concurrent.futures.ThreadPoolExecutor(1) as pool, busy:
            pool.submit(hold).result()
    hold()  # released


def test_a_resumed_pass2_counts_at_the_thresholds_it_reports(in_process, tmp_path):
    """Pass 2 killed after a checkpoint; pass 1's stored thresholds then differ (as from a
    pass 1 computed otherwise): the resumed pass counts at the new ones, not at those its
    checkpoint began with."""
    probe, run = in_process
    work = tmp_path / "work"
    run(probe, "none", work)
    [done] = (work / "stages").glob("pass2-*")
    shutil.rmtree(done)
    with pytest.raises(KeyboardInterrupt):  # in pass 2 (pass 1 is stored), after batch 4
        run(_Killed(probe, 21), "none", work)
    [pass1] = (work / "stages").glob("pass1-*")
    arrays = store.load_arrays(pass1 / "arrays.npz")
    arrays["thresholds"] = arrays["thresholds"] * np.float32(0.5)
    store.save_arrays(pass1 / "arrays.npz", arrays)
    resumed = run(probe, "none", work)
    np.testing.assert_array_equal(resumed.thresholds, arrays["thresholds"])
    # The counts at those thresholds from a whole pass 2 (pass 1 stored as tampered).
    shutil.copytree(pass1, tmp_path / "fresh" / "stages" / pass1.name)
    whole = run(probe, "none", tmp_path / "fresh")
    np.testing.assert_array_equal(whole.thresholds, arrays["thresholds"])
    _assert_same_counts(resumed, whole)


def test_orbax_reads_closed_mid_read_print_nothing(tmp_path):
    """A read coroutine of orbax's that raises as it is closed (another shard failed first)
    is dropped while `orbax_reads_quiet` holds, not printed as "Exception ignored in"; one of
    other code, and one after the block, reach the hook as before."""
    source = (
        "async def read():\n"
        "    try:\n"
        "        await fut\n"
        "    except GeneratorExit as e:\n"
        "        raise RuntimeError('closed mid-read') from e\n"
    )

    class Pending:
        def __await__(self):
            yield

    def closed_mid_read(filename: str) -> None:
        scope = {"fut": Pending()}
        exec(compile(source, filename, "exec"), scope)
        coroutine = scope["read"]()
        coroutine.send(None)  # suspended in the read
        del coroutine  # closed: GeneratorExit, then the RuntimeError it raises is unraisable

    orbax = str(tmp_path / "orbax" / "checkpoint" / "serialization.py")
    seen = []
    previous, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        with checkpoint.orbax_reads_quiet():
            closed_mid_read(orbax)
            closed_mid_read(str(tmp_path / "elsewhere.py"))
        closed_mid_read(orbax)
    finally:
        sys.unraisablehook = previous
    assert [str(u.exc_value) for u in seen] == ["closed mid-read"] * 2
    assert [u.object.cr_code.co_filename for u in seen] == [
        str(tmp_path / "elsewhere.py"),
        orbax,
    ]


@pytest.mark.parametrize("damage", ["arrays", "arrays, files unrecorded", "digest", "no digest"])
def test_a_damaged_checkpoint_restarts_its_pass_never_other_numbers(
    in_process, tmp_path, caplog, monkeypatch, damage
):
    """A resume checkpoint whose array files were changed on disk (orbax restored them as
    other numbers: no checksum), whose digest disagrees, or that has none (older code) is
    dropped with a warning: the pass starts again and ends as a clean run. Changed files
    are found by their recorded sha256 before orbax reads them (a read that failed left
    orbax's other reads printing tracebacks); without that record, by the state's digest
    or orbax's error."""
    probe, run = in_process
    clean = run(probe)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):  # in pass 1 after the checkpoint of batch 2
        run(_Killed(probe, 9), "none", work)
    [folder] = (work / "checkpoints").glob("pass1-*/*-devices")
    [digest] = folder.glob("digest-p0-*")
    if damage.startswith("arrays"):  # every byte of the largest data file inverted
        data = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))
        if damage == "arrays":
            assert "files" in json.loads(digest.read_text())

            def unread(*args, **kwargs):
                raise AssertionError("orbax read a checkpoint whose files changed")

            monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", unread)
        else:
            digest.write_text(json.dumps({"sha256": json.loads(digest.read_text())["sha256"]}))
    elif damage == "digest":
        digest.write_text('{"sha256": "0"}')
    else:
        digest.unlink()
    with caplog.at_level("WARNING"):
        resumed = run(probe, "none", work)
    assert any("is damaged" in r.getMessage() and "starting the pass again" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    if damage == "arrays":
        assert "its files are not those saved" in caplog.text
    np.testing.assert_array_equal(resumed.thresholds, clean.thresholds)
    _assert_same_counts(resumed, clean)


def test_a_disk_cache_changed_on_disk_is_not_read(in_process, tmp_path, caplog):
    """A killed run's disk cache whose rows changed on disk before the resume: the resumed
    run starts its cache afresh and pass 2 runs the network, counting as a clean run."""
    probe, run = in_process
    clean = run(probe)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):  # in pass 1 after the checkpoint of batch 4
        run(_Killed(probe, 17), "disk", work)
    [layer] = work.rglob("layer0-p0.npy")
    rows = np.load(layer, mmap_mode="r+")
    rows[4:8] = np.finfo(rows.dtype).max  # batch 1's activations, all above any threshold
    rows.flush()
    del rows
    with caplog.at_level("WARNING"):
        resumed = run(probe, "disk", work)
    assert "batch 1's rows are not those it recorded" in caplog.text
    np.testing.assert_array_equal(resumed.thresholds, clean.thresholds)
    _assert_same_counts(resumed, clean)


def test_a_disk_cache_the_disk_cannot_hold_is_not_kept(in_process, tmp_path, caplog, monkeypatch):
    """No room for the cache's files: the run goes on without a cache, counting as a
    clean run."""
    probe, run = in_process
    clean = run(probe)
    statvfs = os.statvfs

    def full(path):  # the cache's disk: no block free (the checkpoints' disk as it is)
        real = statvfs(path)
        return os.statvfs_result((*real[:4], 0, *real[5:])) if "activations" in str(path) else real

    monkeypatch.setattr(actcache.os, "statvfs", full)
    with caplog.at_level("WARNING"):
        resumed = run(probe, "disk", tmp_path / "work")
    assert "running without one" in caplog.text and "No space left" in caplog.text
    assert not list((tmp_path / "work").rglob("*.npy"))
    np.testing.assert_array_equal(resumed.thresholds, clean.thresholds)
    _assert_same_counts(resumed, clean)


@pytest.mark.parametrize("full", ["free space", "orbax's write"])
def test_a_checkpoint_the_disk_cannot_hold_is_an_error_naming_its_folder(
    tmp_path, monkeypatch, full
):
    """Free space under the state's bytes (checked first), or orbax's write refused with
    ENOSPC (tensorstore's RESOURCE_EXHAUSTED text): an OSError ENOSPC naming the folder,
    which the scripts say in one line; the checkpoint before it stays."""
    state = {"counts": jnp.arange(1000, dtype=jnp.int32)}
    ckpt = StreamCheckpoint(tmp_path / "ckpt", every=1)
    assert ckpt.maybe_save(1, state)
    if full == "free space":
        statvfs = os.statvfs

        def small(path):
            real = statvfs(path)
            return os.statvfs_result((*real[:4], 0, *real[5:]))  # f_bavail: none

        monkeypatch.setattr(checkpoint.os, "statvfs", small)
    else:

        def refused(*args, **kwargs):
            raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device")

        monkeypatch.setattr(ckpt._manager, "save", refused)
    with pytest.raises(OSError) as e:
        ckpt.maybe_save(2, state)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "ckpt"))
    monkeypatch.undo()
    # Room here but not on another process: every process refuses (one alone would leave
    # the others waiting in orbax's save).
    monkeypatch.setattr(checkpoint.parallel, "all_processes", lambda flag: False)
    with pytest.raises(OSError, match="on another process's disk") as e:
        ckpt.maybe_save(3, state)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    restored, step = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
    assert step == 1
    np.testing.assert_array_equal(restored["counts"], state["counts"])


def test_an_intact_checkpoint_passes_its_file_record_after_orbax_opens_and_reads_it(tmp_path):
    """The files' record covers what orbax leaves unchanged: a checkpoint opened by a new
    manager and restored twice is restored each time, not dropped as damaged."""
    state = {"counts": jnp.arange(1000, dtype=jnp.int32), "x": jnp.ones((16, 16))}
    saved = StreamCheckpoint(tmp_path / "ckpt", every=1)
    assert saved.maybe_save(3, state)
    saved.close()
    [digest] = (tmp_path / "ckpt").glob("digest-p0-3")
    assert json.loads(digest.read_text())["files"]
    for _ in range(2):
        ckpt = StreamCheckpoint(tmp_path / "ckpt", every=1)
        restored, step = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
        ckpt.close()
        assert step == 3
        np.testing.assert_array_equal(restored["counts"], state["counts"])
