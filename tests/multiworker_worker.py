"""One worker of the multi-worker test: MultiWorkerMirroredStrategy over 2 processes.

Run by tests/test_distribute.py as `python multiworker_worker.py INPUT.npz OUTPUT.npz`
with TF_CONFIG naming both workers on 127.0.0.1. INPUT.npz holds the initial weights
and, for each worker, its own shard of every batch; the worker trains a small model
with synchronized kerasbn layers in a custom loop (`strategy.run`, one batch in which
worker 1 has no example at all) and with `model.fit` (through the training program's
workaround, `training.runtime.prepare_multi_worker_fit`), counts the collective ops of
its traced steps, and writes what it got to OUTPUT.npz for the test to compare with a
single-process reference.
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

# Run as a script from tests/: the repository root holds the `training` package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.runtime import prepare_multi_worker_fit  # noqa: E402

COLLECTIVE_OPS = ("CollectiveReduceV2", "CollectiveGatherV2", "CollectiveBcastSendV2",
                  "CollectiveBcastRecvV2", "CollectiveReduce", "CollectiveGather",
                  "CollectiveBcastSend", "CollectiveBcastRecv", "CollectiveAllToAllV2",
                  "CollectiveReduceScatterV2")


def build_model(synchronized=True, bn=kerasbn.BatchNormalization, dtype="float32"):
    """The model of the test: two synchronized batch norms. Shared with the test, which
    also builds it in float64 for its reference."""
    kwargs = {"synchronized": synchronized, "momentum": 0.8, "dtype": dtype}
    return keras.Sequential([
        keras.Input((6,), dtype=dtype),
        keras.layers.Dense(5, use_bias=False, dtype=dtype),
        bn(**kwargs),
        keras.layers.ReLU(dtype=dtype),
        keras.layers.Dense(3, use_bias=False, dtype=dtype),
        bn(**kwargs),
    ])


def count_collectives(concrete_function):
    """Collective ops by type in a traced function's graph and its function library."""
    graph_def = concrete_function.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    counts = {}
    for node in nodes:
        if node.op in COLLECTIVE_OPS or node.op.startswith("CollectiveBcast"):
            counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def forward_backward_function(strategy, model):
    """A traced-on-demand step: forward and backward through `model`, no optimizer."""
    def replica_fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x, training=True))
        return tape.gradient(loss, [x] + model.trainable_variables)

    return tf.function(lambda x: strategy.run(replica_fn, args=(x,)),
                       input_signature=[tf.TensorSpec([None, 6])])


def main(input_path, output_path):
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    data = np.load(input_path)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    initial = [data[f"weight_{i}"] for i in range(int(data["num_weights"]))]
    results = {}

    # ---- custom loop: strategy.run, loss summed over the global batch.
    with strategy.scope():
        model = build_model()
        model.set_weights(initial)
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)

    def replica_step(x, y, global_batch):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x, training=True) - y)) / global_batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    specs = [tf.TensorSpec([None, 6]), tf.TensorSpec([None, 3]), tf.TensorSpec([])]

    @tf.function(input_signature=specs)
    def train_step(x, y, global_batch):
        strategy.run(replica_step, args=(x, y, global_batch))

    for step in range(int(data["custom_steps"])):
        x, y = data[f"custom_x_{task}_{step}"], data[f"custom_y_{task}_{step}"]
        train_step(x, y, float(data[f"custom_global_{step}"]))
    results.update({f"custom_{i}": w.numpy() for i, w in enumerate(model.weights)})
    results["custom_outputs"] = model.predict(data["eval_x"], verbose=0)

    # The collectives of the traced steps: the custom training step, and forward +
    # backward alone (no optimizer) with kerasbn's and with Keras's synchronized layer.
    with strategy.scope():
        keras_model = build_model(bn=keras.layers.BatchNormalization)
    for name, function in (
        ("train_step", train_step),
        ("forward_backward", forward_backward_function(strategy, model)),
        ("keras_forward_backward", forward_backward_function(strategy, keras_model)),
    ):
        for op, count in count_collectives(function.get_concrete_function()).items():
            results[f"ops_{name}_{op}"] = count

    # ---- model.fit, each worker feeding its own shard.
    with strategy.scope():
        fitted = build_model()
        fitted.set_weights(initial)
        fitted.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)

    def dataset_fn(context):  # each worker reads its own shard, per-replica batches
        shard = context.input_pipeline_id
        return tf.data.Dataset.from_tensor_slices(
            (data[f"fit_x_{shard}"], data[f"fit_y_{shard}"])
        ).batch(context.get_per_replica_batch_size(int(data["fit_global_batch"])))

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    with strategy.scope():
        prepare_multi_worker_fit(fitted, (data["fit_x_0"][:1], data["fit_y_0"][:1]))
    fitted.fit(dataset, epochs=1, steps_per_epoch=int(data["fit_steps"]), verbose=0)
    results["fit_iterations"] = int(fitted.optimizer.iterations.numpy())
    results.update({f"fit_{i}": w.numpy() for i, w in enumerate(fitted.weights)})

    np.savez(output_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:3])
