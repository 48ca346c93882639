"""Train a preset: `python training/run.py --preset NAME` or `deepspeed training/run.py --preset NAME`.

See training/trainer.py for the options and docs/training.md for examples (clusters: `deepspeed --hostfile`).
"""

import sys

from training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
