"""KTuberling sources: the Debian packages' files, parsed (themes, recorded sounds, FreeDict glosses).

Everything is located with `dpkg -L` (never a hard-coded path): a missing package is an error that names it.
    ktuberling-data            pics/<theme>.theme (objects: SVG id -> sound name), pics/<board>.svg(z),
                               sounds/<lang>.soundtheme (sound name -> recorded file), sounds/<lang>/*
    librsvg2-bin               rsvg-convert, which renders one SVG element to an RGBA PNG
    dict-freedict-eng-<lang>   English -> <lang> dictionaries (dictd .index + dictzip .dict.dz)
"""

from __future__ import annotations

import gzip
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from mmfusion.datasets.output import deb_version, need_package, run, sha256_file
from mmfusion.errors import DataError

log = logging.getLogger(__name__)

KTUBERLING_PACKAGE = "ktuberling-data"
RSVG_PACKAGE = "librsvg2-bin"
FREEDICT_LANGUAGES = {"de": "deu", "fr": "fra", "es": "spa", "it": "ita", "ru": "rus", "sr": "srp"}

# English names of the sound ids that are not plain English words once the theme prefix is cut (typos in the
# package's ids, run-together words, the Robin Hood characters). Every other id maps to itself.
ENGLISH_FIXUPS = {
    "brocolli": "broccoli", "sphynx": "sphinx", "palmtree": "palm tree", "fallingstar": "shooting star",
    "fireengine": "fire engine", "lorry tractor": "tractor", "breakdown lorry": "tow truck",
    "volley net": "net", "dowe": "dove", "whitch": "witch", "sherif": "sheriff", "frier": "friar",
    "purple shape": "shape", "moonwalker": "moon buggy", "spectacles": "glasses", "zzz": "sleep",
    "huh": "surprise", "what": "question", "wow": "wonder", "circles": "circle", "birds": "bird",
}
_THEME_PREFIX = re.compile(r"^(egypt|moon|pizzeria|tv|xmas|butterflies|robot_workshop)_|^tux-|-tux$")


@dataclass(frozen=True)
class Sprite:
    theme: str  # theme file stem, e.g. "egypt"
    board: Path  # the theme's SVG(Z)
    element: str  # SVG element id
    sound: str  # sound name, e.g. "egypt_camel"


@dataclass(frozen=True)
class Sources:
    sprites: list[Sprite]
    recordings: dict[str, dict[str, Path]]  # sound name -> language -> recorded file
    glosses: dict[str, dict[str, list[str]]]  # sound name -> language ("en" too) -> dictionary senses
    rsvg: Path
    packages: dict[str, str]  # Debian package -> version
    files: dict[str, str]  # every source file used -> sha256


def package_files(package: str) -> list[Path]:
    return [Path(p) for p in run(["dpkg", "-L", package], need_package(package)).splitlines() if p.strip()]


def english_name(sound: str) -> str:
    """'egypt_palmtree' -> 'palm tree', 'tux-apple' -> 'apple', 'xmas_ball' -> 'ball'."""
    name = _THEME_PREFIX.sub("", sound).replace("_", " ").replace("-", " ").strip().lower()
    return ENGLISH_FIXUPS.get(name, name)


def _themes(files: list[Path]) -> list[Sprite]:
    sprites = []
    for theme in sorted(p for p in files if p.suffix == ".theme" and p.parent.name == "pics"):
        try:
            root = ET.parse(theme).getroot()
        except ET.ParseError as e:
            raise DataError(f"cannot parse {theme} ({KTUBERLING_PACKAGE}): {e}") from e
        playground = root if root.tag == "playground" else root.find(".//playground")
        if playground is None or not playground.get("gameboard"):
            raise DataError(f"{theme} has no <playground gameboard=...> ({KTUBERLING_PACKAGE})")
        board = theme.parent / str(playground.get("gameboard"))
        if not board.is_file():
            raise DataError(f"{board} is missing: reinstall {KTUBERLING_PACKAGE}")
        seen: set[str] = set()
        for obj in playground.iter("object"):
            name, sound = obj.get("name"), obj.get("sound")
            if name and sound and name not in seen:  # robot_workshop.theme lists two objects twice
                seen.add(name)
                sprites.append(Sprite(theme.stem, board, name, sound))
    if not sprites:
        raise DataError(f"no themes with objects found in {KTUBERLING_PACKAGE}")
    return sprites


def _recordings(files: list[Path]) -> dict[str, dict[str, Path]]:
    """Sound name -> language -> file. A recording shipped again under another language code (sr@latin,
    sr@ijekavian, ... are byte-identical copies of sr) is kept once, under the first code in sorted order."""
    out: dict[str, dict[str, Path]] = {}
    seen: set[tuple[str, str]] = set()  # (sound name, sha256)
    for st in sorted(p for p in files if p.suffix == ".soundtheme"):
        root = ET.parse(st).getroot()
        lang = root.get("code") or st.stem
        for snd in root.iter("sound"):
            name, path = str(snd.get("name") or ""), st.parent / str(snd.get("file"))
            if not name or not path.is_file():  # id.soundtheme names files the package does not ship
                continue
            key = (name, sha256_file(path))
            if key not in seen:
                seen.add(key)
                out.setdefault(name, {})[lang] = path
    return out


def _b64(s: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for c in s:
        n = n * 64 + alphabet.index(c)
    return n


_TAGS = re.compile(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)|^\s*\d+\.\s*")


def _senses(entry: str) -> list[str]:
    """A dictd entry ('eye /aɪ/\\nAuge <neut> [anat.]\\n   "mind's eye" - ...') -> ['Auge', ...]: the
    translation lines (numbered senses too), without grammar tags, notes, examples or cross-references."""
    senses = []
    for line in entry.splitlines()[1:]:
        s = line.strip()
        if not s or line.startswith((" ", "\t")) or s.startswith(("see:", "Synonym", "Note:", '"')):
            continue
        s = re.sub(r"\s+", " ", _TAGS.sub("", s)).strip(" ,;")
        words = [w.strip() for w in s.split(",") if w.strip()][:2]  # the first two synonyms of the sense
        if words:
            senses.append(", ".join(words))
    return senses


def _freedict(code: str, words: set[str]) -> tuple[dict[str, list[str]], list[Path]]:
    """English word -> the senses its English-<code> FreeDict dictionary gives (all entries, in order)."""
    package = f"dict-freedict-eng-{code}"
    files = package_files(package)
    index = next((p for p in files if p.name.endswith(".index")), None)
    data_path = next((p for p in files if p.name.endswith(".dict.dz")), None)
    if index is None or data_path is None:
        raise DataError(f"{package} has no .index/.dict.dz file: reinstall it")
    spans: dict[str, list[tuple[int, int]]] = {}
    with open(index, encoding="utf-8") as f:
        for line in f:
            head, _, rest = line.partition("\t")
            if head.lower() in words:
                off, length = rest.rstrip("\n").split("\t")[:2]
                spans.setdefault(head.lower(), []).append((_b64(off), _b64(length)))
    data = gzip.open(data_path).read()  # dictzip is gzip; the files are small enough to read whole
    out = {}
    for w, sp in spans.items():
        senses = [s for o, n in sp for s in _senses(data[o:o + n].decode("utf-8", errors="replace"))]
        if senses:
            out[w] = list(dict.fromkeys(senses))  # drop repeats, keep order
    return out, [index, data_path]


def _glosses(sounds: list[str]) -> tuple[dict[str, dict[str, list[str]]], list[Path]]:
    english = {s: english_name(s) for s in sounds}
    lookup = set(english.values()) | {e.split()[-1] for e in english.values()}  # phrase, else its last word
    out: dict[str, dict[str, list[str]]] = {s: {"en": [e]} for s, e in english.items()}
    used: list[Path] = []
    for lang, code in FREEDICT_LANGUAGES.items():
        found, paths = _freedict(code, lookup)
        used += paths
        for s, e in english.items():
            senses = found.get(e) or found.get(e.split()[-1])
            if senses:
                out[s][lang] = senses[:3]  # at most three senses: ambiguity, not a thesaurus
    return out, used


def load_sources() -> Sources:
    """Find and parse every source file; raise DataError naming the Debian package when one is missing."""
    files = package_files(KTUBERLING_PACKAGE)
    sprites = _themes(files)
    recordings = _recordings(files)
    sprites = [s for s in sprites if s.sound in recordings]  # an object nobody recorded has no audio: skipped
    rsvg = next((p for p in package_files(RSVG_PACKAGE) if p.name == "rsvg-convert"), None)
    if rsvg is None:
        raise DataError(f"{RSVG_PACKAGE} does not ship rsvg-convert; reinstall it")
    sounds = sorted({s.sound for s in sprites})
    glosses, dict_files = _glosses(sounds)
    used = sorted({s.board for s in sprites} | {p for s in sounds for p in recordings[s].values()}
                  | {p for p in files if p.suffix in (".theme", ".soundtheme")} | set(dict_files))
    packages = [KTUBERLING_PACKAGE, RSVG_PACKAGE]
    packages += [f"dict-freedict-eng-{c}" for c in FREEDICT_LANGUAGES.values()]
    log.info("sources: %d sprites in %d themes, %d sound names, %d recordings", len(sprites),
             len({s.theme for s in sprites}), len(sounds), sum(len(recordings[s]) for s in sounds))
    return Sources(sprites=sprites, recordings={s: recordings[s] for s in sounds}, glosses=glosses, rsvg=rsvg,
                   packages={p: deb_version(p) for p in packages},
                   files={str(p): sha256_file(p) for p in used})
