"""Entry point for TorchX/torchrun: the same job as `shark importance`.

torchx run dist.ddp -j 1x2 --script apps/importance.py -- --data synthetic
"""

import sys

from shark_torchrec.cli import importance_main

if __name__ == "__main__":
    sys.exit(importance_main(sys.argv[1:]))
