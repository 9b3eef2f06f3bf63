"""Entry point for TorchX/torchrun: the same job as `shark prune`.

torchx run dist.ddp -j 1x2 --script apps/prune.py -- --data synthetic
"""

import sys

from shark_torchrec.cli import prune_main

if __name__ == "__main__":
    sys.exit(prune_main(sys.argv[1:]))
