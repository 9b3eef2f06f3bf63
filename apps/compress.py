"""Entry point for TorchX/torchrun: the same job as `shark compress`.

torchx run dist.ddp -j 1x2 --script apps/compress.py -- --data synthetic
"""

import sys

from shark_torchrec.cli import compress_main

if __name__ == "__main__":
    sys.exit(compress_main(sys.argv[1:]))
