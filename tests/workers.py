"""Launching a test's 2 worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy).

    run_workers(WORKER_SCRIPT, input_path, [output_0, output_1], log_dir, timeout=120)

Each worker runs `python SCRIPT INPUT OUTPUT` with TF_CONFIG naming both workers on
free local ports and its own index; what it prints goes to log_dir/worker_<i>.log.
Used by test_distribute.py (training) and test_statistics.py (population statistics).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

# Set by the test process or its runner, and wrong for a worker: XLA auto-clustering
# would compile the collectives, which XLA cannot do on CPU.
_DROPPED_VARIABLES = ("TF_XLA_FLAGS", "XLA_FLAGS", "PYTEST_CURRENT_TEST")
_LOG_TAIL_CHARS = 3000


def free_ports(count):
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_environment(cluster, index):
    """The environment of worker `index` of `cluster` ({"worker": [addresses]})."""
    env = {key: value for key, value in os.environ.items()
           if key not in _DROPPED_VARIABLES}
    env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               TF_CONFIG=json.dumps({"cluster": cluster,
                                     "task": {"type": "worker", "index": index}}))
    return env


def run_workers(script, input_path, output_paths, log_dir, timeout):
    """Runs one worker process per output path; fails the test if any does not end well.

    Args:
        script: the worker's Python file, run as `python script input_path output_path`.
        input_path: the file every worker reads.
        output_paths: one file per worker, which it writes.
        log_dir: where worker_<i>.log (stdout and stderr) goes. Files, not pipes: a
            worker blocked on a full pipe would stall the other.
        timeout: seconds each worker may take.

    Every process is reaped, also on failure or timeout; the failure message holds the
    tail of the failed worker's log.
    """
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(len(output_paths))]}
    processes = []
    try:
        for index, output_path in enumerate(output_paths):
            log = open(os.path.join(log_dir, f"worker_{index}.log"), "wb")
            processes.append((subprocess.Popen(
                [sys.executable, script, input_path, output_path],
                env=worker_environment(cluster, index), stdout=log,
                stderr=subprocess.STDOUT), log))
        for index, (process, log) in enumerate(processes):
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = f"a timeout ({timeout} s)"
            if code != 0:
                log.flush()
                with open(log.name, errors="replace") as f:
                    tail = f.read()[-_LOG_TAIL_CHARS:]
                pytest.fail(f"worker {index} ended with {code}:\n{tail}")
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
