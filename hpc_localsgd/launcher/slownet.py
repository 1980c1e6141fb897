"""An emulated slow network on one machine: one network namespace per rank, joined through a switch
whose links are rate limited, with Open MPI's TCP transport between the namespaces.

On one machine the ranks talk through shared memory, where communication is almost free. To measure
what local SGD, compression and overlap save on a slow network, ``slow_network`` creates (as root, with
``ip`` and ``tc``):

    namespace <prefix>-hub   a Linux bridge (the switch)
    namespace <prefix>-<i>   rank i's veth end, address 10.213.0.<i + 1>/24, linked to the bridge

and puts an HTB rate limit (``tc qdisc … htb``, one class at ``rate``) on both ends of every link, so a
rank sends and receives at most ``rate`` (netem is not available in the containers this runs in). Each
rank's namespace sees only its link: traffic stays on the addresses of the namespaces created here.
Everything is removed on exit, also on failure or Ctrl-C (deleting a namespace deletes its links;
processes left inside are ended first).

``mpirun_command`` starts ``mpirun`` inside rank 0's namespace with ``--host`` naming the namespaces'
addresses; for the others Open MPI's launcher agent (``plm_rsh_agent``) is a small script that runs the
remote daemon with ``ip netns exec`` in the namespace of that address. ``--mca btl tcp,self`` and the
``*_if_include`` of the subnet keep ranks on TCP over the links; ``MASTER_ADDR``/``MASTER_PORT`` (rank 0's
address) and ``GLOO_SOCKET_IFNAME`` put the torch backend's store and Gloo's connections on them too.
Open MPI's settings for containers come from ``scripts/mpi-env.sh``, sourced first.

The ranks share this machine's cores, as the ranks of one node would: each starts through a small
binder script that sets its affinity to its own share (``core_shares``), as mpirun binds the ranks of
one node, and mpirun itself binds nothing. Left to itself, mpirun sees one rank per "node" and binds
each to core 0 of its node, which is the same core of this machine for every rank: they would all
run on one core while the others idle. (A rankfile says the same, but Open MPI 4.1.6 refuses one
that gives a rank several cores of a one-slot host.) The binding also lets a rank see its share
(``threads_for_rank``, and whether Open MPI should yield while idle).

If namespaces cannot be created (not root, no ``ip``/``tc``, no permission) ``SlowNetworkUnavailable``
says so in one line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, one_line
from .env import EMULATED_LINK_VARIABLE

SUBNET = "10.213.0.0/24"
MAX_RANKS = 250  # addresses 10.213.0.1 … .250 of the subnet
LINK_DEVICE = "slow0"  # each rank's end of its link, the same name in every namespace
STORE_PORT = 29500  # torch.distributed's store in rank 0's namespace, where nothing else listens
MPI_ENV_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mpi-env.sh"
# The agent Open MPI runs as ``agent [options] <host> <command...>`` to start its daemon on <host>.
_AGENT = """#!/bin/sh
# hpc-localsgd slow network: run Open MPI's daemon for <host> inside that host's network namespace.
while [ "${1#-}" != "$1" ]; do shift; done
host=$1; shift
case "$host" in
%s
  *) echo "slow network: no namespace for host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" sh -c "$*"
"""


class SlowNetworkUnavailable(UserError):
    """The emulated network cannot be set up here (not root, no ``ip``/``tc``, namespaces refused)."""


@dataclass(frozen=True)
class SlowNetwork:
    """The namespaces of a running emulated network, one per rank, and how to launch ranks in them."""

    namespaces: tuple[str, ...]  # rank i runs in namespaces[i]
    addresses: tuple[str, ...]  # rank i's address
    rate: str  # tc's rate, e.g. "1gbit"
    agent: Path  # the plm_rsh_agent script
    binder: Path  # runs rank i's command on its share of this machine's cores

    def mpirun_command(self, argv: Sequence[str], export: Sequence[str] = ()) -> list[str]:
        """``mpirun -np <ranks>`` of ``argv``, one rank per namespace, over TCP on the emulated links;
        ``export``: names of environment variables to pass to the ranks (``-x``), besides PYTHONPATH."""
        hosts = ",".join(f"{address}:1" for address in self.addresses)
        mpirun = [
            "mpirun",
            "-np",
            str(len(self.namespaces)),
            "--host",
            hosts,
            "--bind-to",
            "none",
            "--mca",
            "plm",
            "rsh",  # the agent below starts the other ranks' daemons; an image may set OMPI_MCA_plm=isolated
            "--mca",
            "plm_rsh_agent",
            str(self.agent),
            "--mca",
            "btl",
            "tcp,self",
            "--mca",
            "btl_tcp_if_include",
            SUBNET,
            "--mca",
            "oob_tcp_if_include",
            SUBNET,
            *[item for name in ("PYTHONPATH", *export) for item in ("-x", name)],
            "-x",
            f"{EMULATED_LINK_VARIABLE}={self.rate}",  # the benchmark projects the same link beside its measurement
            # torch.distributed over the emulated links: its store at rank 0's address, as torchrun would set
            # it, and Gloo's connections on each rank's link. The namespaces share this machine's host name,
            # which would otherwise mean loopback for both.
            "-x",
            f"MASTER_ADDR={self.addresses[0]}",
            "-x",
            f"MASTER_PORT={STORE_PORT}",
            "-x",
            f"GLOO_SOCKET_IFNAME={LINK_DEVICE}",
            str(self.binder),
            *argv,
        ]
        script = f"source {shlex.quote(str(MPI_ENV_SCRIPT))} && exec {shlex.join(mpirun)}"
        return ["ip", "netns", "exec", self.namespaces[0], "bash", "-c", script]

    def run(
        self,
        argv: Sequence[str],
        timeout: float,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` under ``mpirun_command`` with ``env`` added to this environment (and exported to the
        ranks); output captured. On timeout the ranks are ended with the namespaces (``slow_network``'s exit)."""
        extra = dict(env or {})
        return subprocess.run(
            self.mpirun_command(argv, export=sorted(extra)),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **extra},
        )


def core_shares(ranks: int, cores: Sequence[int]) -> list[tuple[int, ...]]:
    """The cores each of ``ranks`` ranks is bound to: contiguous equal shares of ``cores``, as mpirun binds
    the ranks of one node; with more ranks than cores, neighbouring ranks share a core."""
    count = len(cores)
    shares = []
    for rank in range(ranks):
        first = rank * count // ranks
        shares.append(tuple(cores[first : max(first + 1, (rank + 1) * count // ranks)]))
    return shares


def binder_text(ranks: int, cores: Sequence[int], python: str) -> str:
    """A script that runs its arguments on rank $OMPI_COMM_WORLD_RANK's ``core_shares`` of ``cores``."""
    shares = {rank: list(share) for rank, share in enumerate(core_shares(ranks, cores))}
    return (
        f"#!{python}\n"
        "# hpc-localsgd slow network: run this rank on its share of the cores, as on one node.\n"
        "import os, sys\n"
        f"os.sched_setaffinity(0, {shares!r}[int(os.environ['OMPI_COMM_WORLD_RANK'])])\n"
        "os.execvp(sys.argv[1], sys.argv[1:])\n"
    )


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlowNetworkUnavailable(f"cannot set up the slow network: ip {' '.join(args)}: {one_line_of(done)}")


def _tc(namespace: str, *args: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", namespace, "tc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlowNetworkUnavailable(f"cannot set up the slow network: tc {' '.join(args)}: {one_line_of(done)}")


def one_line_of(done: subprocess.CompletedProcess[str]) -> str:
    return " ".join((done.stderr or done.stdout).split()) or f"exit status {done.returncode}"


def _limit(namespace: str, device: str, rate: str) -> None:
    """HTB on the device's egress: one default class at ``rate``."""
    _tc(namespace, "qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "10")
    _tc(namespace, "class", "add", "dev", device, "parent", "1:", "classid", "1:10", "htb", "rate", rate)


def check_can_create() -> None:
    """Raise :class:`SlowNetworkUnavailable` (one line) where namespaces cannot be created here."""
    if os.geteuid() != 0:
        raise SlowNetworkUnavailable("the slow network needs root to create network namespaces (run as root)")
    missing = [tool for tool in ("ip", "tc", "mpirun") if shutil.which(tool) is None]
    if missing:
        raise SlowNetworkUnavailable(f"the slow network needs {', '.join(missing)} on PATH")
    if not MPI_ENV_SCRIPT.is_file():
        raise SlowNetworkUnavailable(f"the slow network needs Open MPI's settings from {MPI_ENV_SCRIPT}")


def _remove(namespaces: Sequence[str]) -> None:
    """End what still runs in the namespaces, then delete them (and with them their links and bridge)."""
    for namespace in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, text=True)


def existing_namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


@contextmanager
def slow_network(ranks: int = 2, rate: str = "1gbit", prefix: str | None = None) -> Iterator[SlowNetwork]:
    """``ranks`` namespaces linked through a bridge at ``rate`` each way; removed on exit, whatever happens."""
    if ranks < 2 or ranks > MAX_RANKS:
        raise ValueError(f"a slow network joins 2 to {MAX_RANKS} ranks, not {ranks}")
    check_can_create()
    prefix = prefix or f"hls{os.getpid()}"
    hub = f"{prefix}-hub"
    namespaces = tuple(f"{prefix}-{rank}" for rank in range(ranks))
    addresses = tuple(f"10.213.0.{rank + 1}" for rank in range(ranks))
    created: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hpc-localsgd-slownet-") as scratch:
        try:
            for namespace in (hub, *namespaces):
                _ip("netns", "add", namespace)
                created.append(namespace)
            _ip("-n", hub, "link", "add", "switch", "type", "bridge")
            _ip("-n", hub, "link", "set", "switch", "up")
            for rank, (namespace, address) in enumerate(zip(namespaces, addresses, strict=True)):
                port = f"port{rank}"
                _ip("-n", namespace, "link", "add", LINK_DEVICE, "type", "veth", "peer", "name", port, "netns", hub)
                _ip("-n", hub, "link", "set", port, "master", "switch")
                _ip("-n", hub, "link", "set", port, "up")
                _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", LINK_DEVICE)
                _ip("-n", namespace, "link", "set", LINK_DEVICE, "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
                _limit(namespace, LINK_DEVICE, rate)  # what the rank sends
                _limit(hub, port, rate)  # what it receives
            cases = "\n".join(
                f"  {address}) ns={namespace} ;;" for namespace, address in zip(namespaces, addresses, strict=True)
            )
            agent = Path(scratch) / "netns-agent.sh"
            agent.write_text(_AGENT % cases)
            agent.chmod(0o755)
            binder = Path(scratch) / "bind-rank.py"
            binder.write_text(binder_text(ranks, sorted(os.sched_getaffinity(0)), sys.executable))
            binder.chmod(0o755)
            yield SlowNetwork(namespaces, addresses, rate, agent, binder)
        finally:
            _remove(created[::-1])  # the ranks' namespaces, then the hub


def main() -> None:
    """``python -m hpc_localsgd.launcher.slownet [ranks] [rate] -- command…``: run a command under mpirun on
    an emulated network (for trying it by hand; the benchmark calls ``slow_network`` itself)."""

    args = sys.argv[1:]
    if "--" not in args:
        raise SystemExit("usage: python -m hpc_localsgd.launcher.slownet [ranks] [rate] -- command...")
    split = args.index("--")
    settings, command = args[:split], args[split + 1 :]
    ranks = int(settings[0]) if settings else 2
    rate = settings[1] if len(settings) > 1 else "1gbit"
    try:
        with slow_network(ranks, rate) as network:
            done = subprocess.run(network.mpirun_command(command))
    except SlowNetworkUnavailable as error:
        raise SystemExit(f"hpc-localsgd: error: {one_line(error)}") from None
    raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
