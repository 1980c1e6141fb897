"""HDF5 output: metrics and (later) checkpoints, on a shared filesystem.

HDF5's file locking fails or hangs on many parallel filesystems (Lustre, GPFS, NFS), so it is
off unless the user set HDF5_USE_FILE_LOCKING; this must happen before h5py loads libhdf5.
"""
import os

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
