"""Shell completion for ``zerorun``: a bash script (zsh loads it through ``bashcompinit``)
generated from the CLI's own argument parser, so commands and flags never drift from the code.

Instance ids, document names and recent command ids come from the broker, through the hidden
``zerorun __complete KIND`` (two-second timeout, silent on any error), only where a word needs one.
"""

from __future__ import annotations

import argparse
import shlex

# What a value is, by the argparse destination it fills; anything else completes nothing.
DYNAMIC_BY_DEST = {
    "instance_id": "instances",
    "instance": "instances",
    "target": "targets",
    "document_file": "file",
    "file": "file",
    "config": "file",
    "out": "dir",
    "command_id": "commands",
    "args": "instances",  # keys accept|reject|delete NAME
}
DOCUMENT_NAME_PATHS = tuple("zerorun " + p for p in (
    "send", "documents show", "documents versions", "documents update", "documents set-default",
    "documents delete"))


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _tables(parser: argparse.ArgumentParser, path: str, tables: dict[str, dict[str, str]]) -> None:
    options, valued, positionals = [], [], []
    for action in parser._actions:
        if action.option_strings:
            options.extend(action.option_strings)
            if action.nargs != 0:
                valued.extend(action.option_strings)
                kind = "choices:" + " ".join(map(str, action.choices)) if action.choices else \
                    DYNAMIC_BY_DEST.get(action.dest, "")
                for opt in action.option_strings:
                    if kind:
                        tables["dyn"][f"{path} {opt}"] = kind
        elif not isinstance(action, argparse._SubParsersAction):
            positionals.append(action)
    tables["opts"][path] = " ".join(options)
    tables["valopts"][path] = " ".join(valued)
    sub = _subparsers(parser)
    if sub is not None:
        names = [name for name in sub.choices if not name.startswith("__")]
        tables["subs"][path] = " ".join(names)
        for name in names:
            _tables(sub.choices[name], f"{path} {name}", tables)
        return
    if not positionals:
        return
    first = positionals[0]
    if first.choices:  # keys ACTION NAME: the action words behave like subcommands
        tables["subs"][path] = " ".join(map(str, first.choices))
        for choice in first.choices:
            child = f"{path} {choice}"
            tables["opts"][child], tables["valopts"][child] = tables["opts"][path], tables["valopts"][path]
            for key in [k for k in tables["dyn"] if k.startswith(path + " -")]:
                tables["dyn"][child + key[len(path):]] = tables["dyn"][key]
            if len(positionals) > 1 and choice not in ("list", "add"):
                tables["dyn"][child] = DYNAMIC_BY_DEST.get(positionals[1].dest, "")
        return
    kind = "documents" if path in DOCUMENT_NAME_PATHS else DYNAMIC_BY_DEST.get(first.dest, "")
    if kind:
        tables["dyn"][path] = kind


def _assoc(name: str, table: dict[str, str]) -> str:
    items = " ".join(f"[{shlex.quote(k)}]={shlex.quote(v)}" for k, v in sorted(table.items()))
    return f"{name}=({items})"


BASH_BODY = r'''
_zerorun_values() {  # $1: instances|documents|commands, asked of the broker the line names
    local i cfg=()
    for ((i = 1; i < ${#COMP_WORDS[@]} - 1; i++)); do
        case "${COMP_WORDS[i]}" in -c|--config) cfg=(-c "${COMP_WORDS[i+1]}") ;; esac
    done
    command zerorun "${cfg[@]}" --request-timeout 2 __complete "$1" 2>/dev/null
}

_zerorun() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local path=zerorun word i skip=0 kind=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${COMP_WORDS[i]}"
        if ((skip)); then skip=0; continue; fi
        if [[ "$word" == -* ]]; then
            [[ " ${_zerorun_valopts[$path]} " == *" $word "* ]] && skip=1
            continue
        fi
        if [[ " ${_zerorun_subs[$path]} " == *" $word "* ]]; then
            path="$path $word"
        fi
    done
    if [[ "$prev" == -* && " ${_zerorun_valopts[$path]} " == *" $prev "* ]]; then
        kind="${_zerorun_dyn["$path $prev"]}"
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "${_zerorun_opts[$path]}" -- "$cur"))
        return 0
    elif [[ -n "${_zerorun_subs[$path]}" ]]; then
        COMPREPLY=($(compgen -W "${_zerorun_subs[$path]}" -- "$cur"))
        return 0
    else
        kind="${_zerorun_dyn[$path]}"
    fi
    case "$kind" in
        instances|documents|commands)
            COMPREPLY=($(compgen -W "$(_zerorun_values "$kind")" -- "$cur")) ;;
        targets)
            if [[ "$cur" == instance:* ]]; then
                COMPREPLY=($(compgen -P instance: -W "$(_zerorun_values instances)" -- "${cur#instance:}"))
            else
                COMPREPLY=($(compgen -W "tag: instance: fact:" -- "$cur"))
                compopt -o nospace 2>/dev/null
            fi ;;
        file) COMPREPLY=($(compgen -f -- "$cur")) ;;
        dir) COMPREPLY=($(compgen -d -- "$cur")) ;;
        choices:*) COMPREPLY=($(compgen -W "${kind#choices:}" -- "$cur")) ;;
        *) COMPREPLY=() ;;
    esac
    return 0
}
complete -F _zerorun zerorun
'''


def bash_script(parser: argparse.ArgumentParser) -> str:
    tables: dict[str, dict[str, str]] = {"subs": {}, "opts": {}, "valopts": {}, "dyn": {}}
    _tables(parser, "zerorun", tables)  # bash refuses an empty key: paths start at the program
    lines = ["# bash completion for zerorun, generated by `zerorun completion bash`",
             "# (load it with: source <(zerorun completion bash))",
             "declare -gA _zerorun_subs _zerorun_opts _zerorun_valopts _zerorun_dyn"]
    for name in ("subs", "opts", "valopts", "dyn"):
        lines.append(_assoc(f"_zerorun_{name}", tables[name]))
    return "\n".join(lines) + "\n" + BASH_BODY


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    body = bash_script(parser)
    if shell == "zsh":
        return ("# zsh completion for zerorun, generated by `zerorun completion zsh`: the bash script\n"
                "# through zsh's bash completion layer (load it with: source <(zerorun completion zsh))\n"
                "autoload -U +X compinit && compinit -u\n"
                "autoload -U +X bashcompinit && bashcompinit\n" + body)
    return body
