"""hpc-localsgd: local SGD, post-local SGD and SlowMo on MPI ranks."""

__version__ = "0.1.0"
