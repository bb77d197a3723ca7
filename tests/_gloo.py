"""A 2-rank gloo process group for the hand-spawned test workers (the others use detectron2's launch)."""
import contextlib
import datetime

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank, init_file, world_size=2, timeout_s=120):
    """Joins the group, runs the block, then leaves it together with the other ranks.

    The barrier before ``destroy_process_group`` matters: a rank that tears gloo down while its peer
    is still finishing a collective can abort the peer ("terminate called without an active
    exception", seen in 1 of 8 runs of one test).
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
