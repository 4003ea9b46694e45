"""The library's public surface is exactly ``__all__``, and every name in it is documented."""

from __future__ import annotations

import inspect

import authmesh


def test_all_lists_every_public_member_and_nothing_else() -> None:
    public = {name for name in vars(authmesh) if not name.startswith("_")}
    # Submodules become attributes of the package when imported; they are not part of the API.
    modules = {name for name in public if inspect.ismodule(getattr(authmesh, name))}
    assert set(authmesh.__all__) == public - modules
    assert sorted(authmesh.__all__) == authmesh.__all__


def test_every_exported_member_has_a_docstring() -> None:
    undocumented = [name for name in authmesh.__all__ if not inspect.getdoc(getattr(authmesh, name))]
    assert undocumented == []
