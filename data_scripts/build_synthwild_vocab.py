"""Rebuild synthclip's cut-down BPE vocabulary from every word the synthwild world can emit.

    python data_scripts/build_synthwild_vocab.py

Writes ``rftlib/models/configs/synthwild_bpe.txt.gz`` and sets ``vocab_size`` in the project's
model configs (``synthclip.json``, ``rft-tiny.json``). Changing the vocabulary invalidates the
committed synthclip weights: run ``data_scripts/pretrain_synthclip.py`` afterwards.
"""

from __future__ import annotations

import argparse
import json

from rftlib.data.synthwild import WorldConfig, build_world, corpus_words
from rftlib.models.loading import CONFIG_DIR
from rftlib.models.vocab import write_subset_bpe

EXTRA_WORDS = "a an the of in on at near with and photo picture image camera trap animal".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="world seed (species names depend on it)")
    args = parser.parse_args()
    words = set(corpus_words(build_world(WorldConfig(seed=args.seed)))) | set(EXTRA_WORDS)
    vocab = write_subset_bpe(sorted(words), CONFIG_DIR / "synthwild_bpe.txt.gz")
    for name in ("synthclip.json", "rft-tiny.json"):
        path = CONFIG_DIR / name
        cfg = json.loads(path.read_text())
        cfg["text_cfg"]["vocab_size"] = vocab
        path.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"{len(words)} words -> vocabulary of {vocab} tokens")


if __name__ == "__main__":
    main()
