"""Worker groups and levels: validation of a hierarchy, which level averages after a step, and what
``node`` means, read from the launcher variables of two nodes (this machine is one node)."""

from __future__ import annotations

import pytest

from hpc_localsgd.algorithms.hierarchy import GroupLevel, Hierarchy, check_hierarchy, hierarchy_from_config
from hpc_localsgd.config import load_config
from hpc_localsgd.errors import ConfigError, LauncherMismatch
from hpc_localsgd.launcher.env import detect_launch, ranks_per_node
from hpc_localsgd.train.ranks import planned_groups


def test_level_due_takes_the_largest_due_group_and_yields_to_the_global_sync() -> None:
    hierarchy = Hierarchy(16, 2, (GroupLevel(4, 2), GroupLevel(8, 3)))
    # Global every 12 local steps, from step 5 on (post-local SGD's switch).
    due = {step: hierarchy.level_due(step, 5, 12) for step in range(0, 30)}
    assert [step for step, level in due.items() if level == 0] == [7, 9, 13, 15, 19, 21, 25, 27]
    assert [step for step, level in due.items() if level == 1] == [8, 11, 14, 20, 23, 26]
    # Steps 5 + 6k: both levels due, the larger wins (8, 11...). Step 17, 29: the global sync.
    assert due[17] is None and due[29] is None and due[5] is None and due[4] is None
    assert Hierarchy(4).level_due(3, 0, 4) is None and Hierarchy(4).level_due(3, None, 4) is None
    assert hierarchy.level_names() == ["worker", "level1", "level2", "global"]
    assert Hierarchy(4).level_names() == ["global"] and Hierarchy(4).is_flat


@pytest.mark.parametrize(
    "world,per_worker,levels,period,message",
    [
        (6, 4, [], 4, "algorithm.ranks_per_worker: 4 ranks per worker do not divide the 6 ranks of this run"),
        (8, 2, [(2, 2)], 4, r"algorithm.levels\[0\].ranks: groups of 2 ranks must be larger than"),
        (8, 2, [(6, 2)], 4, r"algorithm.levels\[0\].ranks: groups of 6 ranks must divide the 8 ranks"),
        (12, 2, [(4, 2), (6, 3)], 8, r"algorithm.levels\[1\].ranks: groups of 6 ranks must be .* a multiple of"),
        (8, 1, [(8, 2)], 4, r"algorithm.levels\[0\].ranks: groups of 8 ranks .* be fewer"),
        (8, 1, [(2, 2), (4, 2)], 8, r"algorithm.levels\[1\].sync_period: 2 must be larger than the previous"),
        (8, 1, [(2, 4)], 4, r"algorithm.levels\[0\].sync_period: 4 must be .* smaller than algorithm.sync_period"),
    ],
)
def test_a_bad_hierarchy_is_one_line_naming_the_mistake(
    world: int, per_worker: int, levels: list[tuple[int, int]], period: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_hierarchy(world, per_worker, [GroupLevel(r, h) for r, h in levels], period)


def test_node_stands_for_the_ranks_of_a_node_and_needs_a_launcher() -> None:
    cfg = load_config(
        None,
        [
            "algorithm.ranks_per_worker=node",
            "algorithm.sync_period=8",
            "algorithm.levels=[{ranks: 16, sync_period: 2}]",
        ],
    )
    assert hierarchy_from_config(cfg.algorithm, 32, 8) == Hierarchy(32, 8, (GroupLevel(16, 2),))
    with pytest.raises(ConfigError, match="'node' needs ranks started by a launcher"):
        hierarchy_from_config(cfg.algorithm, 32, None)
    with pytest.raises(ConfigError, match="algorithm.levels: apply to model averaging"):
        load_config(None, ["algorithm.method=allreduce", "algorithm.levels=[{ranks: 2, sync_period: 2}]"])
    with pytest.raises(ConfigError, match=r"algorithm.ranks_per_worker: expected an integer or 'node', got 'nodes'"):
        load_config(None, ["algorithm.ranks_per_worker=nodes"])


def test_two_nodes_of_four_from_open_mpi_and_slurm_variables() -> None:
    open_mpi = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    }
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NNODES": "2",
        "SLURM_TASKS_PER_NODE": "4(x2)",
    }
    node_workers = load_config(None, ["algorithm.ranks_per_worker=node", "algorithm.sync_period=8"])
    with_level = load_config(None, ["algorithm.sync_period=8", "algorithm.levels=[{ranks: node, sync_period: 2}]"])
    for env in (open_mpi, slurm):
        layout = detect_launch(env).layout
        assert (layout.size, layout.local_size, layout.num_nodes) == (8, 4, 2)
        # What Horovod's process sets are planned for before the ranks can compare their hosts.
        assert planned_groups(node_workers, layout) == {"group_sizes": [4], "across_sizes": [4]}
        assert planned_groups(with_level, layout) == {"group_sizes": [4], "across_sizes": []}
    # The hosts the ranks then report: two nodes of four, in blocks.
    assert ranks_per_node([7, 7, 7, 7, 9, 9, 9, 9]) == 4
    assert ranks_per_node([7, 7, 7, 7]) == 4 and ranks_per_node([3]) == 1


@pytest.mark.parametrize(
    "hosts,message",
    [
        ([7, 7, 7, 9], "nodes hold different numbers of ranks \\(1, 3\\)"),
        ([7, 9, 7, 9], "the ranks of a node are not consecutive \\(4 ranks on 2 nodes\\)"),
    ],
)
def test_nodes_that_are_not_equal_blocks_of_ranks_are_refused(hosts: list[int], message: str) -> None:
    with pytest.raises(LauncherMismatch, match=message):
        ranks_per_node(hosts)
