"""`python -m training.paper`: the claims of Ioffe & Szegedy (2015) reproduced with kerasbn.

The paper's network (three hidden layers of 100 sigmoid units, batch 60, plain SGD) on
real MNIST, without batch norm, with `kerasbn.BatchNormalization` and with
`keras.layers.BatchNormalization`, in five experiments: Figure 1a (test accuracy against
steps), Figure 1b/1c (percentiles of one sigmoid's input over training), a
learning-rate sweep, an initialization-scale sweep and a small-batch table. It writes
PNG figures, `results.json` and `summary.md`, which says whether each claim held.

Modules: `cli` (flags, main), `config` (FULL/QUICK sizes), `datasets` (MNIST in
memory), `networks` (the variants, initial weights, the probe of the sigmoid inputs),
`runner` (training loops), `experiments` (the five), `analysis` (numbers and
verdicts), `figures`, `report` (JSON and markdown).
"""
