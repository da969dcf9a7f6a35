"""End-to-end test of training/benchmark.py: `--quick` runs and writes what it promises.

The program runs in a subprocess (it configures TensorFlow's devices and threads before
TensorFlow starts, which this pytest process has already done its own way). Nothing
here is about speed: only that every section produced positive times or was skipped
with a reason, and that the JSON, the chart and the tables agree.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training import benchmark

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_SECONDS = 600  # the quick run takes under a minute on an idle 2-core machine

LAYER_CONTENDERS = ["kerasbn", "kerasbn XLA", "kerasbn jit_compile=False", "keras",
                    "keras XLA"]
SYNC_CONTENDERS = ["kerasbn sync", "kerasbn", "keras sync", "keras"]
EXPORT_CONTENDERS = ["kerasbn export folded", "keras export"]


def installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.run(
        [sys.executable, "-m", "training.benchmark", "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert process.returncode == 0, (
        f"exit {process.returncode}\nstdout:\n{process.stdout[-4000:]}\n"
        f"stderr:\n{process.stderr[-4000:]}")
    return out, json.loads((out / "results.json").read_text()), process.stdout


def groups(document, section):
    return [g for g in document["groups"] if g["section"] == section]


def skipped(document, section):
    """Names of the contenders skipped in a section (without the "(case)" suffix)."""
    return {s["contender"].split(" (")[0] for s in document["skipped"]
            if s["section"] == section}


def assert_timed(group, reps):
    for name, result in group["contenders"].items():
        assert len(result["times_ms"]) == reps, (group["case"], name)
        assert all(t > 0 for t in result["times_ms"]), (group["case"], name)
        assert result["p25_ms"] <= result["median_ms"] <= result["p75_ms"]


def assert_contenders(document, group, required, optional=()):
    """`required` were timed; each of `optional` was timed or skipped with a reason."""
    present = set(group["contenders"])
    assert not set(required) - present, (group["case"], document["skipped"])
    # A library that is not installed is skipped once, by its name ("torch").
    skipped_here = skipped(document, group["section"])
    unexplained = [name for name in optional if name not in present
                   and name not in skipped_here and name.split()[0] not in skipped_here]
    assert not unexplained, (group["case"], unexplained, document["skipped"])


def test_outputs_are_written_and_reported(quick_run):
    out, document, stdout = quick_run
    assert document["quick"] is True
    assert "Ratios of medians" in stdout and str(out) in stdout
    assert document["machine"]["cpu_model"] and document["machine"]["threads"] >= 1
    assert document["machine"]["versions"]["tensorflow"]
    assert all(s["reason"] for s in document["skipped"])
    assert "| contender |" in (out / "results.md").read_text()
    if installed("matplotlib"):
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "chart" in {s["section"] for s in document["skipped"]}


def test_every_section_ran_or_says_why(quick_run):
    _, document, _ = quick_run
    for section in benchmark.SECTIONS:
        said_why = any(s["section"] == section and s["contender"] == "all"
                       for s in document["skipped"])
        assert groups(document, section) or said_why, section
    for section in ("layer", "bandwidth", "sync", "resnet"):
        assert groups(document, section), section
    if installed("kerasbn.export"):
        assert groups(document, "export")


def test_layer_section(quick_run):
    _, document, _ = quick_run
    cases = benchmark.QUICK["layer_cases"]
    layer = groups(document, "layer")
    assert {(g["params"]["shape_name"], g["params"]["mode"]) for g in layer} == {
        (name, mode) for name, _, _ in cases for mode in ("training", "inference")}
    for group in layer:
        torch_names = (["torch NCHW", "torch channels-last"]
                       if len(group["params"]["shape"]) == 4 else ["torch"])
        assert_contenders(document, group, LAYER_CONTENDERS, ["tf_keras"] + torch_names)
        for name in ("tf_keras", "torch"):
            if installed(name):
                assert any(n.startswith(name) for n in group["contenders"]), name
        assert_timed(group, document["config"]["layer_reps"])
        assert {(r["numerator"], r["denominator"]) for r in group["ratios"]} >= {
            ("kerasbn", "keras"), ("kerasbn XLA", "keras XLA")}


def test_bandwidth_section(quick_run):
    _, document, _ = quick_run
    bandwidth = groups(document, "bandwidth")
    assert [g["case"] for g in bandwidth] == [g["case"] for g in groups(document, "layer")]
    for group in bandwidth:
        assert group["params"]["fastest_copy_gbps"] > 0
        assert set(LAYER_CONTENDERS) <= set(group["contenders"])
        for result in group["contenders"].values():
            assert result["gbps"] > 0 and result["fraction"] > 0


def test_sync_section(quick_run):
    _, document, _ = quick_run
    (group,) = groups(document, "sync")
    assert group["params"]["replicas"] == benchmark.REPLICAS
    assert_contenders(document, group, SYNC_CONTENDERS)
    assert_timed(group, document["config"]["sync_reps"])
    assert {(r["numerator"], r["denominator"]) for r in group["ratios"]} >= {
        ("kerasbn sync", "kerasbn"), ("kerasbn sync", "keras sync")}


def test_resnet_and_export_sections(quick_run):
    _, document, _ = quick_run
    for group in groups(document, "resnet"):
        xla = ["kerasbn XLA", "keras XLA"] if document["config"]["resnet_xla"] else []
        assert_contenders(document, group, ["kerasbn", "keras"] + xla)
        assert_timed(group, document["config"]["resnet_reps"])
    export = groups(document, "export")
    if export:
        assert [g["params"]["batch"] for g in export] == \
            list(document["config"]["export_batches"])
    for group in export:
        assert_contenders(document, group, EXPORT_CONTENDERS)
        assert_timed(group, document["config"]["export_reps"])


def test_ratios_and_targets_follow_from_the_medians(quick_run):
    _, document, _ = quick_run
    assert document["ratios"]
    for row in document["ratios"]:
        assert row["ratio"] == pytest.approx(row["numerator_ms"] / row["denominator_ms"])
    assert document["targets"]
    for check in document["targets"]:
        assert check["met"] == (check["ratio"] < check["limit"] if "Keras synchronized"
                                in check["target"] else check["ratio"] <= check["limit"])


def test_round_robin_rotates_and_drops_a_failing_contender():
    calls, failures = [], []

    def failing():
        raise RuntimeError("broken")

    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    runs["d"] = failing
    times = benchmark.round_robin(runs, reps=3, warmup=1,
                                  on_error=lambda name, e: failures.append(name))
    assert failures == ["d"] and set(times) == {"a", "b", "c"}
    assert all(len(t) == 3 and min(t) > 0 for t in times.values())
    # Each timed call follows an untimed one of the same contender.
    assert calls[3:] == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a",
                         "c", "c", "a", "a", "b", "b"]


def test_missing_export_module_skips_the_section(monkeypatch):
    monkeypatch.setitem(sys.modules, "kerasbn.export", None)  # import raises ImportError
    report = benchmark.Report()
    benchmark.section_export(report, benchmark.QUICK, None, np.random.default_rng(0))
    assert not report.groups and report.skipped
    assert all(s["section"] == "export" and s["contender"] == "all" for s in report.skipped)
    assert any("kerasbn.export" in s["reason"] for s in report.skipped)


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--quick", "--sections", "--out"))
    for argv, word in ((["--sections", "layer,nonsense"], "nonsense"),
                       (["--reps", "0"], "--reps")):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(argv)
        assert exit_info.value.code == 2
        assert word in capsys.readouterr().err
