"""The benchmark of kerasbn against the batch norms of Keras 3, tf_keras and PyTorch.

    python -m training.benchmark                      # the full run: most of an hour
    python -m training.benchmark --quick              # small shapes, about two minutes
    python -m training.benchmark --help               # the sections, how it measures

Modules, in the order a run uses them:

    cli.py          the command line (`Options`) and `main`
    config.py       the sizes of a run, decided once: `FULL` or `QUICK`, a frozen `Config`
    optional.py     tf_keras, torch and matplotlib, each the module or None
    machine.py      threads and the CPU split before TensorFlow starts; the machine's facts
    sections.py     one function per section and `SECTIONS`, the table of them
    contenders.py   what is timed: layer calls of each library, copies of x, steps, exports
    harness.py      how it is timed: `Contender`, `Timing`, `round_robin`, `measure`, `Report`
    first_step.py   `python -m training.benchmark.first_step`: one fresh process's first
                    fit, and `run_fresh`, which starts one and reads its times
    results.py      targets, tables, the chart, results.json and results.md

Adding a section is one function `section_<name>(run)` in sections.py and one entry in
`sections.SECTIONS` (plus, if it has targets, one entry in `results.TARGETS`).

This package imports nothing when it is imported: `python -m training.benchmark` sets
Keras's backend in `__main__` before the modules above import Keras and TensorFlow.
"""
