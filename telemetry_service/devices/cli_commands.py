"""The swamp CLI's command tree, as data: which words are command names we may count publicly.

The CLI reports the first two non-option words of the command line as ``command`` and
``subcommand``; for a command that takes a value there (``swamp init my-repo``) the "subcommand"
is whatever the user typed. So a word counts by name only when it is in this tree; anything else
is a user's value or a command of a newer CLI (``../shared/cli-events.md``).

To extend it for a newer CLI: add the subcommand to its command's line, or a new line
``command: sub sub ...`` (a command with no subcommands is its name alone). Words are lowercase
letters, digits and hyphens; a test checks the tree parses and holds what the CLI's docs list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

#: The tree at CLI commit 06b61472 (top-level command: its direct subcommands).
CLI_COMMAND_TREE = """
access: token grant group can-i check reload
agent: setup list rm
audit
auth: login logout whoami server-login token
completions
config: get set list
data: get list search query versions gc prune rename delete
datastore: type status setup sync lock compact migrate-index catalog namespace
doctor: audit datastores extensions install secrets vaults workflows
extension: push info fmt quality pull install rm list search update outdated version yank unyank deprecate undeprecate trust source promote
help
init
issue: search get edit bug feature security ripple
model: cancel create delete edit evaluate get search validate method output type list
quest
repo: init upgrade
report: type search get describe list
run: history doctor gc
serve: reload daemon
source: fetch path clean
summarise
telemetry: stats
update
vault: type create search get describe edit put delete annotate inspect migrate read-secret list-keys audit-trail list
version
worker: token list queue connect verify daemon exec-dispatch
workflow: create delete edit evaluate get history validate search run approve cancel reject resume approvals schema trigger list
"""  # noqa: E501  (one line per command, as the CLI's docs print it)

#: Where an unknown command is counted (a single key, so invented names cannot add up).
OTHER = "other"
#: An invocation with no command word at all (the CLI may send ``""``).
NO_COMMAND = "(none)"

_WORD = re.compile(r"[a-z0-9][a-z0-9-]*")


def parse_tree(text: str) -> dict[str, frozenset[str]]:
    """``command: sub sub`` lines (blank lines ignored) into {command: subcommands}."""
    tree: dict[str, frozenset[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        command, _, rest = line.partition(":")
        command, subcommands = command.strip(), rest.split()
        for word in (command, *subcommands):
            if not _WORD.fullmatch(word):
                raise ValueError(f"line {number}: {word!r} is not a command word")
        if command in tree or command == OTHER:
            raise ValueError(f"line {number}: {command!r} is listed twice or reserved")
        tree[command] = frozenset(subcommands)
    return tree


COMMANDS: Mapping[str, frozenset[str]] = parse_tree(CLI_COMMAND_TREE)

Unknown = Literal["command", "subcommand"] | None


def classify(
    command: str, subcommand: str | None, tree: Mapping[str, frozenset[str]] = COMMANDS
) -> tuple[str, Unknown]:
    """The key an invocation counts under, and which of its words was unknown (if any).

    ``command subcommand`` when both are in the tree; the command alone when it has no
    subcommand, or the subcommand is not in the tree (a value the user typed, or a subcommand of
    a newer CLI); ``other`` when the command itself is not in the tree. Only a word in a place
    where the tree lists subcommands is reported as an unknown subcommand: the second word of a
    command that has none (``init my-repo``) is always the user's value.
    """
    if not command:
        return NO_COMMAND, None
    subcommands = tree.get(command)
    if subcommands is None:
        return OTHER, "command"
    if not subcommand:
        return command, None
    if subcommand in subcommands:
        return f"{command} {subcommand}", None
    return command, "subcommand" if subcommands else None
