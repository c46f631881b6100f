# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Argument specs of the action plugins, derived from their module stubs' DOCUMENTATION.

The modules of this collection are documentation-only stubs; the work happens in action
plugins on the controller. Nothing in Ansible checks that a stub's docs and its action's
argument spec agree, so the spec is built from the docs: one source, no drift.
"""

from __future__ import annotations

import functools
import importlib

import yaml

from ansible.module_utils.basic import env_fallback

COLLECTION_PACKAGE = "ansible_collections.zerorun.fleet.plugins"
COLLECTION_PREFIX = "zerorun.fleet."

_SPEC_KEYS = ("type", "required", "default", "choices", "elements", "aliases")


def fragment_options(fragment_name: str) -> dict:
    """Options of one of this collection's doc fragments ('zerorun.fleet.broker[.variant]')."""
    if not fragment_name.startswith(COLLECTION_PREFIX):
        return {}  # e.g. ansible.builtin.action_common_attributes: no options
    name, _sep, variant = fragment_name[len(COLLECTION_PREFIX):].partition(".")
    module = importlib.import_module("%s.doc_fragments.%s" % (COLLECTION_PACKAGE, name))
    text = getattr(module.ModuleDocFragment, (variant or "documentation").upper())
    return yaml.safe_load(text).get("options") or {}


@functools.lru_cache(maxsize=None)
def module_options(module_name: str) -> dict:
    """The stub's options merged with its fragments' options, as ansible-doc shows them."""
    stub = importlib.import_module("%s.modules.%s" % (COLLECTION_PACKAGE, module_name))
    doc = yaml.safe_load(stub.DOCUMENTATION)
    options: dict = {}
    fragments = doc.get("extends_documentation_fragment") or []
    if isinstance(fragments, str):
        fragments = [fragments]
    for fragment in fragments:
        options.update(fragment_options(fragment))
    options.update(doc.get("options") or {})
    return options


def options_to_argspec(options: dict, env_vars: dict | None = None) -> dict:
    """Ansible option docs -> an ArgumentSpecValidator spec (env vars become fallbacks)."""
    spec = {}
    for name, doc in options.items():
        entry = {key: doc[key] for key in _SPEC_KEYS if key in doc}
        entry.setdefault("type", "str")
        if doc.get("suboptions"):
            entry["options"] = options_to_argspec(doc["suboptions"])
        if env_vars and name in env_vars:
            entry["fallback"] = (env_fallback, [env_vars[name]])
        spec[name] = entry
    return spec


@functools.lru_cache(maxsize=None)
def _cached_spec(module_name: str) -> dict:
    from ansible_collections.zerorun.fleet.plugins.doc_fragments.broker import ENV_VARS

    return options_to_argspec(module_options(module_name), ENV_VARS)


def module_argument_spec(module_name: str) -> dict:
    """A fresh copy (callers may not mutate the cached one) of the stub's argument spec."""
    return {name: dict(entry) for name, entry in _cached_spec(module_name).items()}


def keep_strings_whole(args: dict, *names: str) -> dict:
    """A single string stays one list item. Ansible's list type splits strings at commas, but a
    target such as ``tag:role=web,db`` uses commas for its values."""
    for name in names:
        if isinstance(args.get(name), str):
            args[name] = [args[name]]
    return args
