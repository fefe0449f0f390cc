"""Small text resources shipped with rftlib: class names, prompt templates, class subsets.

The files live in ``rftlib/data/files/`` and hold one entry per line. Blank lines and lines that
start with ``#`` are ignored, so a file may carry a comment header.

Prompt templates contain one ``{}`` that is replaced by the class name (``"a photo of a {}."``).
One extra placeholder exists because the FMoW prompts of WiSE-FT need it: ``{a/an} {}`` renders the
class name with its underscores turned into spaces, preceded by ``"an"`` if it starts with a vowel
and ``"a"`` otherwise (``"satellite photo of {a/an} {}."`` with ``"airport_hangar"`` gives
``"satellite photo of an airport hangar."``). Outside that placeholder class names are inserted
unchanged, underscores included -- exactly what the original templates do.

Templates are returned as :class:`Template` objects: ordinary strings whose :meth:`Template.format`
knows the ``{a/an}`` rule, so any code that calls ``template.format(classname)`` works with them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

FILES_DIR = Path(__file__).resolve().parent / "files"
ARTICLE_PLACEHOLDER = "{a/an} {}"


class Template(str):
    """A prompt template; ``format(name)`` fills ``{}`` and understands ``{a/an} {}``.

    Example:
        >>> Template("aerial photo of {a/an} {}.").format("oil_or_gas_facility")
        'aerial photo of an oil or gas facility.'
        >>> Template("a photo of a {}.").format("multi-unit_residential")
        'a photo of a multi-unit_residential.'
    """

    def format(self, *args, **kwargs) -> str:  # noqa: A003 - mirrors str.format on purpose
        """Fill the template; with ``{a/an}`` the single positional argument is the class name."""
        if ARTICLE_PLACEHOLDER not in self:
            return str.format(self, *args, **kwargs)
        if len(args) != 1 or kwargs:
            raise ValueError(f"template {str(self)!r} takes exactly one class name")
        return str.replace(self, ARTICLE_PLACEHOLDER, with_article(str(args[0])))


def with_article(name: str) -> str:
    """``name`` with underscores as spaces, preceded by "a" or "an" (WiSE-FT's rule: vowel -> "an").

    Args:
        name: a class name such as ``"airport_hangar"``.

    Returns:
        E.g. ``"an airport hangar"``.
    """
    name = name.replace("_", " ")
    return ("an " if name[:1] in tuple("aeiou") else "a ") + name


def resource_path(name: str) -> Path:
    """The path of the shipped text file ``name`` (e.g. ``"imagenet_classnames.txt"``).

    Raises:
        FileNotFoundError: the file does not exist; the message lists the available ones.
    """
    path = FILES_DIR / name
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in FILES_DIR.glob("*.txt")))
        raise FileNotFoundError(f"no rftlib data file {name!r} in {FILES_DIR}; available: {available}")
    return path


@cache
def _read_cached(name: str) -> tuple[str, ...]:
    text = resource_path(name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip() and not line.startswith("#"))


def read_lines(name: str) -> list[str]:
    """The entries of a shipped text file: one per non-blank, non-comment line, in file order.

    Args:
        name: file name inside ``rftlib/data/files/`` (``"imagenet_wnids.txt"``).

    Returns:
        A fresh list (callers may modify it).
    """
    return list(_read_cached(name))


def read_templates(name: str) -> list[Template]:
    """Prompt templates from a shipped file (``"fmow_templates.txt"`` or just ``"fmow"``).

    Args:
        name: a file name, or a short name that is completed to ``<name>_templates.txt``.

    Raises:
        ValueError: a line has no ``{}`` placeholder for the class name.
    """
    if not name.endswith(".txt"):
        name = f"{name}_templates.txt"
    templates = [Template(line) for line in read_lines(name)]
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {str(t)!r} in {name} has no '{{}}' for the class name")
    return templates
