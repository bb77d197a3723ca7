"""detectron2 launch arguments (``--num-machines --machine-rank --dist-url [--num-gpus]``) derived from a
SLURM job's or a torchrun worker's environment, for multi-node runs (docs/clusters.md).

detectron2's ``launch`` starts one process per GPU itself, so a cluster starts **one task per node**
(``srun --ntasks-per-node=1``, ``torchrun --nproc_per_node=1``) and passes it these arguments:

* SLURM: machines ``SLURM_JOB_NUM_NODES`` (or ``SLURM_NNODES``), rank ``SLURM_NODEID``, master = the
  first host of ``SLURM_JOB_NODELIST``, port ``MASTER_PORT`` or ``20000 + SLURM_JOB_ID % 20000`` (the
  same on every node, different for concurrent jobs), GPUs ``SLURM_GPUS_ON_NODE`` / ``SLURM_GPUS_PER_NODE``.
* torchrun: machines ``WORLD_SIZE / LOCAL_WORLD_SIZE``, rank ``GROUP_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT + 1`` (torchrun's own store holds ``MASTER_PORT``).
"""
import os
import re
import sys

__all__ = ["first_host", "launch_args", "main"]


def first_host(nodelist):
    """First hostname of a SLURM node list (``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _int(env, *names):
    for n in names:
        if env.get(n, "") != "":
            value = env[n].split("(")[0].split(":")[-1]  # "8(x2)" / "gpu:8" forms
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {n}={env[n]!r} is not an integer") from None
    return None


def launch_args(env=None):
    """The detectron2 launch arguments of this environment as a dict (``num_gpus`` only when known)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" in env and "SLURM_NODEID" in env:
        nodes = _int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
        if nodes is None or not env.get("SLURM_JOB_NODELIST"):
            raise ValueError("a SLURM job without SLURM_JOB_NUM_NODES / SLURM_JOB_NODELIST: run inside srun")
        port = _int(env, "MASTER_PORT") or 20000 + _int(env, "SLURM_JOB_ID") % 20000
        out = {"num_machines": nodes, "machine_rank": _int(env, "SLURM_NODEID"),
               "dist_url": f"tcp://{first_host(env['SLURM_JOB_NODELIST'])}:{port}"}
        gpus = _int(env, "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")
    elif "GROUP_RANK" in env and "MASTER_ADDR" in env:
        local = _int(env, "LOCAL_WORLD_SIZE") or 1
        if local != 1:
            raise ValueError(f"LOCAL_WORLD_SIZE={local}: start torchrun with --nproc_per_node=1 "
                             "(detectron2's launch starts the per-GPU processes)")
        out = {"num_machines": _int(env, "WORLD_SIZE") // local, "machine_rank": _int(env, "GROUP_RANK"),
               "dist_url": f"tcp://{env['MASTER_ADDR']}:{_int(env, 'MASTER_PORT') + 1}"}
        gpus = None
    else:
        raise ValueError("neither a SLURM step (SLURM_JOB_ID, SLURM_NODEID) nor a torchrun worker "
                         "(GROUP_RANK, MASTER_ADDR) environment")
    if gpus is not None:
        out["num_gpus"] = gpus
    return out


def main(argv=None):
    """Print the arguments as command-line flags (``tools/cluster_args.py``)."""
    args = launch_args()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in args.items()]
    sys.stdout.write(" ".join(flags) + "\n")
    return 0
