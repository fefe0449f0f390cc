#!/usr/bin/env python
"""Put DRM's concept descriptions for a real dataset where rftlib's DRM finds them.

DRM prompts CLIP with an LLM-written description of each class's core features. For synthwild
they come with the world; for iWildCam, FMoW and ImageNet the DRM authors released them
(github.com/vaynexie/DRM, ``prompts/<dataset>_cd.json``). rftlib's DRM reads
``<root>/drm_concept_descriptions/<dataset>_cd.json`` when the notebook's ``descriptions``
parameter is empty, so that ``papermill notebooks/drm.ipynb out.ipynb -p dataset iwildcam`` works
once this script has run:

    python data_scripts/prepare_drm_descriptions.py iwildcam --root data --download
    python data_scripts/prepare_drm_descriptions.py iwildcam --root data --adopt ~/DRM/prompts/iwildcam_cd.json
    python data_scripts/prepare_drm_descriptions.py iwildcam --root data        # only verify

A file is checked before it is put in place: valid JSON, one string or list of strings per class,
and the number of classes the dataset has (182 iWildCam, 62 FMoW, 1000 ImageNet). With the data
itself prepared under ``--root`` the entries are also mapped onto the dataset's class names.
The exit status is 0 when the file is ready and 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

try:
    import rftlib  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rftlib.methods.concepts import ConceptDescriptionError, description_file, load_concept_descriptions

RELEASE_URL = "https://raw.githubusercontent.com/vaynexie/DRM/{ref}/prompts/{name}_cd.json"
NUM_CLASSES = {"iwildcam": 182, "fmow": 62, "imagenet": 1000}


def check(path: Path, name: str, root: Path) -> str:
    """Validate a description file; returns a one-line summary, raises ConceptDescriptionError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConceptDescriptionError(f"{path} is not readable JSON: {err}") from err
    if len(data) != NUM_CLASSES[name]:
        raise ConceptDescriptionError(f"{path} has {len(data)} entries; {name} has {NUM_CLASSES[name]} classes")
    classnames = _dataset_classnames(name, root)
    if classnames is None:
        return f"{len(data)} entries (the {name} data is not under {root}, so names were not matched)"
    load_concept_descriptions(data, classnames)
    return f"{len(data)} entries, every class of the prepared {name} data has a description"


def _dataset_classnames(name: str, root: Path) -> list[str] | None:
    from rftlib.data import DataNotFoundError, get_dataset

    try:
        return get_dataset(name, root=root).classnames
    except (DataNotFoundError, ImportError):
        return None


def fetch(name: str, ref: str, dest: Path) -> None:
    url = RELEASE_URL.format(ref=ref, name=name)
    print(f"downloading {url}")
    with urllib.request.urlopen(url, timeout=60) as response:
        dest.write_bytes(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=sorted(NUM_CLASSES))
    parser.add_argument("--root", type=Path, default=Path("data"), help="data root (as for the dataset itself)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--download", action="store_true", help="fetch DRM's released file from GitHub")
    source.add_argument("--adopt", type=Path, help="a copy you already have (DRM's prompts/<dataset>_cd.json)")
    parser.add_argument("--ref", default="main", help="git ref of vaynexie/DRM to download from")
    args = parser.parse_args(argv)

    target = description_file(args.root, args.dataset)
    try:
        if args.download or args.adopt:
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp) / target.name
                if args.download:
                    fetch(args.dataset, args.ref, staged)
                else:
                    shutil.copyfile(args.adopt, staged)
                summary = check(staged, args.dataset, args.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(staged), target)  # only a checked file reaches the target
        elif not target.exists():
            print(f"{target} does not exist; run again with --download or --adopt <file>", file=sys.stderr)
            return 1
        else:
            summary = check(target, args.dataset, args.root)
    except (ConceptDescriptionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"ready: {target}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
