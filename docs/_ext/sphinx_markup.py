"""Griffe extension of the docs build: renders torch_tempopt's Sphinx-flavoured docstrings as
Markdown.

The package's docstrings follow zuko's style (see /work/shared/STYLE.md): Google sections with
Sphinx markup, which pytest's doctests and ``help()`` read as they are, but which mkdocstrings
(Markdown) would print literally. Before griffe parses a docstring, this rewrites its text, for the
site only (the package's source is not touched):

* ``Example:`` becomes ``Examples:``: griffe turns ``>>>`` lines into code blocks only in an
  ``Examples:`` section (under ``Example:`` they are Markdown prose, and ``x[0]`` reads as a link).
* ``:math:`x``` becomes ``$x$`` and a ``.. math:: x`` line a ``$$ x $$`` block
  (pymdownx.arithmatex).
* ``:class:``, ``:meth:``, ``:func:``, ``:attr:``, ``:data:``, ``:mod:``, ``:exc:`` and ``:obj:``
  become a cross-reference when the target is a public object of the package, and inline code
  otherwise, e.g. for attributes without a docstring (``~a.b`` shows ``b``). Unresolved references
  then fail ``mkdocs build --strict``.
* A reST line block (lines starting with ``| ``, as in ``References:``) becomes a list, with
  bare URLs as links.

Loaded from mkdocs.yml (``plugins: mkdocstrings: handlers: python: options: extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

PACKAGE = "torch_tempopt"

_ROLE = re.compile(r":(?P<role>class|meth|func|attr|data|mod|exc|obj):`(?P<target>[^`]+)`")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<tex>.*)$", re.MULTILINE)
_EXAMPLE_SECTION = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_LINE_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\| (?P<text>.*)$", re.MULTILINE)
_URL = re.compile(r"(?<![<(\[])(https?://[^\s)>]+)")


def _is_public(path: str) -> bool:
    return not any(part.startswith("_") for part in path.split("."))


class SphinxMarkup(griffe.Extension):
    """Rewrites Sphinx markup into Markdown in every docstring of the package, once it
    is loaded.
    """

    def on_package(self, *, pkg: griffe.Module, loader: Any = None, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        self._pkg = pkg
        for obj in self._walk(pkg, set()):
            if obj.docstring is not None:
                obj.docstring.value = self._rewrite(obj.docstring.value, obj)

    def _walk(self, obj: griffe.Object, seen: set[str]) -> Any:
        if obj.path in seen:
            return
        seen.add(obj.path)
        yield obj
        for member in obj.members.values():
            if member.is_alias:
                continue
            yield from self._walk(member, seen)

    def _resolve(self, target: str, obj: griffe.Object) -> str | None:
        """The path of a public object of the package that ``target`` names from ``obj``,
        or None.
        """
        scopes = []
        scope: Any = obj
        while scope is not None:
            scopes.append(scope.path)
            scope = scope.parent
        candidates = [target] + [f"{s}.{target}" for s in scopes]
        for path in candidates:
            if not path.startswith(PACKAGE + ".") and path != PACKAGE:
                continue
            try:
                found = self._pkg[path[len(PACKAGE) + 1 :]] if path != PACKAGE else self._pkg
            except (KeyError, ValueError, griffe.AliasResolutionError):
                continue
            # Prefer the short public path (torch_tempopt.LearnableHorizon) over the defining
            # module's.
            short = f"{PACKAGE}.{found.name}"
            try:
                if found.is_class or found.is_function:
                    alias = self._pkg.members.get(found.name)
                    if (
                        alias is not None
                        and alias.is_alias
                        and alias.final_target.path == found.path
                    ):
                        return short
            except griffe.AliasResolutionError:
                pass
            # Only objects with a docstring get a heading (an anchor) on the site; ``#:`` comments
            # are not docstrings for griffe.
            if _is_public(found.path) and found.has_docstring:
                return found.path
        return None

    def _role(self, match: re.Match[str], obj: griffe.Object) -> str:
        role, target = match["role"], match["target"].strip()
        if "<" in target and target.endswith(">"):  # :class:`title <target>`
            title, target = target[:-1].split("<", 1)
            title = title.strip()
        else:
            title = None
        short = target.startswith("~")
        target = target.lstrip("~")
        if title is None:
            title = target.rsplit(".", 1)[-1] if short else target
            if role in ("meth", "func") and not title.endswith(")"):
                title += "()"
        path = self._resolve(target, obj)
        if path is None:
            return f"`{title}`"
        return f"[`{title}`][{path}]"

    def _rewrite(self, text: str, obj: griffe.Object) -> str:
        text = _EXAMPLE_SECTION.sub(lambda m: f"{m['indent']}Examples:", text)
        text = _MATH_DIRECTIVE.sub(
            lambda m: f"{m['indent']}$$\n{m['indent']}{m['tex'].strip()}\n{m['indent']}$$", text
        )
        text = _MATH_ROLE.sub(lambda m: f"${m['tex']}$", text)
        text = _ROLE.sub(lambda m: self._role(m, obj), text)
        text = _LINE_BLOCK.sub(lambda m: m["indent"] + "- " + _URL.sub(r"<\1>", m["text"]), text)
        return text
