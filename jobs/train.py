"""Ray Job entrypoint for training: `python jobs/train.py CONFIG [key=value ...]`.

Submitted with `mmfusion submit -- train CONFIG ...` or `ray job submit -- python jobs/train.py CONFIG ...`;
inside a job RAY_ADDRESS is set, so training joins the cluster. All logic lives in mmfusion.train.
"""

import sys

from mmfusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
