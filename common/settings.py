"""Settings: each setting of a program declared once, as a field of its config dataclass.

A field made by `setting(...)` carries, in its metadata, the Setting: the environment variable,
the parser that validates a value, the default (a value, or a Rule computed from the settings
declared before it), and a one-line help. From these fields alone come reading the environment
and the command line (`read`), `--help` (`help_text`) and the table in docs/settings.md
(`markdown`), as Hugging Face's HfArgumentParser does for its dataclasses.

A flag names its variable: `--fine-tune-epochs 3`, `--fine_tune_epochs=3` and
`--FINE_TUNE_EPOCHS=3` all set FINE_TUNE_EPOCHS, and a flag beats the variable. Both go through
the same parser, so a bad value is the same one-line ConfigError either way. TensorFlow-free.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import textwrap
from typing import Any, Callable, Iterable, Mapping, Sequence

METADATA_KEY = "setting"
HELP_WIDTH = 96
HOW_TO_SET = ("Every setting is an environment variable or a flag: FINE_TUNE_EPOCHS=3, "
              "--fine-tune-epochs 3, --fine_tune_epochs=3 and --FINE_TUNE_EPOCHS=3 are alike, and "
              "a flag beats the variable. A bad value exits 2. LOG_FORMAT (json, text or auto) "
              "is read from the environment only.")
SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}


class ConfigError(ValueError):
    """A setting is missing or has a value the program cannot use (exit 2)."""


class Invalid(ValueError):
    """Raised by a parser whose reason says more than "expected <what it accepts>"."""


@dataclasses.dataclass(frozen=True)
class Parser:
    """Text to a typed value; ValueError (or Invalid, with a reason) for text it refuses."""
    accepts: str  # what it takes, for error messages: "an integer >= 1"
    convert: Callable[[str], Any]
    switch: bool = False  # on/off: a bare flag (`--tta`) means on


@dataclasses.dataclass(frozen=True)
class Rule:
    """A default computed from the config being built: `compute(config)` sees every field declared
    before this one (for example IMAGE_SIZE's default follows BACKBONE)."""
    compute: Callable[[Any], Any]
    shown: str  # the rule in words, for --help and the docs


@dataclasses.dataclass(frozen=True)
class Setting:
    variable: str  # FINE_TUNE_EPOCHS; its flag is --fine-tune-epochs
    parse: Parser
    help: str
    default: Any = dataclasses.MISSING  # MISSING: required
    required: str = ""  # what to set a required setting to, for its error message
    # Other variables read, in order, when this one is unset (Vertex AI's names), each with the
    # conversion of its value into this one's form.
    also: Mapping[str, Callable[[str], str]] = dataclasses.field(default_factory=dict)
    shown: str = ""  # the default as --help and the docs show it, when str() would not do

    @property
    def flag(self) -> str:
        return "--" + self.variable.lower().replace("_", "-")

    def default_text(self) -> str:
        if self.default is dataclasses.MISSING:
            return "(required)"
        if self.shown:
            return self.shown
        if isinstance(self.default, Rule):
            return self.default.shown
        return _value_text(self.default)

    def value_of(self, raw: str, variable: str | None = None) -> Any:
        """raw (the text of `variable`, this setting's own or one of its `also`) parsed; a bad
        value raises ConfigError naming the variable and what it accepts."""
        variable = variable or self.variable
        try:
            return self.parse.convert(self.also[variable](raw) if variable in self.also else raw)
        except ConfigError:
            raise
        except Invalid as reason:
            raise ConfigError(f"{variable}={raw!r} is not valid: {reason}") from None
        except (ValueError, TypeError, KeyError):
            raise ConfigError(f"{variable}={raw!r} is not valid: expected {self.parse.accepts}") \
                from None


def setting(variable: str, parse: Parser, default: Any = dataclasses.MISSING, *, help: str,
            required: str = "", also: Mapping[str, Callable[[str], str]] | None = None,
            shown: str = "") -> Any:
    """A dataclass field declaring one setting (see Setting); without a default it is required."""
    declared = Setting(variable, parse, help, default, required, dict(also or {}), shown)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata={METADATA_KEY: declared})
    return dataclasses.field(default=default, metadata={METADATA_KEY: declared})


def settings_of(config_class) -> dict[str, Setting]:
    """The class's settings by field name, in declaration order."""
    return {field.name: field.metadata[METADATA_KEY] for field in dataclasses.fields(config_class)
            if METADATA_KEY in field.metadata}


def apply_rules(config) -> None:
    """Replaces each Rule left as a default by its value, in field order; for __post_init__ of a
    frozen dataclass, so that a Config built directly gets the same defaults as one read."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Rule):
            object.__setattr__(config, field.name, value.compute(config))


def read(config_class, environ: Mapping[str, str], argv: Sequence[str] = (), prog: str = "",
         overrides: Mapping[str, Any] | None = None):
    """The config_class instance the environment and the flags in argv set (a flag beats its
    variable), with the field values in overrides put in place of what they give; ConfigError,
    one line, for a bad value, a missing required one or an unknown flag."""
    declared = settings_of(config_class)
    flags = _flag_values(declared.values(), argv, prog)
    values = {}
    for name, each in declared.items():
        raw, variable = _raw_value(each, flags, environ)
        if raw is None and each.default is dataclasses.MISSING:
            raise ConfigError(f"{each.variable} is required: set it to {each.required}")
        if raw is not None:
            values[name] = each.value_of(raw, variable)
    return config_class(**{**values, **(overrides or {})})


def given(config_class, name: str, environ: Mapping[str, str], argv: Sequence[str] = (),
          prog: str = "") -> bool:
    """Whether the setting of field `name` was set, by its flag or a variable, rather than left
    to its default."""
    each = settings_of(config_class)[name]
    flags = _flag_values(settings_of(config_class).values(), argv, prog)
    return _raw_value(each, flags, environ)[0] is not None


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def help_text(config_class, prog: str) -> str:
    """--help: what the program does (its config's docstring), then every setting: variable,
    flag, default and meaning."""
    paragraphs = [inspect.cleandoc(config_class.__doc__ or ""), HOW_TO_SET]
    lines = [f"usage: {prog} [--setting VALUE ...]", ""]
    for paragraph in paragraphs:
        lines += textwrap.wrap(" ".join(paragraph.split()), width=HELP_WIDTH) + [""]
    lines.append("settings (variable, flag, default):")
    for each in settings_of(config_class).values():
        also = f" (or {' or '.join(each.also)})" if each.also else ""
        default = each.default_text()
        lines.append(f"  {each.variable}, {each.flag}{also}  " +
                     (default if default.startswith("(") else f"(default: {default})"))
        lines += textwrap.wrap(each.help, width=HELP_WIDTH, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def markdown(config_class) -> str:
    """The settings as a Markdown table: variable (and flag), default, meaning."""
    rows = ["| Variable | Flag | Default | Meaning |", "|---|---|---|---|"]
    for each in settings_of(config_class).values():
        names = " or ".join(f"`{name}`" for name in [each.variable, *each.also])
        default = each.default_text()
        plain = not (each.shown or isinstance(each.default, Rule)
                     or each.default in (dataclasses.MISSING, None, ""))
        default = f"`{default}`" if plain else default
        rows.append(f"| {names} | `{each.flag}` | {default} | {_cell(each.help)} |")
    return "\n".join(rows) + "\n"


# --- parsers -------------------------------------------------------------------------------------

def integer(minimum: int, maximum: int | None = None) -> Parser:
    def convert(raw: str) -> int:
        value = int(raw)
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError
        return value

    accepts = (f"an integer >= {minimum}" if maximum is None
               else f"an integer from {minimum} to {maximum}")
    return Parser(accepts, convert)


def positive_number() -> Parser:
    def convert(raw: str) -> float:
        value = float(raw)
        if not value > 0 or value == float("inf"):
            raise ValueError
        return value

    return Parser("a positive number such as 1e-4", convert)


def fraction(open_high: bool = False) -> Parser:
    """A number from 0 to 1, or to below 1 with open_high."""
    def convert(raw: str) -> float:
        value = float(raw)
        if not (0 <= value < 1 if open_high else 0 <= value <= 1):
            raise ValueError
        return value

    return Parser("a number from 0 to below 1" if open_high else "a number from 0 to 1", convert)


def switch() -> Parser:
    return Parser("one of 1, 0, true, false, on, off", lambda raw: SWITCH_WORDS[raw.lower()],
                  switch=True)


def choice(choices: Iterable[str]) -> Parser:
    """One of choices, in any case, as written there."""
    choices = tuple(choices)

    def convert(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError
        return raw.lower()

    return Parser("one of " + ", ".join(choices), convert)


def number_choice(choices: Iterable[float]) -> Parser:
    choices = tuple(choices)

    def convert(raw: str) -> float:
        value = float(raw)
        if value not in choices:
            raise ValueError
        return value

    return Parser("one of " + ", ".join(map(str, choices)), convert)


def text() -> Parser:
    return Parser("text", str)


# --- reading -------------------------------------------------------------------------------------

class _FlagParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; one line instead
        raise ConfigError(f"{message} (`{self.prog} --help` lists the settings)")


def _flag_values(declared: Iterable[Setting], argv: Sequence[str], prog: str) -> dict[str, str]:
    """The raw text of each setting given as a flag, by variable."""
    parser = _FlagParser(prog=prog or "the program", add_help=False, allow_abbrev=False)
    for each in declared:
        extra = {"nargs": "?", "const": "1"} if each.parse.switch else {}
        parser.add_argument(each.flag, dest=each.variable, metavar=each.variable, **extra)
    given = parser.parse_args([_canonical_flag(arg) for arg in argv])
    return {variable: raw for variable, raw in vars(given).items() if raw is not None}


def _canonical_flag(arg: str) -> str:
    """--FINE_TUNE_EPOCHS=3 and --fine_tune_epochs=3 as --fine-tune-epochs=3; values untouched."""
    if not arg.startswith("--"):
        return arg
    name, equals, value = arg.partition("=")
    return name.lower().replace("_", "-") + equals + value


def _raw_value(each: Setting, flags: Mapping[str, str], environ: Mapping[str, str]):
    """(text, the variable it came from) for a setting: its flag, its variable, then each of its
    `also` variables; (None, None) when none is set. Empty text counts as unset."""
    flagged = flags.get(each.variable, "").strip()
    if flagged:
        return flagged, each.variable
    for variable in [each.variable, *each.also]:
        raw = (environ.get(variable) or "").strip()
        if raw:
            return raw, variable
    return None, None


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None or value == "":
        return "unset"
    return str(value)


def _cell(text_in_a_cell: str) -> str:
    return text_in_a_cell.replace("|", "\\|")
