"""AVT-Digits text: digit words from num2words in many languages, with seeded typo noise.

Training and test languages are disjoint. The test languages are relatives of the training ones (Portuguese
next to Spanish and Italian, Dutch next to German and English, Ukrainian next to Russian, ...) plus a few that
share little with them, so text is informative but imperfect on the test split.
"""

from __future__ import annotations

import numpy as np

from mmfusion.errors import DataError


def digit_words(lang: str) -> list[str]:
    """The words for 0-9 in `lang` (a num2words language code), lower-cased."""
    from num2words import num2words

    try:
        return [num2words(d, lang=lang).lower() for d in range(10)]
    except NotImplementedError as e:
        raise DataError(f"num2words has no language {lang!r}") from e


def add_typos(word: str, rng: np.random.Generator, alphabet: str, n_edits: int) -> str:
    """Apply `n_edits` random edits: swap two neighbours, drop a character, or substitute one from
    `alphabet`."""
    chars = list(word)
    for _ in range(n_edits):
        if len(chars) < 2:
            break
        i = int(rng.integers(len(chars)))
        op = int(rng.integers(3))
        if op == 0:  # swap with the next character (or the previous one at the end)
            j = i + 1 if i + 1 < len(chars) else i - 1
            chars[i], chars[j] = chars[j], chars[i]
        elif op == 1 and len(chars) > 2:  # drop: never shorter than two characters
            del chars[i]
        else:  # substitute with another letter of the same script
            chars[i] = alphabet[int(rng.integers(len(alphabet)))]
    return "".join(chars)


class WordSampler:
    """Draws a noisy digit word for a class from a set of languages.

    Args:
        languages: num2words language codes to draw from (uniformly).
        typo_rate: probability that a word gets typos (then one edit, or two with probability 1/4).
        capitalize_rate: probability that the word is Capitalized (people do that at the start of a field).
    """

    def __init__(self, languages: list[str], typo_rate: float, capitalize_rate: float = 0.1) -> None:
        if not languages:
            raise DataError("AVT-Digits text needs at least one language")
        self.languages = list(languages)
        self.words = {lang: digit_words(lang) for lang in self.languages}
        # substitutions come from the letters the language itself uses, so a typo stays in the same script
        self.alphabets = {lang: "".join(sorted({c for w in ws for c in w if c.isalpha()}))
                          for lang, ws in self.words.items()}
        self.typo_rate = typo_rate
        self.capitalize_rate = capitalize_rate

    def garble(self, lang: str, rng: np.random.Generator) -> str:
        """An unreadable field: 3-8 random letters of the language's script (a smudged, mis-scanned entry)."""
        alphabet = self.alphabets[lang]
        return "".join(alphabet[int(i)] for i in rng.integers(len(alphabet), size=int(rng.integers(3, 9))))

    def sample(self, digit: int, rng: np.random.Generator) -> tuple[str, str, int]:
        """-> (text, language, number of typo edits applied)."""
        lang = self.languages[int(rng.integers(len(self.languages)))]
        word = self.words[lang][digit]
        edits = 0
        if rng.random() < self.typo_rate:
            edits = 2 if rng.random() < 0.25 else 1
            word = add_typos(word, rng, self.alphabets[lang], edits)
        if rng.random() < self.capitalize_rate:
            word = word[:1].upper() + word[1:]
        return word, lang, edits
