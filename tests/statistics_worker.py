"""One worker of the multi-worker population-statistics test (MultiWorkerMirroredStrategy).

Run by tests/test_statistics.py as `python statistics_worker.py INPUT.npz OUTPUT.npz`
with TF_CONFIG naming both workers on 127.0.0.1. INPUT.npz holds the model's weights and
the data `x`. The worker recomputes the statistics of a model with synchronized kerasbn
layers twice: from a plain tf.data.Dataset of global batches of BATCH (which the
strategy shards), and from a distributed dataset in which each worker reads its own half
of every global batch (the last global batch, 3 examples, is all worker 0's: worker 1
runs that step with no example). It writes the moving statistics it ended with, the
examples counted and the collective ops of the end-of-pass exchange to OUTPUT.npz.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kerasbn  # noqa: E402
from kerasbn import statistics  # noqa: E402

BATCH = 10  # global batch


def build_model():
    """Two synchronized batch norms (the second one's input depends on the first's
    batch statistics). Shared with the test."""
    def bn(name):
        return kerasbn.BatchNormalization(synchronized=True, jit_compile=False, name=name)

    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(5, name="dense"),
        bn("bn_1"),
        keras.layers.ReLU(),
        keras.layers.Dense(3, name="dense_2"),
        bn("bn_2"),
    ])


def collective_ops(concrete_function):
    graph_def = concrete_function.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    return sum(1 for node in nodes if node.op.startswith("Collective"))


def main(input_path, output_path):
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    data = np.load(input_path)
    x = data["x"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    with strategy.scope():
        model = build_model()
    model.set_weights([data[f"weight_{i}"] for i in range(int(data["num_weights"]))])
    results = {}

    def record(kind, summary):
        results[f"{kind}_examples"] = summary.examples
        for layer in model.layers:
            if statistics.is_batch_norm(layer):
                for name in ("moving_mean", "moving_variance"):
                    results[f"{kind}_{layer.name}_{name}"] = getattr(layer, name).numpy()

    with strategy.scope():
        plain = tf.data.Dataset.from_tensor_slices(x).batch(BATCH)
        record("plain", kerasbn.recompute_statistics(model, plain, verbose=0))

    half = BATCH // 2
    mine = np.concatenate([x[start + task * half:start + (task + 1) * half]
                           for start in range(0, len(x), BATCH)])

    def dataset_fn(context):  # each worker its own half of every global batch
        return tf.data.Dataset.from_tensor_slices(mine).batch(
            context.get_per_replica_batch_size(BATCH))

    distributed = strategy.distribute_datasets_from_function(dataset_fn)
    population_pass = statistics.PopulationPass(model)
    record("distributed", population_pass.run(distributed, verbose=0))
    results["finish_collectives"] = collective_ops(
        population_pass._finish.get_concrete_function())
    np.savez(output_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:3])
