"""The Router's earlier import path, kept so that code written against it runs: the Router lives in
``export.route.router`` (the route stage's room). Prefer ``from export.route.router import Router``."""

from export.route.router import (
    POLICY_FILE,
    POLICY_JSON_SCHEMA,
    POLICY_SCHEMA,
    Decision,
    PolicyError,
    Router,
    check_schema,
    confidence,
    upgrade_v1,
)

__all__ = ["POLICY_FILE", "POLICY_JSON_SCHEMA", "POLICY_SCHEMA", "Decision", "PolicyError", "Router", "check_schema",
           "confidence", "upgrade_v1"]
