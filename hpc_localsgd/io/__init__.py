"""HDF5 output on a shared filesystem: the run directory, metrics.h5 and checkpoints."""
