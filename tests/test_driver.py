"""The pass driver with statistics it has never seen: resume, a third pass, one compile."""

import dataclasses
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import capture, driver, engine, masks, parallel, statistics, store
from jaxdissect.data import synthetic
from jaxdissect.data.broden import Broden
from jaxdissect.models.load import init_variables
from jaxdissect.preprocess import InputSpec


def _count_above(layer: str, units: int, level: float) -> statistics.Statistic:
    """A toy statistic: per unit, the values above `level`, and the images seen."""

    def init(shard):
        return {"above": jnp.zeros((units,), jnp.int32), "images": jnp.zeros((), jnp.int32)}

    def update(state, batch):
        a = batch["acts"][layer]
        hit = (a > level) & batch["valid"][:, None, None, None]
        return {
            "above": state["above"] + hit.sum((0, 1, 2), dtype=jnp.int32),
            "images": state["images"] + batch["valid"].sum(dtype=jnp.int32),
        }

    def merge(a, b):
        return jax.tree.map(jnp.add, a, b)

    return statistics.Statistic(init, update, merge, lambda s: jax.tree.map(np.asarray, s))


class _Values:
    """Examples whose "image" is the activation map itself; can fail at one index."""

    def __init__(self, values, fail_at=None):
        self.values, self.fail_at, self.read = values, fail_at, []

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError(f"disk gone at image {i}")
        self.read.append(i)
        return {"index": np.int32(i), "image": self.values[i]}


def _toy_pass(statistic, source, devices=2, **kwargs):
    """`statistic` over `source`'s images as activations of layer "l"."""
    return driver.run_pass(
        "toy",
        statistic,
        source,
        mesh=parallel.data_mesh(devices),
        batch_size=4,
        forward=jax.jit(lambda v, x: {"l": x}),
        num_threads=0,
        **kwargs,
    )


def _run(source, tmp_path, devices=2):
    """The pass of `_count_above("l", 3, 0.5)`, checkpointed after every batch."""
    return _toy_pass(
        _count_above("l", 3, 0.5),
        source,
        devices,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_every=1,
    )


def _dissector(tap, probe, settings, mesh, **kwargs) -> engine.Dissector:
    """A quiet Dissector of the test model ("net") on `mesh`."""
    return engine.Dissector(
        tap,
        probe,
        settings,
        input_spec=SPEC,
        model_key="net",
        mesh=mesh,
        progress=False,
        num_threads=0,
        **kwargs,
    )


def test_a_new_statistic_resumes_after_a_crash(tmp_path):
    values = np.random.default_rng(0).random((30, 2, 2, 3)).astype(np.float32)
    want = {
        "above": (values > 0.5).sum((0, 1, 2)),
        "images": np.int32(30),
    }
    with pytest.raises(OSError, match="image 21"):
        _run(_Values(values, fail_at=21), tmp_path)
    again = _Values(values)
    got = _run(again, tmp_path)
    # Batches 0-4 (images 0-19) came from the checkpoint (the loader reads image 0 for
    # the shapes of padding).
    assert set(again.read) - {0} == set(range(20, 30))
    np.testing.assert_array_equal(got["above"], want["above"])
    assert int(got["images"]) == 30


def test_jax_64_bit_mode_is_refused_in_one_line(monkeypatch):
    """Under JAX_ENABLE_X64 the passes mixed int64 with int32 (a TypeError from inside a
    quantile or tally program); refused before the first batch, naming the variable."""
    values = _Values(np.zeros((4, 2, 2, 3), np.float32))
    with jax.enable_x64(True), pytest.raises(ValueError, match=r"^JAX_ENABLE_X64 is set"):
        _toy_pass(_count_above("l", 3, 0.5), values)
    assert values.read == []
    assert _toy_pass(_count_above("l", 3, 0.5), values)["images"] == 4


def test_a_checkpoint_resumes_only_on_the_mesh_it_was_written_on(tmp_path):
    """A pass cut short on 2 devices and run again on 4 starts over (its per-device states
    do not fit 4 devices) and keeps the 2-device checkpoint, which a run on 2 resumes."""
    values = np.random.default_rng(1).random((30, 2, 2, 3)).astype(np.float32)
    with pytest.raises(OSError, match="image 21"):
        _run(_Values(values, fail_at=21), tmp_path, devices=2)
    on_four = _Values(values)
    got = _run(on_four, tmp_path, devices=4)
    assert set(on_four.read) == set(range(30))
    np.testing.assert_array_equal(got["above"], (values > 0.5).sum((0, 1, 2)))
    on_two = _Values(values)
    _run(on_two, tmp_path, devices=2)
    assert set(on_two.read) - {0} == set(range(20, 30))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2-devices", "4-devices"]


SPEC = InputSpec(32, (120.0, 120.0, 120.0), (60.0, 60.0, 60.0))


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, name="conv1")(x))
        return nn.Conv(4, (3, 3), strides=2, name="conv2")(x).mean((1, 2))


def test_a_third_pass_composes_from_outside_and_the_network_compiles_once(tmp_path):
    probe = Broden.open(synthetic.generate_tiny(tmp_path / "broden", num_images=13))
    model = _Net()
    variables = init_variables(model, jnp.zeros((1, 32, 32, 3)), seed=0)
    tap = capture.make_tap(model, variables, ("conv1",), input_shape=(32, 32, 3))
    settings = engine.Settings(quantile=0.05, quantile_mode="exact", batch_size=8)
    # activation_cache none: pass 2 runs the network again
    dissector = _dissector(tap, probe, settings, parallel.data_mesh(2), activation_cache="none")
    stats = dissector.run(tap.variables)["conv1"]

    # Pass 3: the unit masks' pixels, counted by a statistic the driver has never seen.
    thresholds = jnp.asarray(stats.thresholds)

    def init(shard):
        return jnp.zeros((6,), jnp.int32)

    def update(state, batch):
        m = masks.unit_masks(batch["acts"]["conv1"], thresholds, probe.seg_size)
        return state + (m & batch["valid"][:, None, None, None]).sum((0, 1, 2), dtype=jnp.int32)

    pixels = driver.run_pass(
        "pass3",
        statistics.Statistic(init, update, jnp.add, np.asarray),
        engine.Fields(probe, images=True, labels=False),
        mesh=dissector.mesh,
        batch_size=8,
        forward=dissector.forward,
        variables=tap.variables,
        num_threads=0,
    )
    np.testing.assert_array_equal(pixels, stats.counts["unit_total"])
    # One compiled forward served passes 1, 2 and 3.
    assert dissector.forward._step._cache_size() == 1


@pytest.fixture
def earlier_threads() -> frozenset[threading.Thread]:
    """The threads alive before the test, but its own: compilations an earlier test left
    running in the background (pass 2's, compiled ahead of a pass 1 that stopped) end on
    them, and are none of this test's."""
    return frozenset(threading.enumerate()) - {threading.current_thread()}


def _backend_compiles(run, earlier: frozenset[threading.Thread]) -> int:
    """How many XLA executables `run()` compiles or reads from the persistent compilation
    cache (the test session has one: conftest.py), on threads not in `earlier`."""
    from jax._src import dispatch

    count = []

    def compiled(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT and threading.current_thread() not in earlier:
            count.append(event)

    def read(event, **kwargs):
        if (
            event == "/jax/compilation_cache/cache_hits"
            and threading.current_thread() not in earlier
        ):
            count.append(event)

    jax.monitoring.register_event_duration_secs_listener(compiled)
    jax.monitoring.register_event_listener(read)
    try:
        run()
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
        jax.monitoring.unregister_event_listener(read)
    return len(count)


def test_initial_states_compile_nothing(earlier_threads):
    """Every statistic's initial state is made on the host and transferred: no XLA program
    per field's shape (eager `jnp.full` compiles one for each new shape, on a first run's
    critical path). Shapes of 173 units, used nowhere else, keep JAX's caches cold."""
    from jaxdissect import formula_counts, formulas, significance
    from jaxdissect.labelspace import LabelSpace

    k, thresholds = 173, np.linspace(0, 1, 173, dtype=np.float32)
    labels = LabelSpace(("a", "b"), ("-", "x", "y", "z"), np.array([-1, 0, 1, 1]), (False, True))
    table = formulas.FormulaTable.of([[]] * k, slots=3)
    made = {
        **{
            f"quantile {mode}": statistics.quantile_statistic(
                "l", k, total_count=4173, q=0.01, mode=mode, activation_dtype="float16"
            )
            for mode in ("exact", "sketch", "histogram")
        },
        "top images": statistics.top_images_statistic("l", k, 3, (5, 7)),
        "tally": statistics.tally_statistic(
            "l", thresholds, labels, restriction="overlap", patterns=True
        ),
        "ties": statistics.ties_statistic("l", thresholds),
        "significance": significance.mask_statistic(
            "l", thresholds, [1, 3], num_images=11, seg_size=(5, 7)
        ),
        "formulas": formula_counts.formula_statistic("l", thresholds, table, 4),
    }
    for name, statistic in made.items():
        made_here = _backend_compiles(
            lambda s=statistic: statistics.stack_shards(s, 2), earlier_threads
        )
        assert made_here == 0, name
    # The counter sees an eager fill of a new shape.
    assert _backend_compiles(lambda: jnp.full((k, 3, 5), 7.0), earlier_threads) > 0


@pytest.mark.slow
def test_dissectors_sharing_steps_compile_once(tmp_path, earlier_threads):
    probe = Broden.open(synthetic.generate_tiny(tmp_path / "broden", num_images=13))
    model = _Net()
    variables = init_variables(model, jnp.zeros((1, 32, 32, 3)), seed=0)
    tap = capture.make_tap(model, variables, ("conv1", "conv2"), input_shape=(32, 32, 3))
    mesh = parallel.data_mesh(2)
    steps = driver.Steps()

    def dissect(settings, shared, scale=1.0):
        d = _dissector(tap, probe, settings, mesh, steps=shared)
        scaled = jax.tree.map(lambda v: v * scale, tap.variables)
        out = {}
        n = _backend_compiles(lambda: out.update(d.run(scaled)), earlier_threads)
        return out, n

    settings = engine.Settings(quantile=0.05, batch_size=8)
    _, first = dissect(settings, steps)
    assert first > 0  # the counter sees compilations
    # Other weights, same structure: the forward and both passes' steps are reused.
    second, n = dissect(settings, steps, scale=2.0)
    assert n == 0
    alone, _ = dissect(settings, None, scale=2.0)
    for layer in tap.layers:
        np.testing.assert_array_equal(second[layer].thresholds, alone[layer].thresholds)
        for k, v in alone[layer].counts.items():
            np.testing.assert_array_equal(second[layer].counts[k], v)
    # A setting that changes pass 2's step (its key) is compiled anew, with its own numbers.
    other = dataclasses.replace(settings, restriction="none")
    shared, n = dissect(other, steps)
    assert n > 0
    alone, _ = dissect(other, None)
    for layer in tap.layers:
        for k, v in alone[layer].counts.items():
            np.testing.assert_array_equal(shared[layer].counts[k], v)


def test_pipeline_dissections_of_one_architecture_compile_once(tmp_path, earlier_threads):
    from jaxdissect import pipeline

    probe = Broden.open(synthetic.generate_tiny(tmp_path / "broden", num_images=13))
    settings = engine.Settings(quantile=0.05, batch_size=8)
    options = pipeline.Options(progress=False, report=False, num_threads=0)
    steps = driver.Steps()

    def dissect(seed: int, out: str) -> int:
        model = _Net()  # a new module object each time, as a new checkpoint's load gives
        variables = init_variables(model, jnp.zeros((1, 32, 32, 3)), seed=seed)
        info = pipeline.ModelInfo(model, variables, SPEC, "net", f"net-{seed}")
        return _backend_compiles(
            lambda: pipeline.dissect(
                info,
                ["conv1"],
                probe,
                settings,
                tmp_path / out,
                dataset_name="tiny",
                mesh=parallel.data_mesh(1),
                options=options,
                steps=steps,
            ),
            earlier_threads,
        )

    assert dissect(0, "a") > 0
    assert dissect(1, "b") == 0


def test_equal_programs_compiled_ahead_at_once_compile_once(monkeypatch):
    """Two jitted functions of one program (a stack's members' equal steps) compiled ahead
    at the same time: XLA compiles it once and the other reads that executable from the
    persistent compilation cache (the session has one: conftest.py), though the first's
    cache write is slowed so that both are in flight together."""
    from jax._src import compiler

    write = compiler._cache_write

    def slow_write(*args, **kwargs):
        time.sleep(0.5)
        return write(*args, **kwargs)

    def jitted_step():  # a new function each time, as each member's step is
        def step(x):
            return jnp.cumsum(jnp.sin(x) * 3.0, axis=0)

        return jax.jit(step)

    def listener(event, **kwargs):
        events.append(event)

    monkeypatch.setattr(compiler, "_cache_write", slow_write)
    events = []
    steps = driver.Steps(compile_threads=2)
    like = jax.ShapeDtypeStruct((171, 13), jnp.float32)  # a shape nowhere else: a cold cache
    jax.monitoring.register_event_listener(listener)
    try:
        for future in [steps.compile_ahead(jitted_step(), like) for _ in range(2)]:
            future.result()
    finally:
        jax.monitoring.unregister_event_listener(listener)
    requests = events.count("/jax/compilation_cache/compile_requests_use_cache")
    assert (requests, events.count("/jax/compilation_cache/cache_hits")) == (2, 1)


def _compile_events(run, earlier: frozenset[threading.Thread]) -> list[str]:
    """The names of the XLA executables `run()` compiles (persistent-cache reads too), on
    threads not in `earlier`."""
    from jax._src import dispatch

    names = []

    def compiled(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT and threading.current_thread() not in earlier:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(compiled)
    try:
        run()
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
    return names


@pytest.mark.parametrize("devices", [1, 2])
def test_steps_compiled_ahead_are_not_compiled_again_and_change_no_number(
    tmp_path, devices, earlier_threads
):
    # Background compilation (pass 1's forward and per-layer steps at once, pass 2's during
    # pass 1) against none at all: the same numbers, and the calls compile nothing more.
    probe = Broden.open(synthetic.generate_tiny(tmp_path / "broden", num_images=13))
    model = _Net()
    variables = init_variables(model, jnp.zeros((1, 32, 32, 3)), seed=0)
    tap = capture.make_tap(model, variables, ("conv1", "conv2"), input_shape=(32, 32, 3))
    settings = engine.Settings(quantile=0.05, batch_size=8)

    def dissect(threads, scale):
        steps = driver.Steps(compile_threads=threads)
        d = _dissector(tap, probe, settings, parallel.data_mesh(devices), steps=steps)
        scaled = jax.tree.map(lambda v: v * scale, tap.variables)
        out = {}
        names = _compile_events(lambda: out.update(d.run(scaled)), earlier_threads)
        return out, names, steps

    # A scale never used elsewhere in the session: nothing is in JAX's in-memory caches.
    ahead, ahead_names, steps = dissect(2, 3.25)
    assert steps._ahead and all(f.done() for f in steps._ahead.values())
    assert not steps._pending  # every program compiled ahead was waited for before its call
    alone, alone_names, _ = dissect(0, 3.25)
    # The forward and a step per layer and pass compiled once either way, and each pass's
    # closing merge of the devices' states (on 2): none compiled again at its call (the
    # fills and threshold searches JAX keeps itself, across both).
    programs = 1 + 2 * len(tap.layers)
    assert ahead_names.count("jit(local)") == alone_names.count("jit(local)") == programs
    merges = 2 if devices > 1 else 0
    assert sum(key[0] is statistics.merge_program for key in steps._ahead) == merges
    assert ahead_names.count("jit(_reduce_pairs)") == merges
    assert alone_names.count("jit(_reduce_pairs)") == merges
    for layer in tap.layers:
        np.testing.assert_array_equal(ahead[layer].thresholds, alone[layer].thresholds)
        np.testing.assert_array_equal(ahead[layer].top_maps, alone[layer].top_maps)
        np.testing.assert_array_equal(ahead[layer].top_indices, alone[layer].top_indices)
        for k, v in alone[layer].counts.items():
            np.testing.assert_array_equal(ahead[layer].counts[k], v)


def test_a_group_runs_as_one_program_per_part_with_the_numbers_of_one_program(tmp_path):
    values = np.random.default_rng(1).random((19, 2, 2, 3)).astype(np.float32)
    parts = {"low": _count_above("l", 3, 0.25), "high": _count_above("l", 3, 0.75)}
    grouped = statistics.group(parts)
    assert grouped.parts == parts
    whole = statistics.Statistic(grouped.init, grouped.update, grouped.merge, grouped.finalize)
    steps = driver.Steps()

    def run(statistic):
        return _toy_pass(statistic, _Values(values), steps=steps)

    split = run(grouped)
    one = run(whole)
    for name in parts:
        for k in ("above", "images"):
            np.testing.assert_array_equal(split[name][k], one[name][k])
    np.testing.assert_array_equal(split["high"]["above"], (values > 0.75).sum((0, 1, 2)))
    assert split["low"]["images"] == 19


def _counted_stage(tmp_path):
    """(calls, outputs): `outputs()` is `driver.stage_outputs` of a one-layer stage in
    `tmp_path` whose every computation appends to `calls`."""
    calls = []

    def compute():
        calls.append(1)
        return {"conv1": {"counts": np.arange(6)}}

    def outputs():
        return driver.stage_outputs(
            tmp_path, "pass2", {"conv1": "k1"}, {"conv1": {"layer": "conv1"}}, compute
        )

    return calls, outputs


def test_a_damaged_stored_stage_is_computed_again(tmp_path):
    """A stage marked done whose arrays were cut short afterwards is not reused: it is
    computed and stored again (and a whole one is reused without computing)."""
    calls, outputs = _counted_stage(tmp_path)
    first = outputs()
    stored = tmp_path / "pass2-k1" / "arrays.npz"
    assert outputs()["conv1"]["counts"].tolist() == first["conv1"]["counts"].tolist()
    assert len(calls) == 1
    stored.write_bytes(stored.read_bytes()[:50])
    again = outputs()
    assert len(calls) == 2 and again["conv1"]["counts"].tolist() == list(range(6))
    assert store.load_arrays(stored)["counts"].tolist() == list(range(6))
    assert outputs() and len(calls) == 2


def test_stage_reuse_is_process_0s_decision_and_needs_every_process_to_read(tmp_path, monkeypatch):
    """Under several processes, a stage is reused where process 0 finds it stored (another
    process's own answer is not asked), and computed by all where any cannot read it."""
    calls, outputs = _counted_stage(tmp_path)
    outputs()
    monkeypatch.setattr(parallel, "process_0s", lambda done: False)  # process 0 has none
    outputs()
    assert len(calls) == 2
    monkeypatch.setattr(parallel, "process_0s", lambda done: True)
    monkeypatch.setattr(parallel, "all_processes", lambda ok: False)  # another cannot read
    outputs()
    assert len(calls) == 3
    monkeypatch.setattr(parallel, "all_processes", lambda ok: ok)
    assert outputs()["conv1"]["counts"].tolist() == list(range(6)) and len(calls) == 3


def test_an_update_that_changes_its_state_is_refused_after_the_first_batch():
    """A state that grows a dimension (a compile per batch) or turns its int32 counts into
    floats (no longer exact) is refused after the first batch, naming the part and leaf."""
    values = np.random.default_rng(2).random((12, 2, 2, 3)).astype(np.float32)
    base = _count_above("l", 3, 0.5)

    def grows(state, batch):
        new = base.update(state, batch)
        return {**new, "above": new["above"][None]}

    def floats(state, batch):
        new = base.update(state, batch)
        return {**new, "images": new["images"].astype(jnp.float32)}

    def run(statistic):
        return _toy_pass(statistic, _Values(values))

    with pytest.raises(
        ValueError,
        match=r"^run_pass 'toy': the statistic's update changed its state at \['above'\]: "
        r"int32\[3\] -> int32\[1, 3\]; update must return",
    ):
        run(base._replace(update=grows))
    with pytest.raises(
        ValueError,
        match=r"part 'b''s update changed its state at \['images'\]: int32\[\] -> float32\[\]",
    ):
        run(statistics.group({"a": base, "b": base._replace(update=floats)}))
    np.testing.assert_array_equal(run(base)["above"], (values > 0.5).sum((0, 1, 2)))
