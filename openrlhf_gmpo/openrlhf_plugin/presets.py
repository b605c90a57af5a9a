"""YAML presets whose keys are OpenRLHF flag names (dotted, without `--`), turned into command-line tokens.

A preset becomes tokens placed before the user's own flags, so OpenRLHF's real parser checks every type and
choice, and a flag given on the command line overrides the preset (argparse keeps the last value). Key checks
(unknown key, switch given a non-boolean, list for a one-value flag, ...) happen here with the parser's own
options, so the error can name the key and suggest the closest valid flag.
"""

import argparse
import difflib
from pathlib import Path

import yaml

# Keys the launcher itself reads; every other key must be a flag of the parser.
LAUNCHER_KEYS = ("backend",)


class PresetError(SystemExit):
    """A bad preset: exits with a message naming the file and the key."""


def load_preset(path: str | Path) -> dict:
    """Read a preset file: a YAML mapping from flag names to values."""
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"preset {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise PresetError(f"preset {path}: invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise PresetError(
            f"preset {path}: the top level must be a mapping of OpenRLHF flag names to values, "
            f"got {type(data).__name__}"
        )
    for key in data:
        if not isinstance(key, str):
            raise PresetError(f"preset {path}: key {key!r} is not a string flag name")
    return data


def flag_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option of the parser, without the leading dashes (the keys a preset may use)."""
    return [option[2:] for option in parser._option_string_actions if option.startswith("--")]


def _unknown_key(source, key: str, parser: argparse.ArgumentParser) -> PresetError:
    close = difflib.get_close_matches(key, flag_names(parser), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; keys are OpenRLHF flag names without '--'"
    return PresetError(f"preset {source}: unknown key {key!r}{hint}")


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0  # store_true / store_false / store_const: the flag alone sets the value


def key_to_tokens(source, key: str, value, parser: argparse.ArgumentParser) -> list[str]:
    """Command-line tokens for one preset entry; raises PresetError naming the key on a value of the wrong shape."""
    action = parser._option_string_actions.get("--" + key)
    if action is None or action.dest == "help":
        raise _unknown_key(source, key, parser)
    option = "--" + key
    if value is None:
        raise PresetError(f"preset {source}: key {key!r} is null; remove the key to keep OpenRLHF's default")
    if _is_switch(action):
        if not isinstance(value, bool):
            raise PresetError(f"preset {source}: key {key!r} is a switch and takes true or false, got {value!r}")
        if value:
            return [option]
        if action.const is True and action.default is True:  # a switch that is on by default cannot be unset by it
            raise PresetError(f"preset {source}: key {key!r} is on by default; {_turn_off_hint(action, parser)}")
        return []
    if isinstance(value, dict):
        raise PresetError(f"preset {source}: key {key!r} takes a value, got a mapping {value!r}")
    if isinstance(value, list):
        if action.nargs in (None, "?"):
            raise PresetError(f"preset {source}: key {key!r} takes one value, got a list {value!r}")
        return [option, *(_scalar_token(source, key, item) for item in value)]
    if isinstance(action.nargs, int) and action.nargs > 1:
        raise PresetError(f"preset {source}: key {key!r} takes a list of {action.nargs} values, got {value!r}")
    return [option, _scalar_token(source, key, value)]


def _turn_off_hint(switch: argparse.Action, parser: argparse.ArgumentParser) -> str:
    """How to turn off a switch that is on by default: its opposite flag (`--x.no_y`, same dest), as a preset key."""
    for action in parser._actions:
        if action is not switch and action.dest == switch.dest and _is_switch(action) and action.const is False:
            return f"turn it off with '{action.option_strings[0][2:]}: true'"
    return "a preset cannot turn it off"


def _scalar_token(source, key: str, value) -> str:
    if isinstance(value, bool):  # "True" would pass a str-typed flag silently; a flag that is not a switch wants data
        raise PresetError(f"preset {source}: key {key!r} is not a switch and takes a value, got {value!r}")
    if isinstance(value, list | dict):
        raise PresetError(f"preset {source}: key {key!r} has a nested {type(value).__name__} {value!r}")
    return str(value)


def preset_to_tokens(source, preset: dict, parser: argparse.ArgumentParser) -> list[str]:
    """All preset entries except the launcher's own keys, as command-line tokens in file order."""
    tokens = []
    for key, value in preset.items():
        if key not in LAUNCHER_KEYS:
            tokens += key_to_tokens(source, key, value, parser)
    return tokens
