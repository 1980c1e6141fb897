"""Going on without a lost worker: torch.distributed's Gloo, rebuilt among the survivors (``comm.on_worker_loss:
continue``).

Every process has a stable *id* (the rank its launcher gave it). A *generation* is one membership: the ids
present, in order, with one Gloo process group built over the rendezvous store under the prefix ``g<N>/``.
Rank and size are the position in, and the length of, the current generation's members, so the rest of the
package sees an ordinary communicator whose size may shrink between two collectives.

How a loss is found and agreed (rank 0's process hosts the store: it is the one rank whose loss ends the run):

* Each process keeps a TCP connection to a listener on rank 0 open (the operating system closes it when the
  process dies: rank 0 posts ``dead/<id>`` at once), and posts a heartbeat to the store every
  ``HEARTBEAT_SECONDS`` from a thread of its own (a stopped process keeps its connection; its heartbeat ages).
* A collective's wait polls its Gloo work rather than blocking in it, and meanwhile watches the store: a peer
  that died makes Gloo fail at once ("connection closed by peer"); a peer that stopped makes no error, so a
  wait longer than ``worker_timeout`` looks for members whose heartbeat is that old. Either way the process
  posts ``g<N>/failed`` (so that peers waiting elsewhere stop waiting too) and raises :class:`PeerLost`.
* :meth:`ElasticCommunicator.recover`: every survivor posts that it is alive; rank 0 waits until each member
  has either posted, died, or gone ``worker_timeout`` without a heartbeat, drops every worker
  (``ranks_per_worker`` consecutive ids) that lost a rank, and posts the next generation's members; everyone
  builds its groups. A process that is not among them (its worker lost a rank, or it was too late) raises
  :class:`WorkerDropped`.
* A replacement (``train --rejoin``) waits as a spare until rank 0 gives it a lost id, and is taken in at a
  global sync (:meth:`ElasticCommunicator.admit_replacements`; the state it receives: train/rejoin.py).
* :func:`~.membership.run_agreed` makes an operation all-or-nothing: it runs, then every member posts that it completed
  (``commit``); a failure seen by anyone before all have posted rolls every survivor back to the state
  before the operation and runs it again among the survivors. So no sync is ever half-applied: a peer that
  dies mid-allreduce can let some ranks complete it while others fail (torchft's commit/rollback).

Buffers are reduced in a copy that is written back only once the collective succeeded: Gloo's threads of an
abandoned collective can never write into the model after the rollback.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import BackendUnavailable, UserError, one_line
from ..launcher.env import WorldLayout
from ._buffers import check_buffer, check_gather, divide_by_size_
from .base import Communicator, Handle, MembershipChange, PeerLost, check_group_size
from .membership import RunCannotGoOn, WorkerDropped, abandon
from .single import SingleCommunicator
from .torch_dist import rendezvous_address

HEARTBEAT_SECONDS = 0.5
_STORE_TIMEOUT = datetime.timedelta(minutes=5)  # a store operation (the rendezvous included)
_POLL_SECONDS = 0.25  # how often a waiting process looks at the store

T = TypeVar("T")


@dataclass
class _Generation:
    number: int
    members: tuple[int, ...]  # ids, ascending
    group: Any  # the Gloo process group over ``members``
    groups: dict[tuple[str, int], Any] = field(default_factory=dict)  # split recipe → this rank's subgroup
    commits: int = 0  # operations committed in this generation


class ElasticCommunicator(Communicator):
    """The torch backend on the CPU (Gloo) with members that may leave (module docstring)."""

    name = "torch"

    def __init__(
        self,
        launcher_layout: WorldLayout,
        launcher: str,
        worker_timeout: float,
        ranks_per_worker: int,
        rejoin: bool = False,
    ) -> None:
        """``rejoin``: this process replaces a lost one in a running job (``train --rejoin``). It has the
        starting world's size at once (what it builds, the LR scaled to the global batch, is then what every rank
        has), builds its world, and only then becomes a spare (:meth:`become_spare`), which waits for rank 0 to
        give it a lost rank's id; it is a member once :meth:`wait_for_admission` returns."""
        if not dist.is_available() or not dist.is_gloo_available():
            raise BackendUnavailable("comm.on_worker_loss=continue needs torch.distributed with Gloo")
        if rejoin and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            raise UserError("--rejoin needs MASTER_ADDR and MASTER_PORT: where the running job's rank 0 listens")
        address, port = rendezvous_address(launcher_layout, launcher)
        self.worker_timeout = worker_timeout
        self.ranks_per_worker = ranks_per_worker
        self._address, self._port = address, port
        self.changes: list[MembershipChange] = []  # not yet taken by the training loop
        self._closed = threading.Event()
        self._splits: list[_ElasticGroup] = []
        host = not rejoin and launcher_layout.rank == 0
        try:
            self.store = self._connect(is_host=host)
            self._heartbeat_store = self._connect(is_host=False)
        except Exception as exc:
            raise BackendUnavailable(
                f"the rendezvous store at {address}:{port} cannot be reached ({one_line(exc)})"
            ) from None
        if rejoin:
            size = int(self._store_call(lambda: self.store.get("world/size")).decode())
            self.id = -1  # none until rank 0 gives it one
            self._generation = _Generation(-1, (), None)  # not a member yet
            layout = dataclasses.replace(launcher_layout, rank=0, size=size, local_rank=0, local_size=1)
        else:
            self.id = launcher_layout.rank
            if host:
                self.store.set("world/size", str(launcher_layout.size))
            layout = launcher_layout
        if host:
            self._liveness = _Liveness(self.store)
            self.store.set("liveness/port", str(self._liveness.port))
        if not rejoin:
            self._start_liveness()
        super().__init__(layout)
        self.membership = self
        # Rank 0's view of replacements: spares seen, and the lost ids not yet given to one.
        self._spares_seen = 0
        self._free_ids: list[int] = []
        self._given: dict[int, str] = {}  # id → the spare it was given to, until that spare is admitted
        if not rejoin:
            self._generation = self._build(0, tuple(range(launcher_layout.size)))
            self._refresh_layout()

    def _start_liveness(self) -> None:
        """This process's line to rank 0's listener and its heartbeats (once it has an id)."""
        self._alive_line = _connect_liveness(self.store, self._address, self.id)
        self._beat()
        threading.Thread(target=self._heartbeats, name="hpc-localsgd-heartbeat", daemon=True).start()

    # --- the store and the groups ---------------------------------------------------------------------
    def _connect(self, is_host: bool) -> Any:
        return dist.TCPStore(self._address, self._port, None, is_host, timeout=_STORE_TIMEOUT, wait_for_workers=False)

    def _build(self, number: int, members: tuple[int, ...]) -> _Generation:
        prefix = dist.PrefixStore(f"g{number}/pg/", self.store)
        timeout = datetime.timedelta(seconds=max(60.0, 3 * self.worker_timeout))
        group = dist.ProcessGroupGloo(prefix, members.index(self.id), len(members), timeout)
        return _Generation(number, members, group)

    def _refresh_layout(self) -> None:
        """Rank and size in the current generation, for the world and each of its splits."""
        rank = self._generation.members.index(self.id)
        self.layout = dataclasses.replace(self.layout, rank=rank, size=len(self._generation.members))
        for split in self._splits:
            _, members = self._group_of(split.recipe, build=False)
            position = members.index(self.id)
            split.layout = WorldLayout(position, len(members), position, len(members), 0, 1)

    @property
    def generation(self) -> int:
        return self._generation.number

    @property
    def members(self) -> tuple[int, ...]:
        return self._generation.members

    def _key(self, name: str) -> str:
        return f"g{self._generation.number}/{name}"

    def _beat(self) -> None:
        self._heartbeat_store.set(f"heartbeat/{self.id}", repr(time.time()))

    def _heartbeats(self) -> None:
        while not self._closed.wait(HEARTBEAT_SECONDS):
            try:
                self._beat()
            except Exception:  # the store's host is gone: the next wait finds out and says so
                return

    def _silent_members(self, members: tuple[int, ...]) -> list[int]:
        """Those of ``members`` whose heartbeat is older than ``worker_timeout``."""
        now = time.time()
        silent = []
        for member in members:
            if member == self.id:
                continue
            beat = float(self._store_call(functools.partial(self.store.get, f"heartbeat/{member}")).decode())
            if now - beat > self.worker_timeout:
                silent.append(member)
        return silent

    # --- waiting without hanging ----------------------------------------------------------------------
    def _store_call(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as exc:
            if self.id == 0:
                raise
            raise RunCannotGoOn(
                f"rank {self.id}: the rendezvous store on rank 0 cannot be reached ({one_line(exc)}): rank 0 was "
                "lost, and with it the store the survivors agree through; resume from the latest checkpoint"
            ) from None

    def _failed(self) -> str | None:
        key = self._key("failed")
        if not self._store_call(lambda: self.store.check([key])):
            return None
        return str(self._store_call(lambda: self.store.get(key)).decode())

    def _flag(self, reason: str) -> PeerLost:
        key = self._key("failed")
        self._store_call(lambda: self.store.compare_set(key, "", reason))
        return PeerLost(self._failed() or reason)

    def await_work(self, work: Any, recipe: tuple[str, int] | None = None) -> None:
        """Wait for a Gloo work of the current generation over the group of ``recipe`` (None: the world); raise
        PeerLost if one of its members was lost meanwhile. A worker's own group (``into``) does not stop for a
        loss elsewhere that another member posted: its ranks must all complete the collective, or all fail it
        (a member of it lost), so that none of them goes a step ahead of the others."""
        started = last_look = time.monotonic()
        _, members = self._group_of(recipe, build=False)
        watch_flag = recipe is None or recipe[0] != "into"
        pause = 1e-5
        while not work.is_completed():
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)
            now = time.monotonic()
            if now - last_look >= _POLL_SECONDS:
                last_look = now
                failed = self._failed() if watch_flag else None
                if failed is not None:
                    raise PeerLost(failed)
                if now - started > self.worker_timeout:
                    silent = self._silent_members(members)
                    if silent:
                        noun = "rank" if len(silent) == 1 else "ranks"
                        raise self._flag(
                            f"no heartbeat from {noun} {', '.join(map(str, silent))} for {self.worker_timeout:g} s"
                        )
        try:
            work.wait()
        except Exception as exc:
            raise self._flag(_gloo_reason(exc)) from None

    # --- agreement --------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Every member has completed the operation since the last commit, or PeerLost (roll it back)."""
        generation = self._generation
        key = self._key(f"commit/{generation.commits}")
        generation.commits += 1
        self._store_call(lambda: self.store.add(key, 1))
        pause = 1e-4
        while True:
            done = self._store_call(lambda: self.store.add(key, 0))
            if done >= len(generation.members):
                return
            failed = self._failed()
            if failed is not None:
                raise PeerLost(failed)
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def recover(self, lost: PeerLost) -> MembershipChange:
        """Agree with the survivors on the next generation and build its groups (module docstring)."""
        started = time.monotonic()
        old = self._generation
        self._flag(str(lost))
        self._store_call(lambda: self.store.set(self._key(f"alive/{self.id}"), "1"))
        decided = self._key("next")
        if self.id == 0:
            self._decide(old)
        try:
            self.store.wait([decided], datetime.timedelta(seconds=10 * self.worker_timeout + 60))
        except Exception:
            raise RunCannotGoOn(
                f"rank {self.id}: the survivors did not agree on who is left within "
                f"{10 * self.worker_timeout + 60:g} s; resume from the latest checkpoint"
            ) from None
        decision = json.loads(self._store_call(lambda: self.store.get(decided)).decode())
        members = tuple(decision["members"])
        reason = self._failed() or str(lost)
        if self.id not in members:
            raise WorkerDropped(
                f"rank {self.id} left the run at generation {old.number}: the survivors went on without its worker "
                f"({reason})"
            )
        self._switch(old, members)
        if self.id == 0:
            self._free_ids.extend(sorted(set(old.members) - set(members)))
        if len(members) // self.ranks_per_worker < 1:
            raise RunCannotGoOn("no worker is left")
        change = MembershipChange(
            workers_before=len(old.members) // self.ranks_per_worker,
            workers_after=len(members) // self.ranks_per_worker,
            left=tuple(sorted(set(old.members) - set(members))),
            joined=(),
            recovery_seconds=time.monotonic() - started,
            reason=reason,
            ranks_per_worker=self.ranks_per_worker,
        )
        self.changes.append(change)
        return change

    def _decide(self, old: _Generation) -> None:
        """Rank 0: who of ``old`` is still here (posted alive, or not yet silent for worker_timeout)."""
        alive: set[int] = set()
        lost: set[int] = set()
        while len(alive) + len(lost) < len(old.members):
            now = time.time()
            for member in old.members:
                if member in alive or member in lost:
                    continue
                if self.store.check([self._key(f"alive/{member}")]):
                    alive.add(member)
                elif self.store.check([f"dead/{member}"]):
                    lost.add(member)
                elif now - float(self.store.get(f"heartbeat/{member}").decode()) > self.worker_timeout:
                    lost.add(member)
            time.sleep(0.02)
        worker = self.ranks_per_worker
        kept = [m for m in sorted(alive) if all(m - m % worker + j in alive for j in range(worker))]
        self.store.set(self._key("next"), json.dumps({"members": kept}))

    # --- replacements ---------------------------------------------------------------------------------------
    def become_spare(self) -> int:
        """As a replacement whose world is built: register as a spare, wait until rank 0 gives this process a
        lost rank's id, and return it (its rank, until it is taken in: it reads that rank's data shard)."""
        self.id = self._wait_for_an_id()
        self._start_liveness()
        self.layout = dataclasses.replace(self.layout, rank=self.id)
        self._store_call(lambda: self.store.set(f"ready/{self.id}", "1"))
        return self.id

    def _wait_for_an_id(self) -> int:
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        index = int(self._store_call(lambda: self.store.add("spares/count", 1))) - 1
        self._store_call(lambda: self.store.set(f"spares/{index}", token))
        given = f"given/{token}"
        while not self._store_call(lambda: self.store.check([given])):
            if self._store_call(lambda: self.store.check(["run/ended"])):
                raise WorkerDropped("the run ended without losing a worker: this replacement was not needed")
            time.sleep(0.02)
        return int(self._store_call(lambda: self.store.get(given)).decode())

    def wait_for_admission(self) -> MembershipChange:
        """As a spare that has its id: wait until the members take it in at a global sync (then it is a member,
        its rank and size those of the new membership)."""
        key = f"admitted/{self.id}"
        started = time.monotonic()
        while not self._store_call(lambda: self.store.check([key])):
            if self._store_call(lambda: self.store.check(["run/ended"])):
                raise WorkerDropped("the run ended before it took this replacement in")
            time.sleep(0.05)
        decision = json.loads(self._store_call(lambda: self.store.get(key)).decode())
        members = tuple(decision["members"])
        self._generation = self._build(decision["generation"], members)
        self._refresh_layout()
        return MembershipChange(
            len(members) - 1, len(members), (), (self.id,), time.monotonic() - started, "", self.ranks_per_worker
        )

    def _ready_replacements(self) -> list[int]:
        """Rank 0: give new spares the lost ids that are free, and return the ids whose spare has built its
        world (waiting a bounded time for those given one, so that a spare that is starting joins now)."""
        count = int(self.store.add("spares/count", 0))
        while self._spares_seen < count and self._free_ids:
            key = f"spares/{self._spares_seen}"
            self.store.wait([key])
            token = self.store.get(key).decode()
            identity = self._free_ids.pop(0)
            self.store.delete_key(f"dead/{identity}")  # the id lives again, in its replacement
            self._given[identity] = token
            self.store.set(f"given/{token}", str(identity))
            self._spares_seen += 1
        # Below the groups' own timeout (the members wait in a broadcast meanwhile).
        deadline = time.monotonic() + 2 * self.worker_timeout + 20
        ready = []
        for identity in sorted(self._given):
            while not self.store.check([f"ready/{identity}"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.store.check([f"ready/{identity}"]):
                ready.append(identity)
        return ready

    def admit_replacements(self) -> tuple[int, ...]:
        """Collective over the members, at a global sync: take in the replacements that are ready (rank 0
        decides; everyone learns it through the current group) and build the membership that includes them.
        Returns the ids taken in (the caller hands them the run's state)."""
        decided = torch.zeros(1 + self._original_size(), dtype=torch.int64)
        if self.id == 0:
            ready = self._ready_replacements()
            decided[0] = len(ready)
            decided[1 : 1 + len(ready)] = torch.tensor(ready, dtype=torch.int64)
        self.broadcast_(decided, root=0)
        joining = tuple(int(i) for i in decided[1 : 1 + int(decided[0])].tolist())
        if not joining:
            return ()
        started = time.monotonic()
        old = self._generation
        members = tuple(sorted(old.members + joining))
        if self.id == 0:
            for identity in joining:
                del self._given[identity]
                self.store.set(
                    f"admitted/{identity}", json.dumps({"generation": old.number + 1, "members": list(members)})
                )
        self._switch(old, members)
        self.changes.append(
            MembershipChange(
                len(old.members) // self.ranks_per_worker,
                len(members) // self.ranks_per_worker,
                (),
                joining,
                time.monotonic() - started,
                "",
                self.ranks_per_worker,
            )
        )
        return joining

    def _original_size(self) -> int:
        return int(self._store_call(lambda: self.store.get("world/size")).decode())

    def _switch(self, old: _Generation, members: tuple[int, ...]) -> None:
        for group in (old.group, *old.groups.values()):
            abandon(group)
        self._generation = self._build(old.number + 1, members)
        self._refresh_layout()

    # --- collectives --------------------------------------------------------------------------------------
    def _group_of(self, recipe: tuple[str, int] | None, build: bool = True) -> tuple[Any, tuple[int, ...]]:
        """This rank's process group and its members' ids for ``recipe`` (None: the world) in this generation,
        the group built at its first use (collective over its members), unless not ``build``."""
        generation = self._generation
        if recipe is None:
            return generation.group, generation.members
        kind, ranks = recipe
        members = generation.members
        parts = (
            [members[first : first + ranks] for first in range(0, len(members), ranks)]
            if kind == "into"
            else [members[position::ranks] for position in range(ranks)]
        )
        mine = next(part for part in parts if self.id in part)
        if not build:
            return None, mine
        if recipe not in generation.groups:
            prefix = dist.PrefixStore(f"g{generation.number}/{kind}{ranks}/{mine[0]}/", self.store)
            timeout = datetime.timedelta(seconds=max(60.0, 3 * self.worker_timeout))
            generation.groups[recipe] = dist.ProcessGroupGloo(prefix, mine.index(self.id), len(mine), timeout)
        return generation.groups[recipe], mine

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        return self._allreduce(None, buffer, average)

    def _allreduce(self, recipe: tuple[str, int] | None, buffer: torch.Tensor, average: bool) -> Handle:
        check_buffer(buffer)
        group, members = self._group_of(recipe)
        staging = buffer.clone()
        work = group.allreduce([staging], dist.AllreduceOptions())
        return _StagedHandle(self, work, staging, buffer, len(members) if average else 1, recipe)

    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_gather(buffer, output, self.size)
        staging = torch.empty_like(output)
        work = self._generation.group.allgather([list(staging.unbind(0))], [buffer.clone()])
        return _StagedHandle(self, work, staging, output, 1)

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        self._broadcast(None, buffer, root)

    def _broadcast(self, recipe: tuple[str, int] | None, buffer: torch.Tensor, root: int) -> None:
        check_buffer(buffer)
        group, members = self._group_of(recipe)
        if not 0 <= root < len(members):
            raise ValueError(f"broadcast root {root} is not a rank of this group of {len(members)}")
        options = dist.BroadcastOptions()
        options.rootRank = root
        staging = buffer.clone()
        _StagedHandle(self, group.broadcast([staging], options), staging, buffer, 1, recipe).wait()

    def barrier(self) -> None:
        self._barrier(None)

    def _barrier(self, recipe: tuple[str, int] | None) -> None:
        group, _ = self._group_of(recipe)
        self.await_work(group.barrier(), recipe)

    def collective_path(self, device: torch.device) -> str:
        return "torch.distributed Gloo on host memory, members may leave"

    def _split(self, ranks: int) -> Communicator:
        if ranks == 1:
            return SingleCommunicator(name=self.name)
        return self._add_split(("into", ranks))

    def _split_across(self, ranks: int) -> Communicator:
        if ranks == self.size:
            return SingleCommunicator(name=self.name)
        return self._add_split(("across", ranks))

    def _add_split(self, recipe: tuple[str, int]) -> Communicator:
        _, members = self._group_of(recipe, build=False)
        position = members.index(self.id)
        split = _ElasticGroup(self, recipe, WorldLayout(position, len(members), position, len(members), 0, 1))
        self._splits.append(split)
        return split

    def close(self) -> None:
        """Rank 0 hosts the store: it waits (up to ``worker_timeout``) until every member has said it is done
        with it, so that none is left reading a store that went away."""
        self._store_call(lambda: self.store.set(self._key(f"closed/{self.id}"), "1"))
        if self.id == 0:
            self.store.set("run/ended", "1")  # spares still waiting stop waiting
            keys = [self._key(f"closed/{member}") for member in self._generation.members]
            try:
                self.store.wait(keys, datetime.timedelta(seconds=self.worker_timeout))
            except Exception:
                pass  # a member that went silent at the very end: nothing is left to agree on
        self._closed.set()


class _Liveness:
    """Rank 0 learns at once that a process died: each member keeps one TCP connection open to a listener on
    rank 0, and the operating system closes it when the process ends, however it ends (a stopped process keeps
    it open: the heartbeat tells that case). Rank 0 records ``dead/<id>`` in the store, which the agreement
    reads before waiting for a heartbeat to go stale."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.server = socket.create_server(("", 0))
        threading.Thread(target=self._accept, name="hpc-localsgd-liveness", daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._watch, args=(connection,), daemon=True).start()

    def _watch(self, connection: socket.socket) -> None:
        with connection:
            identity = connection.recv(64).decode().strip()
            while True:
                try:
                    if not connection.recv(64):
                        break
                except OSError:
                    break
            try:
                self.store.set(f"dead/{identity}", "1")
            except Exception:  # rank 0 itself is ending
                return


def _connect_liveness(store: Any, address: str, identity: int) -> socket.socket:
    """This process's connection to rank 0's listener (kept open for the process's life)."""
    port = int(store.get("liveness/port").decode())
    connection = socket.create_connection((address, port))
    connection.sendall(f"{identity}\n".encode())
    return connection


class _ElasticGroup(Communicator):
    """A split of an elastic world: its members follow the world's current generation."""

    def __init__(self, world: ElasticCommunicator, recipe: tuple[str, int], layout: WorldLayout) -> None:
        self.world, self.recipe, self.name = world, recipe, world.name
        super().__init__(layout)  # kept current by the world at each new generation
        self.membership = world

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        return self.world._allreduce(self.recipe, buffer, average)

    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        raise NotImplementedError("an elastic group has no allgather")

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        self.world._broadcast(self.recipe, buffer, root)

    def barrier(self) -> None:
        self.world._barrier(self.recipe)

    def split(self, ranks: int) -> Communicator:
        check_group_size(ranks, self.size)
        raise NotImplementedError("elastic groups are split from the world only")


class _StagedHandle(Handle):
    """A collective reduced in a copy, written back to the caller's buffer only once it succeeded."""

    def __init__(
        self,
        comm: ElasticCommunicator,
        work: Any,
        staging: torch.Tensor,
        buffer: torch.Tensor,
        divisor: int,
        recipe: tuple[str, int] | None = None,
    ) -> None:
        self._comm, self._work, self._staging, self._buffer, self._divisor = comm, work, staging, buffer, divisor
        self._recipe = recipe

    def wait(self) -> None:
        if self._work is None:
            return
        self._comm.await_work(self._work, self._recipe)
        self._work = None
        divide_by_size_(self._staging, self._divisor)
        self._buffer.copy_(self._staging)


def _gloo_reason(error: BaseException) -> str:
    """Gloo's error in a few words: it names the file and line first, and advice after."""
    text = one_line(error)
    for known in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out"):
        if known in text:
            return f"{known.lower()} (Gloo)"
    return text[:200]
