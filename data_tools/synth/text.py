"""Random text for synthetic OCR: words, numbers, sentences, headings, table cells, per language.

Draws from the built-in word lists (`wordlists.py`), digits (Western and, for Arabic and
Persian, the local digit set) and letters; all randomness comes from the `random.Random`
passed in, so output is deterministic given a seed.
"""

from __future__ import annotations

import random

from data_tools.synth import wordlists
from data_tools.synth.fonts import script_of_lang

LANGS = tuple(wordlists.WORDS)


class TextSource:
    """Word/character-level text in one language."""

    def __init__(self, lang: str, rng: random.Random):
        if lang not in wordlists.WORDS:
            raise ValueError(f"no word list for language {lang!r}; known: {LANGS}")
        self.lang = lang
        self.script = script_of_lang(lang)
        self.rng = rng
        self.words = wordlists.WORDS[lang]
        self.sep = "" if self.script == "chinese" else " "
        self.punct = wordlists.PUNCT[self.script]

    def number(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            s = str(self.rng.randint(0, 9999))
        elif r < 0.8:
            s = f"{self.rng.uniform(0, 1000):.{self.rng.randint(1, 2)}f}"
        else:
            s = f"{self.rng.randint(1, 28):02d}.{self.rng.randint(1, 12):02d}.{self.rng.randint(1950, 2030)}"
        if self.script in wordlists.LOCAL_DIGITS and self.rng.random() < 0.3:
            local = wordlists.LOCAL_DIGITS[self.script]
            s = "".join(local[int(c)] if c.isdigit() else c for c in s)
        return s

    def word(self) -> str:
        r = self.rng.random()
        if r < 0.1:
            return self.number()
        w = self.rng.choice(self.words)
        if self.script in ("latin", "cyrillic") and r > 0.93:
            w = w.capitalize() if r < 0.98 else w.upper()
        return w

    def words_text(self, n: int) -> str:
        return self.sep.join(self.word() for _ in range(max(1, n)))

    def sentence(self, min_words: int = 4, max_words: int = 14) -> str:
        n = self.rng.randint(min_words, max_words)
        parts = [self.word() for _ in range(n)]
        if self.script in ("latin", "cyrillic"):
            parts[0] = parts[0][:1].upper() + parts[0][1:]
        end = "。" if self.script == "chinese" else ("." if self.script in ("latin", "cyrillic") else ".")
        if self.rng.random() < 0.3 and n > 4:  # an inner comma
            k = self.rng.randint(1, n - 2)
            parts[k] += self.punct[0] if self.script != "latin" else ","
        return self.sep.join(parts) + end

    def paragraph(self, min_sent: int = 2, max_sent: int = 5) -> str:
        return self.sep.join(self.sentence() for _ in range(self.rng.randint(min_sent, max_sent)))

    def heading(self) -> str:
        text = self.words_text(self.rng.randint(2, 6)).rstrip(".")
        if self.script in ("latin", "cyrillic"):
            text = text[:1].upper() + text[1:]
        if self.rng.random() < 0.3:
            text = (
                f"{self.rng.randint(1, 12)}. {text}"
                if self.script != "chinese"
                else f"{self.rng.randint(1, 12)} {text}"
            )
        return text

    def cell(self) -> str:
        return self.number() if self.rng.random() < 0.5 else self.words_text(self.rng.randint(1, 2))

    def chars(self, n: int, alphabet: str | None = None) -> str:
        """`n` random characters from `alphabet` (default: letters + digits of the script)."""
        pool = alphabet or (wordlists.LETTERS[self.script] + wordlists.DIGITS)
        return "".join(self.rng.choice(pool) for _ in range(n))

    def short(self, min_len: int, max_len: int) -> str:
        """A short string of min_len..max_len characters: words, a number, or random letters."""
        target = self.rng.randint(min_len, max_len)
        r = self.rng.random()
        if r < 0.2:
            return self.chars(target)
        if r < 0.3:
            return self.chars(target, wordlists.DIGITS)
        text = self.word()
        for _ in range(64):
            if len(text) >= target:
                break
            nxt = self.sep.join([text, self.word()])
            if len(nxt) > max_len:
                break
            text = nxt
        if len(text) > max_len:
            text = text[:max_len].rstrip()
        gap = min_len - len(text)
        if gap > 0:
            text = text + (
                self.sep + self.chars(gap - len(self.sep)) if gap > len(self.sep) else self.chars(gap)
            )
        return text
