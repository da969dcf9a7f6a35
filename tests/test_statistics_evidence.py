"""Tests of `python -m training.statistics_evidence`: test accuracy by epoch and statistics.

The end-to-end test runs `--quick` in a subprocess (the MLP, 2 epochs of 3 steps, four
training runs: about 30 s of CPU time). The program draws its figure with matplotlib;
the tests that need it are skipped without it.
"""

import json
import os

import pytest

from program_runs import png_size, run_python
from training import statistics_evidence as evidence

TIMEOUT_SECONDS = 600


def run_program(args):
    """Runs `python -m training.statistics_evidence args` in a fresh process."""
    return run_python(["-m", "training.statistics_evidence", *args], TIMEOUT_SECONDS)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, digits_data_dir):
    """`--quick` run once: (completed process, output directory)."""
    pytest.importorskip("matplotlib", reason="the figure is drawn with matplotlib")
    out = tmp_path_factory.mktemp("statistics")
    done = run_program(["--quick", "--out", os.fspath(out), "--data-dir", digits_data_dir])
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


def test_quick_run_writes_a_png_figure(quick_run):
    _, out = quick_run
    width, height = png_size(out / "accuracy_by_epoch.png")
    assert (width, height) == (800, 500)
    assert os.path.getsize(out / "accuracy_by_epoch.png") > 10_000  # lines, not blank


def test_quick_run_json_holds_every_series_for_every_epoch_and_seed(quick_run):
    _, out = quick_run
    document = json.loads((out / "accuracy_by_epoch.json").read_text())
    assert document["epochs"] == [1, 2] and document["seeds"] == [0]
    assert document["model"] == "mlp" and document["steps_per_epoch"] == 3
    assert [s["key"] for s in document["series"]] == [s.key for s in evidence.SERIES]
    for series in document["series"]:
        curves = [series["test_accuracy"]["0"], series["mean"], series["min"],
                  series["max"]]
        for curve in curves:
            assert len(curve) == 2
            assert all(0.0 <= value <= 1.0 for value in curve), series
    assert all(0.0 <= value <= 1.0 for value in document["training_accuracy"]["0"])
    # The runs of a seed train the same weights: only the statistics served differ.
    assert set(document["weight_difference_vs_first_series"]) == {
        s.key for s in evidence.SERIES[1:]}
    assert all(value < 1e-5 for value in document["weight_difference_vs_first_series"]
               .values())
    assert document["command"].startswith("python -m training.statistics_evidence --quick")


def test_quick_run_markdown_table_has_a_row_per_epoch_and_a_column_per_series(quick_run):
    done, out = quick_run
    table = (out / "accuracy_by_epoch.md").read_text()
    assert table in done.stdout  # the program prints the table it writes
    header = next(line for line in table.splitlines() if line.startswith("| epoch"))
    for series in evidence.SERIES:
        assert series.label in header
    rows = [line for line in table.splitlines() if line.startswith("| 1 |")
            or line.startswith("| 2 |")]
    assert len(rows) == 2
    assert all(row.count("|") == len(evidence.SERIES) + 3 for row in rows)


def synthetic_document(seeds=(0, 1)):
    epochs = [1, 2, 3]
    series = []
    for index, item in enumerate(evidence.SERIES):
        per_seed = {str(seed): [0.1 * (index + 1) + 0.01 * seed + 0.1 * e for e in epochs]
                    for seed in seeds}
        curves = list(per_seed.values())
        series.append({"key": item.key, "label": item.label, "test_accuracy": per_seed,
                       "mean": [sum(c[i] for c in curves) / len(curves) for i in range(3)],
                       "min": [min(c[i] for c in curves) for i in range(3)],
                       "max": [max(c[i] for c in curves) for i in range(3)]})
    return {"command": "python -m training.statistics_evidence", "model": "resnet",
            "num_test": 360, "batch_size": 64, "steps_per_epoch": 23,
            "optimizer": "SGD", "seeds": list(seeds), "epochs": epochs, "series": series,
            "training_accuracy": {str(seed): [0.5, 0.6, 0.7] for seed in seeds}}


def test_markdown_shows_mean_and_range_over_several_seeds():
    table = evidence.markdown(synthetic_document(seeds=(0, 1)))
    assert "| 1 | 0.205 (0.200–0.210) |" in table
    assert "mean (min–max) over seeds 0, 1" in table


def test_markdown_shows_the_value_alone_for_one_seed():
    table = evidence.markdown(synthetic_document(seeds=(3,)))
    assert "| 1 | 0.230 | " in table and "seed 3." in table


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the figure is drawn with matplotlib")
    evidence.plot(synthetic_document(), tmp_path / "figure.png")
    assert png_size(tmp_path / "figure.png") == (800, 500)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: expected an int >= 1, got '0'"),
    (["--epochs", "two"], "argument --epochs: expected an int >= 1, got 'two'"),
    (["--seeds", "-1"], "argument --seeds: expected an int >= 0, got '-1'"),
    (["--seeds", "1", "1"], "argument --seeds: each seed once; received 1 1"),
    (["--model", "vgg"], "argument --model: invalid choice: 'vgg'"),
])
def test_bad_flags_are_one_line_errors_with_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        evidence.parse_args(argv)
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="checked after the flags it needs")
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(SystemExit):
        evidence.parse_args(["--out", os.fspath(path)])
    assert "argument --out must be a directory" in capsys.readouterr().err


def test_quick_fills_only_the_flags_not_given():
    pytest.importorskip("matplotlib", reason="parse_args checks that it is installed")
    args = evidence.parse_args(["--quick", "--epochs", "3"])
    assert (args.model, args.epochs, args.steps_per_epoch, args.seeds) == (
        "mlp", 3, 3, (0,))
    assert evidence.command_line(args) == (
        "python -m training.statistics_evidence --quick --epochs 3")
    args = evidence.parse_args(["--quick"])
    assert evidence.command_line(args) == "python -m training.statistics_evidence --quick"
    args = evidence.parse_args([])
    assert (args.model, args.epochs, args.steps_per_epoch, args.seeds) == (
        "resnet", 10, None, (0, 1, 2))
    assert evidence.command_line(args) == (
        "python -m training.statistics_evidence --epochs 10 --seeds 0 1 2")
