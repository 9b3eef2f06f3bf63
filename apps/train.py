"""Entry point for TorchX/torchrun: the same job as `shark train`.

torchx run dist.ddp -j 1x2 --script apps/train.py -- --data synthetic
"""

import sys

from shark_torchrec.cli import train_main
from shark_torchrec.distributed.env import exit_without_teardown

if __name__ == "__main__":
    exit_without_teardown(train_main(sys.argv[1:]))  # see its doc: gloo's threads at teardown
