"""The optional third-party packages: each name is the module, or None if it is missing.

tf_keras and torch are contenders of the layer section, matplotlib draws results.png;
without them the benchmark runs and says what it skipped (`missing`).
"""

INSTALL = {"tf_keras": "pip install -e '.[bench]'", "torch": "pip install torch==2.13.0",
           "matplotlib": "pip install -e '.[bench]'"}
ERRORS = {}  # name -> the ImportError of a missing package

try:
    import tf_keras
except ImportError as error:
    tf_keras, ERRORS["tf_keras"] = None, error

try:
    import torch
except ImportError as error:
    torch, ERRORS["torch"] = None, error

try:
    import matplotlib
    from matplotlib.figure import Figure
except ImportError as error:
    matplotlib, Figure, ERRORS["matplotlib"] = None, None, error

MODULES = {"tf_keras": tf_keras, "torch": torch, "matplotlib": matplotlib}


def missing(name):
    """Why the optional package `name` is not used, e.g. "torch is not installed
    (pip install torch==2.13.0)"; None if it is installed."""
    if MODULES[name] is not None:
        return None
    return f"{name} is not installed ({INSTALL[name]})"
