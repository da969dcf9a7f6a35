"""Which moving statistics serve a ghost batch norm: the whole batch's, or the groups'?

    python -m training.ghost_statistics [--model mlp] [--ks 2 4 8] [--seeds 0 1 2] [--epochs 6]

A ghost batch norm (`virtual_batch_size=k`) normalizes each group of k examples with the
group's own statistics. What it serves at inference can be the whole batch's statistics
(the mean and variance over every value of a batch, merged from its groups: what kerasbn
does) or the mean of the groups' statistics (what tf-keras did: the groups' means and
variances averaged, which leaves out the spread of the group means, so the variance is
smaller by Var(μ_group), about σ²/k). This program trains the digits ResNet with ghost
batch norms for each k and seed, then sets every batch norm's statistics to each
candidate, computed exactly over the training set with every weight fixed and each
batch norm normalizing its groups as in training, and prints the test accuracy of each
(and of the exponential moving averages the training kept). The default model is the
paper's MLP, whose batch norms follow Dense layers: there every value of a group is one
example, and the two candidates differ most (after a convolution a group also holds
every position of its examples, and the spread of the group means is a small part of
the variance).
"""

import argparse
import sys

import numpy as np

from training import data, models

BATCH_SIZE = 32


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m training.ghost_statistics",
                                     description=__doc__.split("\n\n")[2])
    parser.add_argument("--model", choices=models.MODELS, default="mlp",
                        help="the model of training.models (default: mlp)")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8],
                        help="virtual batch sizes to try (default: 2 4 8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds, one training run each (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (default: 6)")
    args = parser.parse_args(argv)
    for k in args.ks:
        if k < 1:
            parser.error(f"argument --ks: each k must be an int >= 1; received {k}")
    if args.epochs < 1:
        parser.error(f"argument --epochs: must be an int >= 1; received {args.epochs}")
    return args


def arrays(dataset):
    images, labels = zip(*dataset.as_numpy_iterator())
    return np.stack(images), np.asarray(labels)


def train(name, k, seed, epochs, x, y):
    """A model of training.models with ghost batch norms of group size k, trained with Adam."""
    import keras

    import kerasbn

    keras.utils.set_random_seed(seed)
    model = kerasbn.convert_to_kerasbn(
        models.build_model(name, x.shape[1:], 10, "kerasbn", bn_momentum=0.9),
        synchronized=False, virtual_batch_size=k)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    return model


def candidate_statistics(model, x, k):
    """Per batch norm: (whole-batch mean, var) and (mean of groups' mean, var), float64.

    The inputs of every batch norm are read with each batch norm in training mode (its
    groups normalized with their own statistics) and every weight fixed.
    """
    import keras

    import kerasbn

    norms = [layer for layer in model.layers if isinstance(layer, kerasbn.BatchNormalization)]
    probe = keras.Model(model.inputs[0], [norm.input for norm in norms])
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 1.0  # the moving statistics stay where they are during the probe
    try:
        sums = [None] * len(norms)
        for start in range(0, len(x), BATCH_SIZE):
            inputs = probe(x[start:start + BATCH_SIZE], training=True)
            for i, value in enumerate(inputs):
                value = np.asarray(value, np.float64)
                # The models' batch norms are channels-last: one row per value.
                flat = [value[g:g + k].reshape(-1, value.shape[-1])
                        for g in range(0, len(value), k)]
                part = np.array([[f.shape[0], *f.mean(0), *f.var(0), *(f ** 2).mean(0)]
                                 for f in flat])
                sums[i] = part if sums[i] is None else np.concatenate([sums[i], part])
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    results = []
    for part in sums:
        channels = (part.shape[1] - 1) // 3
        counts = part[:, :1]
        means, variances, squares = (part[:, 1 + i * channels:1 + (i + 1) * channels]
                                     for i in range(3))
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        whole = (counts * squares).sum(0) / total - mean ** 2
        groups = (counts * variances).sum(0) / total
        results.append(((mean, whole), (mean, groups)))
    return norms, results


def accuracy_with(model, norms, statistics, x, y):
    kept = [(norm.moving_mean.numpy(), norm.moving_variance.numpy()) for norm in norms]
    try:
        for norm, (mean, variance) in zip(norms, statistics):
            norm.moving_mean.assign(mean)
            norm.moving_variance.assign(variance)
        predictions = np.argmax(model.predict(x, batch_size=256, verbose=0), axis=-1)
        return float(np.mean(predictions == y))
    finally:
        for norm, (mean, variance) in zip(norms, kept):
            norm.moving_mean.assign(mean)
            norm.moving_variance.assign(variance)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    train_set, test_set, _ = data.load()
    x, y = arrays(train_set)
    x_test, y_test = arrays(test_set)
    print(f"digits: {len(x)} training, {len(x_test)} test examples; batch {BATCH_SIZE}, "
          f"{args.epochs} epochs, Adam 1e-3, {args.model} with ghost batch norms")
    print(f"{'k':>3} {'seed':>4} {'moving averages':>16} {'whole batch':>12} "
          f"{'mean of groups':>15}")
    rows = []
    for k in args.ks:
        for seed in args.seeds:
            model = train(args.model, k, seed, args.epochs, x, y)
            norms, candidates = candidate_statistics(model, x, k)
            moving = float(model.evaluate(x_test, y_test, verbose=0)[1])
            whole = accuracy_with(model, norms, [c[0] for c in candidates], x_test, y_test)
            groups = accuracy_with(model, norms, [c[1] for c in candidates], x_test, y_test)
            rows.append((k, seed, moving, whole, groups))
            print(f"{k:>3} {seed:>4} {moving:>16.4f} {whole:>12.4f} {groups:>15.4f}",
                  flush=True)
    print("mean over seeds:")
    for k in args.ks:
        chosen = np.array([row[2:] for row in rows if row[0] == k])
        print(f"{k:>3} {'':>4} " + " ".join(
            f"{value:>{width}.4f}" for value, width in zip(chosen.mean(0), (16, 12, 15))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
