"""The tutorial's entry point: `python dpo.py` runs the default DPO training (same as `dpo train`).

Any `dpo train` flag works here too: `python dpo.py --model seed --max-steps 20`.
"""

import sys

from dpokit.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
