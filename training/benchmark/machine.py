"""The machine: thread counts and the CPU split set before TensorFlow starts, and what
the output records about the machine and the libraries."""

import os
import platform

import keras
import numpy as np
import tensorflow as tf

from training import runtime
from training.benchmark import optional


def usable_cores():
    """The number of cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()


def configure(threads, logical_devices):
    """Gives TensorFlow and PyTorch the same number of threads and, for the sync
    section, splits the CPU into logical devices (`training.runtime.split_cpu`).

    Must run before TensorFlow initializes its runtime (importing it is fine).

    Args:
        threads: intra-op threads for TensorFlow and PyTorch alike.
        logical_devices: the number of logical CPU devices; 1 leaves the CPU whole.

    Returns:
        A list of notes for the report: empty, or one sentence saying that
        TensorFlow had already started and kept its own settings.
    """
    tf.get_logger().setLevel("ERROR")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        if logical_devices > 1:
            runtime.split_cpu(logical_devices)
    except RuntimeError as error:  # runtime.ConfigurationError is one too
        return [f"TensorFlow was initialized before the benchmark could configure it "
                f"({error}); its settings were kept."]
    if optional.torch is not None:
        optional.torch.set_num_threads(threads)
    return []


def cpu_model():
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return cpu


def machine_info(threads):
    """The machine and library versions, as recorded in results.json ("machine").

    Optional libraries that are not installed have the version None.
    """
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "tensorflow": tf.__version__, "keras": keras.__version__}
    for name, module in optional.MODULES.items():
        versions[name] = getattr(module, "__version__", None)
    return {"cpu_model": cpu_model(), "nproc": os.cpu_count(), "threads": threads,
            "platform": platform.platform(), "versions": versions,
            "load_average_at_start": list(os.getloadavg())}
