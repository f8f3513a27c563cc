"""Choice-valued config fields: `typing.Literal` annotations, checked in one place.

The config loader checks a Literal field when it reads a YAML value; `check_choices` does the same for a section
built in code, so each section's `validate()` starts with it instead of hand-written "must be one of" checks.
"""

import dataclasses
import types
import typing

from common.errors import UserError


def literal_choices(tp) -> tuple | None:
    """The allowed values of a Literal annotation (also inside `X | None`), else None."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = literal_choices(arg)
            if found is not None:
                return (*found, *((None,) if type(None) in typing.get_args(tp) else ()))
    return None


def choice_message(where: str, value, choices: tuple) -> str:
    """'sample.uncond must be one of null, negative, got 'none'': the one wording of a bad choice."""
    return f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}"


def check_choices(section, name: str, error: type[UserError] = UserError) -> None:
    """Raise `error` for the first Literal-typed field of dataclass `section` whose value is not a choice;
    `name` is the section's key in a run config (`sample`, `distill`, ...)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        choices = literal_choices(hints[f.name])
        value = getattr(section, f.name)
        if choices is not None and value not in choices:
            raise error(choice_message(f"{name}.{f.name}", value, choices))
