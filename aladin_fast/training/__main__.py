"""``python -m aladin_fast.training train --config run.toml [--field value ...]`` (also under torchrun)."""
import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
