"""Running the project's programs in fresh processes, and reading the figures they write.

Used by the end-to-end tests of the evidence programs (test_paper.py,
test_statistics_evidence.py, test_small_batches.py).
"""

import os
import struct
import subprocess
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_python(arguments, timeout, **environment):
    """Runs `python ARGUMENTS` from the repository in a fresh process.

    Args:
        arguments: what follows `python`, e.g. ["-m", "training.small_batches", "--quick"].
        timeout: seconds the process may take.
        **environment: variables set on top of this process's environment.

    Returns:
        The `subprocess.CompletedProcess`, its stdout and stderr as text.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **environment)
    return subprocess.run([sys.executable, *arguments], cwd=REPOSITORY, env=env,
                          capture_output=True, text=True, timeout=timeout)


def png_size(path):
    """(width, height) of a PNG, after checking its signature and IHDR chunk."""
    with open(path, "rb") as file:
        head = file.read(24)
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])
