"""A cut-down BPE vocabulary that tokenises a known corpus exactly like the full CLIP vocabulary.

open_clip's ``SimpleTokenizer`` builds its vocabulary from a merges file: 256 byte tokens, 256
byte+``</w>`` tokens, one token per merge line, then the two special tokens (so end-of-text keeps
the highest id and argmax text pooling still works). BPE always applies the lowest-ranked merge
among the pairs present, so keeping every merge that the full vocabulary applies to the corpus
words, in their original rank order, reproduces the full tokenisation of those words exactly;
other words still tokenise, into smaller pieces. For synthwild this shrinks the token embedding
from 49,408 rows to under a thousand, which keeps synthclip's weights at a few megabytes.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from pathlib import Path


def _full_merges() -> list[tuple[str, str]]:
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]


def subset_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """The merges (in rank order) that the full CLIP BPE applies to ``words``."""
    from open_clip.tokenizer import SimpleTokenizer

    full = SimpleTokenizer()
    merges = _full_merges()
    producer = {a + b: (a, b) for a, b in merges}
    rank = {m: i for i, m in enumerate(merges)}
    needed: set[tuple[str, str]] = set()

    def collect(token: str) -> None:
        pair = producer.get(token)
        if pair is None or pair in needed:
            return
        needed.add(pair)
        collect(pair[0])
        collect(pair[1])

    for word in words:
        for piece in _pieces(full, word):
            collect(piece)
    return sorted(needed, key=rank.__getitem__)


def _pieces(tokenizer, text: str) -> list[str]:
    """The final BPE tokens (as strings) of ``text`` under ``tokenizer``."""
    import regex
    from open_clip.tokenizer import basic_clean, whitespace_clean

    text = whitespace_clean(basic_clean(text)).lower()
    out = []
    for tok in regex.findall(tokenizer.pat, text):
        tok = "".join(tokenizer.byte_encoder[b] for b in tok.encode("utf-8"))
        out.extend(tokenizer.bpe(tok).split(" "))
    return out


def write_subset_bpe(words: Iterable[str], out: str | Path) -> int:
    """Write a gzip merges file for ``words``; returns the resulting vocabulary size."""
    merges = subset_merges(words)
    body = "\n".join(["#version: rftlib subset of the CLIP BPE"] + [f"{a} {b}" for a, b in merges])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(filename="", mode="wb", fileobj=open(out, "wb"), mtime=0) as f:
        f.write(body.encode("utf-8"))
    return 512 + len(merges) + 2
