# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Action plugin of zerorun.fleet.document (documented in plugins/modules/document.py).

Idempotence rule: ``changed`` only when the broker's state changes. The content's SHA-256 (of its
UTF-8 bytes, as the broker computes it) is compared with every stored version:

- no document: create it (version 1, the default) -> changed;
- a version with this content is the default -> unchanged;
- a non-default version has it -> unchanged, or with set_default that version becomes the
  default -> changed;
- no version has it -> a new version (the default with set_default) -> changed.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ansible.errors import AnsibleError

from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker
from ansible_collections.zerorun.fleet.plugins.plugin_utils.action import ZerorunAction

try:
    from zerorun import client as zclient
    from zerorun.documents import DocumentError, load_document
    from zerorun.documents.model import is_reserved_document_name, validate_document_name
except ImportError:  # reported by broker.require_zerorun() when the plugin runs
    pass


def content_sha256(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def plan_present(versions: list[dict[str, Any]], sha256: str, set_default: bool) -> tuple[str, dict | None]:
    """What to do for state=present, from the stored versions (plain dicts, ``[]`` = no document).

    Returns (action, matching version) with action one of ``create``, ``update``,
    ``set_default``, ``none``.
    """
    if not versions:
        return "create", None
    same = next((v for v in versions if v.get("sha256") == sha256), None)
    if same is None:
        return "update", None
    if same.get("is_default") or not set_default:
        return "none", same
    return "set_default", same


def version_rows(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("version", "sha256", "is_default", "created_at", "created_by", "description")
    return [{k: v.get(k) for k in keys} for v in versions]


def _not_found(exc: Exception) -> bool:
    return isinstance(exc, zclient.RequestFailed) and exc.code == "NotFound"


class ActionModule(ZerorunAction):
    MODULE_NAME = "document"
    MUTUALLY_EXCLUSIVE = [["content", "src"]]

    def run_zerorun(self, args: dict, task_vars: dict) -> dict[str, Any]:
        broker.require_zerorun()
        name = args["name"]
        if is_reserved_document_name(name):
            raise AnsibleError("document %s is built in (or uses a reserved name or prefix) and is read-only" % name)
        try:
            validate_document_name(name)
        except DocumentError as exc:
            raise AnsibleError(str(exc)) from None
        with broker.connect(args) as client:
            versions = self._versions(client, name)
            if args["state"] == "absent":
                return self._absent(client, args, versions)
            return self._present(client, args, versions)

    @staticmethod
    def _versions(client: Any, name: str) -> list[dict[str, Any]]:
        try:
            return broker.plain(client.document_versions(name))
        except zclient.RequestFailed as exc:
            if _not_found(exc):
                return []
            raise

    @staticmethod
    def _content_of(client: Any, name: str, version: Any) -> str:
        return client.get_document(name, str(version)).content

    def _diff(self, before: str, after: str, before_header: str, after_header: str) -> dict[str, Any]:
        return {"before": before, "after": after, "before_header": before_header, "after_header": after_header}

    # -- state=present --------------------------------------------------------------------------

    def _present(self, client: Any, args: dict, versions: list[dict[str, Any]]) -> dict[str, Any]:
        name = args["name"]
        if args.get("version"):
            raise AnsibleError("version is only used with state=absent (it deletes one version)")
        source = ""
        if args.get("src"):
            content, source = self.read_document_file("src", args["src"])
        elif args.get("content") is not None:
            content = args["content"]
        else:
            raise AnsibleError("state=present needs content or src")
        sha256 = content_sha256(content)
        try:
            load_document(content, name=name)  # the broker's own validation, before any write
        except DocumentError as exc:
            raise AnsibleError("document %s%s is not valid: %s"
                               % (name, " from " + source if source else "", exc)) from None

        action, same = plan_present(versions, sha256, args["set_default"])
        default = next((v for v in versions if v.get("is_default")), None)
        result: dict[str, Any] = {"name": name, "sha256": sha256, "created": action in ("create", "update"),
                                  "changed": action != "none"}
        if self._task.diff and action in ("create", "update"):
            before = self._content_of(client, name, default["version"]) if default else ""
            result["diff"] = self._diff(
                before, content,
                "%s version %s (default)" % (name, default["version"]) if default else "%s (absent)" % name,
                "%s (new version)" % name)
        elif self._task.diff and action == "set_default" and default is not None:
            result["diff"] = self._diff(
                "default version %s\n" % default["version"], "default version %s\n" % same["version"],
                name, name)

        if self._task.check_mode:
            result["version"] = same["version"] if same else None
            result["msg"] = {
                "create": "check mode: document %s would be created" % name,
                "update": "check mode: a new version of document %s would be made%s" % (
                    name, " and set as default" if args["set_default"] else ""),
                "set_default": "check mode: version %s of document %s would become the default" % (
                    same and same["version"], name),
                "none": "document %s already has this content (version %s)" % (name, same and same["version"]),
            }[action]
            if versions:
                result.update(default_version=default and default["version"],
                              latest_version=max(v["version"] for v in versions))
            return result

        if action == "create":
            info = client.create_document(name, content)
            msg = "document %s created (version %d)" % (name, info.version)
        elif action == "update":
            try:
                info = client.update_document(name, content, set_default=args["set_default"])
            except zclient.RequestFailed as exc:
                if exc.code != "Conflict":
                    raise
                # someone stored this content in between: nothing to do after all
                return self._present(client, args, self._versions(client, name))
            msg = "document %s version %d created%s" % (
                name, info.version, " and set as default" if args["set_default"] else "")
        elif action == "set_default":
            info = client.set_default_document_version(name, same["version"])
            msg = "document %s: version %d is now the default" % (name, info.version)
        else:
            info = None
            msg = "document %s already has this content (version %s)" % (name, same["version"])
        after = self._versions(client, name)
        result.update(version=info.version if info is not None else same["version"], msg=msg,
                      versions=version_rows(after))
        result.update(self._heads(after))
        return result

    @staticmethod
    def _heads(versions: list[dict[str, Any]]) -> dict[str, Any]:
        if not versions:
            return {}
        default = next((v["version"] for v in versions if v.get("is_default")), None)
        return {"default_version": default, "latest_version": max(v["version"] for v in versions)}

    # -- state=absent ---------------------------------------------------------------------------

    def _absent(self, client: Any, args: dict, versions: list[dict[str, Any]]) -> dict[str, Any]:
        name = args["name"]
        selector = (args.get("version") or "").strip()
        result: dict[str, Any] = {"name": name, "changed": False}
        if not versions:
            result["msg"] = "document %s does not exist" % name
            return result
        if selector:
            number = self._resolve(versions, selector)
            if number is None:
                result["msg"] = "document %s has no version %s" % (name, selector)
                result.update(self._heads(versions), versions=version_rows(versions))
                return result
            target = next(v for v in versions if v["version"] == number)
            if target.get("is_default"):
                raise AnsibleError("version %d of document %s is the default version: set another default "
                                   "first, or delete the whole document (no version)" % (number, name))
            result["version"] = number
            if self._task.diff:
                result["diff"] = self._diff(self._content_of(client, name, number), "",
                                            "%s version %d" % (name, number), "%s version %d (deleted)" % (name, number))
            result["changed"] = True
            if self._task.check_mode:
                result["msg"] = "check mode: version %d of document %s would be deleted" % (number, name)
                return result
            client.delete_document(name, number)
            after = self._versions(client, name)
            result.update(self._heads(after), versions=version_rows(after),
                          msg="version %d of document %s deleted" % (number, name))
            return result

        if self._task.diff:
            default = next((v for v in versions if v.get("is_default")), versions[-1])
            result["diff"] = self._diff(self._content_of(client, name, default["version"]), "",
                                        "%s version %s (default)" % (name, default["version"]), "%s (deleted)" % name)
        result["changed"] = True
        if self._task.check_mode:
            result["msg"] = "check mode: document %s (%d version(s)) would be deleted" % (name, len(versions))
            return result
        try:
            client.delete_document(name)
        except zclient.RequestFailed as exc:
            if not _not_found(exc):
                raise
            result["changed"] = False
        result["msg"] = "document %s deleted" % name
        return result

    @staticmethod
    def _resolve(versions: list[dict[str, Any]], selector: str) -> int | None:
        numbers = [v["version"] for v in versions]
        if selector == "$LATEST":
            return max(numbers)
        if selector == "$DEFAULT":
            return next((v["version"] for v in versions if v.get("is_default")), None)
        if selector.isascii() and selector.isdigit() and int(selector) in numbers:  # "²" isdigit(), not int()
            return int(selector)
        return None
