"""One case of each random campaign of `tests/fuzz_reference.py`, so that the campaigns
keep running; their length lives in the campaigns, not in the suite."""

from tests import fuzz_inputs, fuzz_numbers


def test_a_random_tally_case_of_each_method_equals_the_reference():
    # Seeds drawing the segment method with unit blocks, compact and matmul.
    for seed in (9, 2, 3):
        desc, bad = fuzz_numbers.tally_case(seed)
        assert not bad, desc


def test_a_random_quantile_case_equals_the_reference_bitwise():
    desc, bad = fuzz_numbers.quantile_case(27)
    assert not bad, desc


def test_a_random_dissection_equals_the_reference(tmp_path):
    desc, bad = fuzz_numbers.engine_case(34, work=tmp_path)
    assert not bad, desc


def test_random_formula_searches_equal_the_numpy_beam_and_brute_force():
    # Restricted (overlap), length 3 with a beam of 1; unrestricted, length 3, beam 4.
    for seed in (5, 10):
        desc, bad = fuzz_numbers.search_case(seed)
        assert not bad, desc


def test_random_layers_of_counts_are_labelled_as_the_reference():
    for seed in range(100):  # numpy only: a hundred cases in a fraction of a second
        desc, bad = fuzz_numbers.results_case(seed)
        assert not bad, (seed, desc)


def test_mutated_broden_folders_read_or_fail_in_one_named_error(tmp_path):
    # A NUL inserted in an index.csv path and a hostile cell (both raised a bare
    # ValueError before broden_tables refused them), and a few other mutations.
    base = fuzz_inputs.broden_base(tmp_path)
    for seed in (701, 1089, *range(10)):
        desc, bad = fuzz_inputs.broden_case(seed, base)
        assert not bad, (seed, desc)


def test_mutated_weight_files_load_or_fail_in_one_named_error(tmp_path):
    # Three that raised past checkpoint_io's errors (zipfile's OSError on a cut zip,
    # numpy's header tokenizer), and a few other mutations.
    bases = fuzz_inputs.weights_bases(tmp_path)
    for seed in (31, 46, 147, *range(10)):
        desc, bad = fuzz_inputs.weights_case(seed, bases)
        assert not bad, (seed, desc)


def test_mutated_results_files_read_or_fail_in_one_named_error(tmp_path):
    # Four that raised a TypeError or AttributeError in a reader before
    # results_schema checked the file, and others.
    run, _ = fuzz_inputs.results_json_run(tmp_path)
    for seed in (258, 277, 281, 299, *range(30)):
        desc, bad = fuzz_inputs.results_json_case(seed, run)
        assert not bad, (seed, desc)


def test_mutated_converted_checkpoints_load_or_fail_in_one_named_error(tmp_path):
    # An option the architecture does not take and widths that raised a TypeError or an
    # OverflowError while building the model.
    base = fuzz_inputs.converted_base(tmp_path)
    for seed in (88, 99, 244, 5):
        desc, bad = fuzz_inputs.converted_case(seed, base)
        assert not bad, (seed, desc)


def test_hostile_flag_values_stop_in_one_line_or_reach_the_dissection(tmp_path):
    # --seed=99999999999999999999 (an OverflowError in the pass before config.check_fields).
    data = fuzz_inputs.broden_base(tmp_path)
    for seed in (300, 0, 1, 2):
        desc, bad = fuzz_inputs.flags_case(seed, data)
        assert not bad, (seed, desc)


def test_damaged_resume_checkpoints_restore_the_state_saved_or_restart(tmp_path):
    base = fuzz_inputs.checkpoint_base(tmp_path)
    for seed in range(10):
        desc, bad = fuzz_inputs.checkpoint_case(seed, base)
        assert not bad, (seed, desc)


def test_damaged_training_checkpoints_resume_a_saved_step_or_refuse(tmp_path):
    base = fuzz_inputs.train_checkpoint_base(tmp_path)
    for seed in range(10):
        desc, bad = fuzz_inputs.train_checkpoint_case(seed, base)
        assert not bad, (seed, desc)
