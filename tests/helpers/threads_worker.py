"""A rank's function for `launch` that imports nothing heavy (spawned ranks import this file)."""

import torch


def threads_of_rank() -> int:
    """This rank's intra-op threads."""
    return torch.get_num_threads()
