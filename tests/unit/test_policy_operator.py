"""The policy's share of issue 22: which users a role's steps may run as, and which raw webhook URLs
it may give; strict like the rest of the policy."""

from __future__ import annotations

import pytest

from zerorun.policy import ADMIN, PolicyError, parse_policy, warnings

BASE = "roles:\n  ops:\n    allow: [run]\n    documents: ['*']\n    targets: ['*']\n"


def test_a_role_without_run_as_runs_as_root_only_and_a_list_is_exact():
    plain = parse_policy(BASE).roles["ops"]
    assert plain.may_run_as("") and plain.may_run_as("root") and not plain.may_run_as("deploy")
    listed = parse_policy(BASE + "    run_as: [deploy, 'app-*']\n").roles["ops"]
    assert listed.may_run_as("deploy") and listed.may_run_as("app-web")
    assert not listed.may_run_as("") and not listed.may_run_as("root")  # add root to keep it
    assert ADMIN.may_run_as("anyone") and ADMIN.may_notify_url("http://anywhere/")


def test_run_as_and_webhook_urls_are_checked_strictly():
    with pytest.raises(PolicyError, match="roles.ops.run_as: Expected `array"):
        parse_policy(BASE + "    run_as: deploy\n")
    with pytest.raises(PolicyError, match="must start with http:// or https://"):
        parse_policy(BASE + "    webhook_urls: ['hooks.example.com/*']\n")
    role = parse_policy(BASE + "    webhook_urls: ['https://hooks.example.com/*']\n").roles["ops"]
    assert role.may_notify_url("https://hooks.example.com/a") and not role.may_notify_url("https://evil.example/")
    assert not parse_policy(BASE).roles["ops"].may_notify_url("https://hooks.example.com/a")


def test_policy_check_warns_about_what_run_as_and_webhook_urls_grant():
    found = warnings(parse_policy(BASE + "    run_as: []\n    webhook_urls: ['https://h.example.com/*']\n"))
    assert any("may run as no user" in w for w in found)
    assert any("may point the broker's webhooks at URLs matching https://h.example.com/*" in w for w in found)
    assert any("any user" in w for w in warnings(parse_policy(BASE + "    run_as: ['*']\n")))


@pytest.mark.parametrize("text, says", [
    ("roles: [\n", "policy: not valid YAML: line 2, column 1: expected the node content, but found '<stream end>'"),
    ("roles:\n  a: {allow: [read]\n", "policy: not valid YAML: line 3, column 1: expected ',' or '}', but got"
                                      " '<stream end>'"),
])
def test_a_policy_that_is_not_yaml_says_where_and_what_in_one_line(text, says):
    """`zerorun policy check` (and ping's "policy NOT reloaded" line) gave PyYAML's five lines
    joined: 'while parsing ... in "<unicode string>", line 2, column 1:          ^'."""
    with pytest.raises(PolicyError) as exc:
        parse_policy(text)
    assert str(exc.value) == says
