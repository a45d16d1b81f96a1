"""deltalog: keep model replicas fresh by moving only the rows that changed.

The package is a library first (``from deltalog import Replica``); the
``deltalog`` command is a thin layer over it (deltalog.cli). Heavy modules
(numpy, lmdb) load on first use so that the command starts quickly.
"""

__version__ = "0.1.0"

__all__ = ["Replica", "__version__"]


def __getattr__(name):
    if name == "Replica":
        from .replica import Replica

        return Replica
    raise AttributeError(f"module 'deltalog' has no attribute {name!r}")
