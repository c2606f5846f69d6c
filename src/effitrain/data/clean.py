"""Cleaning while the corpus streams: quality filters, exact duplicates (normalised text hash) and near duplicates
(MinHash LSH, data/near_dup.py; off unless data.clean.near_dup_threshold is set), each removed document counted by
its reason with a few examples, for data_report.json.

The filters look at one document at a time; the duplicate filters keep 16 bytes (exact) and a signature (near) per
kept document, never its text, so cleaning keeps preparation's memory bound by the number of documents.
"""

from __future__ import annotations

import hashlib
import re
import string

from effitrain.data.corpus import Document

_TEXT = re.compile(r"[\w\s" + re.escape(string.punctuation) + "]+")  # letters and digits of any script
_SPACE = re.compile(r"\s+")
_EXAMPLES = 3  # kept per reason
_EXAMPLE_CHARS = 160


class Cleaner:
    """`reason(doc)`: why a document is removed (None: kept); `report()`: counts by reason and examples."""

    def __init__(self, cfg):
        self.cfg, self.seen = cfg, set()
        self.near = None
        if cfg.near_dup_threshold is not None:
            from effitrain.data.near_dup import NearDuplicates  # datasketch: imported only when asked for

            self.near = NearDuplicates(threshold=cfg.near_dup_threshold, num_perm=cfg.near_dup_num_perm,
                                       shingle_words=cfg.near_dup_shingle_words)
        self.documents = self.kept = 0
        self.removed: dict[str, int] = {}
        self.examples: dict[str, list[dict]] = {}

    def reason(self, doc: Document) -> str | None:
        self.documents += 1
        why, similar = self._why(doc.text), None
        if why is None and self.near is not None and (similar := self.near.match(doc.name, doc.text)):
            why = "near_duplicate"
        if why is None:
            self.kept += 1
            return None
        self.removed[why] = self.removed.get(why, 0) + 1
        shown = self.examples.setdefault(why, [])
        if len(shown) < _EXAMPLES:
            example = {"name": doc.name, "text": doc.text[:_EXAMPLE_CHARS]}
            if similar:  # which kept document it resembles, and how much
                example |= {"similar_to": similar[0], "jaccard": similar[1]}
            shown.append(example)
        return why

    def _why(self, text: str) -> str | None:
        c = self.cfg
        stripped = text.strip()
        if len(stripped) < c.min_chars:
            return "too_short"
        if len(_TEXT.sub("", text)) > c.max_non_text * len(text):
            return "non_text"
        lines = text.splitlines()
        if max(map(len, lines), default=0) > c.max_line_chars:
            return "long_line"
        nonblank = [ln.strip() for ln in lines if ln.strip()]
        if nonblank and (len(nonblank) - len(set(nonblank))) > c.max_repeated_lines * len(nonblank):
            return "repeated_lines"
        if c.exact_duplicates:  # last: a document removed for quality does not claim its text
            key = hashlib.blake2b(_SPACE.sub(" ", stripped.lower()).encode(), digest_size=16).digest()
            if key in self.seen:
                return "exact_duplicate"
            self.seen.add(key)
        return None

    def report(self) -> dict:
        return {"enabled": True, "documents": self.documents, "kept": self.kept,
                "removed": dict(sorted(self.removed.items())), "examples": dict(sorted(self.examples.items()))}
