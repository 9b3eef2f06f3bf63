"""Entry point for TorchX/torchrun: the same job as `shark train`.

torchx run dist.ddp -j 1x2 --script apps/train.py -- --data synthetic
"""

import sys

from shark_torchrec.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
