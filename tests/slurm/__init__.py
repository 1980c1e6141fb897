"""Tests against a private single-node Slurm cluster (scripts/slurm-cluster.sh), started once per session."""
