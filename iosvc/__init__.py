"""iosvc: a burst-buffer I/O service with fair-share scheduling for HPC/AI clusters."""

__version__ = "0.1.0"
