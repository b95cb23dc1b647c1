"""Ray Job entrypoint for hyperparameter search: `python jobs/tune.py CONFIG [key=value ...]`.

The config needs a `tune:` section (see jobs/configs/tune_avt_digits.yaml). All logic lives in mmfusion.tune.
"""

import sys

from mmfusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
