"""Tests of `python -m training.small_batches` (test accuracy at small per-replica batches).

The end-to-end test runs `--quick` in a subprocess: 2 replicas of 4 examples, 3 steps,
the five kinds of batch norm (about 60 s of CPU time, most of it tracing the training
step and the population pass of each model under MirroredStrategy).
"""

import json
import os

import numpy as np
import pytest

from program_runs import run_python
from training import small_batches

TIMEOUT_SECONDS = 900


def run_program(args):
    """Runs `python -m training.small_batches args` in a fresh process."""
    return run_python(["-m", "training.small_batches", *args], TIMEOUT_SECONDS)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, digits_data_dir):
    """`--quick` run once: (completed process, output directory)."""
    out = tmp_path_factory.mktemp("small_batches")
    done = run_program(["--quick", "--out", os.fspath(out), "--data-dir", digits_data_dir])
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


def test_quick_run_json_holds_every_cell_in_0_1(quick_run):
    _, out = quick_run
    document = json.loads((out / "small_batches.json").read_text())
    assert (document["replicas"], document["per_replica_batches"], document["steps"],
            document["seeds"]) == (2, [4], 3, [0])
    assert [m["key"] for m in document["methods"]] == [m.key for m in small_batches.METHODS]
    for method in document["methods"]:
        cell = method["accuracy"]["4"]
        statistics = ("moving", "training") + (("population",) if method["key"] != "none"
                                               else ())
        for statistic in statistics:
            values = [cell[statistic][key] for key in ("mean", "min", "max")]
            values += list(cell[statistic]["per_seed"].values())
            assert all(0.0 <= value <= 1.0 for value in values), (method["key"], statistic)
    none = next(m for m in document["methods"] if m["key"] == "none")
    assert none["accuracy"]["4"]["population"] is None  # no statistics to recompute


def test_quick_run_markdown_table_has_a_row_per_method_and_statistics(quick_run):
    done, out = quick_run
    table = (out / "small_batches.md").read_text()
    assert table in done.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # no header
    assert len(rows) == 2 * len(small_batches.METHODS) - 1  # no BN: one row
    for method in small_batches.METHODS:
        assert sum(row.startswith(f"| {method.label} |") for row in rows) == (
            1 if method.key == "none" else 2)
    assert "2 × 4 (global 8)" in table
    assert "`python -m training.small_batches --quick" in table
    assert "not run" not in table  # ghost BN's groups of 2 fit a batch of 4


def test_ghost_bn_applies_only_to_batches_larger_than_its_groups():
    ghost = next(m for m in small_batches.METHODS if m.key == "ghost")
    assert not ghost.applies_to(2)
    assert ghost.applies_to(4) and ghost.applies_to(8)
    assert all(m.applies_to(2) for m in small_batches.METHODS if m.key != "ghost")


def test_a_cell_not_run_is_null_in_json_and_a_dash_with_a_note_in_markdown():
    cell = {"moving": 0.5, "population": 0.75, "training": 0.6}
    results = {m.key: {2: {0: dict(cell, population=None if m.key == "none" else 0.75)},
                       4: {0: dict(cell, population=None if m.key == "none" else 0.75)}}
               for m in small_batches.METHODS}
    del results["ghost"][2]

    class Args:
        quick, steps, seeds, per_replica, replicas, out = (
            False, 10, (0,), (2, 4), 4, small_batches.DEFAULT_OUT)

    class Info:
        num_train, num_test = 1437, 360

    document = small_batches.summary(results, Args, type("Data", (), {"info": Info}), 1.0)
    ghost = next(m for m in document["methods"] if m["key"] == "ghost")
    assert ghost["accuracy"]["2"] == {"moving": None, "population": None, "training": None}
    assert ghost["accuracy"]["4"]["population"]["mean"] == 0.75
    table = small_batches.markdown(document)
    assert "| ghost BN (virtual_batch_size=2) | moving averages | — | 0.500 |" in table
    assert "not run: ghost BN's groups of 2" in table
    assert document["command"] == ("python -m training.small_batches --steps 10 --seeds 0 "
                                   "--per-replica 2 4")


def test_batch_norm_options_copy_every_other_weight(mirrored_strategy):
    import keras

    import kerasbn
    from training import models

    with mirrored_strategy.scope():
        model = models.build_model("mlp", (8, 8, 1), 10, "kerasbn", bn_jit_compile=False)
        copy = small_batches.with_batch_norm_options(
            model, {"renorm": True, "renorm_clipping": small_batches.RENORM_CLIPPING})
    norms = [layer for layer in copy.layers
             if isinstance(layer, kerasbn.BatchNormalization)]
    assert len(norms) == 3 and all(layer.renorm for layer in norms)
    assert norms[0].renorm_clipping == {"rmin": 1 / 3, "rmax": 3.0, "dmax": 5.0}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            copied = copy.get_layer(layer.name).get_weights()
            for old, new in zip(layer.get_weights(), copied):
                np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: expected an int >= 1, got '0'"),
    (["--per-replica", "1"], "argument --per-replica: expected an int >= 2, got '1'"),
    (["--per-replica", "4", "4"], "argument --per-replica: each value once; received 4 4"),
    (["--replicas", "1"], "argument --replicas: expected an int >= 2, got '1'"),
    (["--seeds", "x"], "argument --seeds: expected an int >= 0, got 'x'"),
])
def test_bad_flags_are_one_line_errors_with_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        small_batches.parse_args(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(SystemExit):
        small_batches.parse_args(["--out", os.fspath(path)])
    assert "argument --out must be a directory" in capsys.readouterr().err


def test_defaults_and_quick():
    args = small_batches.parse_args([])
    assert (args.steps, args.seeds, args.per_replica, args.replicas) == (
        300, (0,), (2, 4, 8), 4)
    args = small_batches.parse_args(["--quick"])
    assert (args.steps, args.seeds, args.per_replica, args.replicas) == (3, (0,), (4,), 2)
    assert small_batches.command_line(args) == "python -m training.small_batches --quick"


def test_command_line_names_what_quick_does_not_set():
    args = small_batches.parse_args(["--quick", "--steps", "5"])
    assert small_batches.command_line(args) == (
        "python -m training.small_batches --quick --steps 5")
    args = small_batches.parse_args(["--replicas", "2", "--out", "elsewhere"])
    assert small_batches.command_line(args) == (
        "python -m training.small_batches --steps 300 --seeds 0 --per-replica 2 4 8 "
        "--replicas 2 --out elsewhere")
