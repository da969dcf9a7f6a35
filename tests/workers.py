"""Launching a test's worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy).

    run_workers([command_0, command_1], log_dir, timeout=120)

Each worker runs its command (an argv list) with TF_CONFIG naming every worker on free
local ports and its own index; what it prints goes to log_dir/worker_<i>.log. Used by
test_distribute.py (training), test_statistics.py (population statistics) and
test_train.py (the training program).
"""

import json
import os
import socket
import subprocess

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


def run_workers(commands, log_dir, timeout, cwd=None):
    """Runs one worker process per command; fails the test if any does not end well.

    Args:
        commands: one argv list per worker.
        log_dir: where worker_<i>.log (stdout and stderr) goes. Files, not pipes: a
            worker blocked on a full pipe would stall the other.
        timeout: seconds each worker may take.
        cwd: the workers' working directory (None: this process's).

    Returns:
        The path of each worker's log, in order.

    Every process is reaped, also on failure or timeout; the failure message holds the
    tail of the failed worker's log.
    """
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(len(commands))]}
    processes = []
    try:
        for index, command in enumerate(commands):
            log = open(os.path.join(log_dir, f"worker_{index}.log"), "wb")
            processes.append((subprocess.Popen(
                command, cwd=cwd, env=worker_environment(cluster, index), stdout=log,
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
    return [log.name for _, log in processes]
