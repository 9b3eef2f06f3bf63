"""The script `.torchxconfig` names for `dist.ddp`: it runs the app given as its first argument.

So both forms TorchRec users type work:

    torchx run dist.ddp -j 2x8 apps/train.py                          # the app as the first argument
    torchx run dist.ddp -j 2x8 apps/train.py -- --lr 0.05             # ... with its flags
    torchx run dist.ddp -j 1x2 --script apps/compress.py -- --out runs/c   # TorchX's own form

With no app named, it trains (`apps/train.py`); flags after the app go to it.
"""

import runpy
import sys
from pathlib import Path

APPS = Path(__file__).resolve().parent
KNOWN = sorted(p.name for p in APPS.glob("*.py") if p.name != Path(__file__).name)


def main() -> None:
    args = sys.argv[1:]
    app = APPS / "train.py"
    if args and args[0].endswith(".py"):
        if Path(args[0]).name not in KNOWN:
            print(
                f"apps/dispatch.py: unknown app {args[0]!r} (known: {', '.join('apps/' + k for k in KNOWN)})",
                file=sys.stderr,
            )
            raise SystemExit(2)
        app, args = APPS / Path(args[0]).name, args[1:]
    if args[:1] == ["--"]:  # `torchx run dist.ddp -j 1x2 apps/train.py -- --lr 0.05` passes the `--` on
        args = args[1:]
    sys.argv = [str(app), *args]
    runpy.run_path(str(app), run_name="__main__")


if __name__ == "__main__":
    main()
