"""Command-line options made from dataclass fields (the settings classes, the recipes' arguments).

One builder serves ``icons-hf`` and the example recipes: each field becomes ``--field-name`` (and
``--field_name``), with its ``help`` metadata, its type (``X | None`` unwrapped, ``list[X]``/``tuple[X, ...]`` one
or more values, ``bool`` as ``--name`` / ``--no-name``) and its ``choices``. Kept light (no torch, no
transformers) so that ``icons-hf --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence

_UNSET = (None, False, [])


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no) as a command-line value."""
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def option_kwargs(hint, metadata: Mapping, *, negated: bool = False) -> dict:
    """argparse keywords for a field of type ``hint`` with ``metadata`` (``help`` and ``required`` excluded). A
    ``bool`` is ``--name`` / ``--no-name``; one whose name is already a negation (``negated``, e.g. ``no_features``)
    is ``--no-features [BOOL]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) not in (list, tuple):  # Optional[X] / X | None
        hint = args[0]
    kwargs = {k: v for k, v in metadata.items() if k not in ("help", "required")}
    if typing.get_origin(hint) in (list, tuple):
        kwargs.setdefault("type", typing.get_args(hint)[0])
        if kwargs.get("action") != "append":
            kwargs.setdefault("nargs", "+")
    elif hint is bool and negated:  # argparse would read "--no-x" as the negative of "--x"
        kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
    elif hint is bool:
        kwargs.setdefault("action", argparse.BooleanOptionalAction)
    else:
        kwargs.setdefault("type", hint)
    return kwargs


def add_dataclass_options(
    parser: argparse.ArgumentParser, cls, *, dest_prefix: str = "", renames: Mapping | None = None,
    skip: Sequence[str] = (), keep_defaults: bool = True, title: str | None = None, notes: Mapping | None = None,
):
    """One option per field of the dataclass ``cls`` in a new argument group (returned). With
    ``keep_defaults=False`` every option defaults to ``None`` (= not given: the class, e.g. a settings preset,
    supplies the value; the field's default is shown in the help). ``renames`` maps a field to its option name,
    ``notes`` a field to a sentence added to its help, ``dest_prefix`` prefixes the namespace attribute."""
    group = parser.add_argument_group(title or cls.__name__, (cls.__doc__ or "").strip() or None)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        name = (renames or {}).get(f.name, f.name)
        note = (notes or {}).get(f.name)
        if note is None and not any(default is u or default == u for u in _UNSET):
            note = f"default: {'%(default)s' if keep_defaults else str(default).replace('%', '%%')}"
        help_text = f.metadata.get("help", f.name).replace("%", "%%") + (f" ({note})" if note else "")
        kwargs = option_kwargs(hints[f.name], f.metadata, negated=name.startswith("no_"))
        if "choices" not in kwargs and kwargs.get("action") is not argparse.BooleanOptionalAction:
            kwargs.setdefault("metavar", name.upper())
        flags = dict.fromkeys([f"--{name.replace('_', '-')}", f"--{name}"])  # --name-with-dashes, --name_as_field
        group.add_argument(*flags, dest=f"{dest_prefix}{f.name}", default=default if keep_defaults else None,
                           help=help_text, required=bool(f.metadata.get("required")), **kwargs)
    return group


def given_options(args: argparse.Namespace, cls, *, dest_prefix: str = "", skip: Sequence[str] = ()) -> dict:
    """``field -> value`` of the options of ``cls`` that were given (not ``None``)."""
    values = {f.name: getattr(args, f"{dest_prefix}{f.name}", None) for f in dataclasses.fields(cls)
              if f.name not in skip}
    return {k: v for k, v in values.items() if v is not None}


__all__ = ["add_dataclass_options", "given_options", "option_kwargs", "parse_bool"]
