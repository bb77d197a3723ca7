"""Launch arguments derived from fake SLURM / torchrun environments, parsed by detectron2's own parser."""
import pytest
from detectron2.engine import default_argument_parser

from part_distill.utils.cluster import first_host, launch_args

SLURM = {"SLURM_JOB_ID": "123456", "SLURM_NODEID": "2", "SLURM_JOB_NUM_NODES": "4",
         "SLURM_JOB_NODELIST": "gpu[007-010]", "SLURM_GPUS_ON_NODE": "8"}


@pytest.mark.parametrize("nodelist,host", [("gpu[007-010]", "gpu007"), ("a1,b2", "a1"), ("n[3,5-6],m1", "n3"),
                                           ("learnfair0123", "learnfair0123")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_step():
    args = launch_args(SLURM)
    # Port: 20000 + 123456 % 20000 = 23456, the same on every node of the job.
    assert args == {"num_machines": 4, "machine_rank": 2, "dist_url": "tcp://gpu007:23456", "num_gpus": 8}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items()).split()
    parsed = default_argument_parser().parse_args(["--config-file", "x.yaml", *flags])
    assert (parsed.num_machines, parsed.machine_rank, parsed.dist_url, parsed.num_gpus) == \
        (4, 2, "tcp://gpu007:23456", 8)
    assert launch_args(dict(SLURM, MASTER_PORT="29511", SLURM_GPUS_ON_NODE="",
                            SLURM_GPUS_PER_NODE="gpu:4"))["dist_url"] == "tcp://gpu007:29511"
    assert launch_args(dict(SLURM, SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="gpu:4"))["num_gpus"] == 4


def test_torchrun_worker():
    env = {"GROUP_RANK": "1", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "10.0.0.5",
           "MASTER_PORT": "29500"}
    assert launch_args(env) == {"num_machines": 3, "machine_rank": 1, "dist_url": "tcp://10.0.0.5:29501"}
    with pytest.raises(ValueError, match="nproc_per_node=1"):
        launch_args(dict(env, LOCAL_WORLD_SIZE="8", WORLD_SIZE="24"))


def test_bad_environments_name_the_variable():
    with pytest.raises(ValueError, match="neither a SLURM step"):
        launch_args({})
    with pytest.raises(ValueError, match="SLURM_NODEID='x'"):
        launch_args(dict(SLURM, SLURM_NODEID="x"))
