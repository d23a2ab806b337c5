"""Shims that let the protocol core run unchanged on CPython and MicroPython.

Invariant: nothing here reads a clock, opens a socket or logs; it only papers over
names that one interpreter has and the other lacks.
"""

try:
    from micropython import const  # noqa: F401  (MicroPython: folded at compile time)
except ImportError:  # CPython

    def const(value):
        """Return value unchanged: MicroPython's compile-time constant marker."""
        return value
