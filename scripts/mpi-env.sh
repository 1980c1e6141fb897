# Sourced by the scripts: Open MPI settings for workstations and containers.
# Open MPI refuses to run as root unless told that this is intended (containers, CI).
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# The shared-memory transport's single-copy mode (CMA) needs ptrace rights that containers
# often withhold; copying through the shared segment works everywhere.
export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
