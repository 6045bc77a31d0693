"""schemathesis against live servers, in both ``OMNI_AUTH`` modes: requests
generated from ``/api/openapi.json`` (valid and invalid ones; the examples,
coverage and fuzzing phases), every check (``[checks] enabled = true``):
no 500, no schema-valid request rejected, every answer as documented (every
error the contract's JSON). A bounded number of examples per operation."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.e2e import issue_token, make_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.engine_agnostic]

EXAMPLES = 6  # examples per operation (bounded by the time `make test` may take)
HYPOTHESIS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck),
)


def live(tmp_path_factory, **env):
    server, pg = make_server(tmp_path_factory, extra_env=env)
    return server, pg


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    made = {}
    try:
        made["off"] = make_server(tmp_path_factory, extra_env={"OMNI_AUTH": "off"})
        made["required"] = make_server(tmp_path_factory, extra_env={"OMNI_AUTH": "required"})
        yield {mode: server for mode, (server, _) in made.items()}
    finally:
        for server, pg in made.values():
            stop_server(server, pg)


# Every check schemathesis has (`--checks all`; `enabled = true` also turns on
# any check a later version adds), with the statuses the contract gives for
# reasons a schema cannot state: 413 for a message over 100,000 characters (the
# document says so, with 413 among its responses), 409 for a thread that
# exists or is busy and 429 for a resource over its turn rate (state, not
# validity); a list's cursor is opaque (the document gives its alphabet, but
# only a nextCursor is valid: anything else is 400).
CONFIG = """
[checks]
enabled = true

[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
[checks.positive_data_acceptance]
expected-statuses = ["2xx", 401, 403, 404, 409, 429]

[[operations]]
include-name = "GET /api/sessions"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403]

# A range of dates that is valid on its own can still be refused: from after
# to, or over 366 days (400).
[[operations]]
include-name = "GET /api/usage"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403]

# Schemathesis's coverage phase does not hold a header to its documented
# pattern (schemathesis 4.32: it sends "Last-Event-ID: 0" as valid although
# the document gives ^[A-Za-z0-9]{1,64}:[0-9]{1,9}$, minLength 3 and an
# example): a Last-Event-ID that is not "<turnId>:<seq>" is a 400.
[[operations]]
include-name = "GET /api/chat/stream"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403, 404]

# An upload's type and validity are its content's (contract §11), which a
# schema cannot state: bytes that are not an accepted type are 415, ones that
# do not parse as their type 400 invalid_attachment.
[[operations]]
include-name = "POST /api/attachments"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403, 415]
"""


def load(server):
    return schemathesis.openapi.from_url(
        f"http://127.0.0.1:{server.port}/api/openapi.json",
        config=schemathesis.config.SchemathesisConfig.from_str(CONFIG),
    )


@pytest.fixture(scope="module")
def schema_auth_off(servers):
    return load(servers["off"])


@pytest.fixture(scope="module")
def token(servers):
    return issue_token(servers["required"], "fuzzer")


@pytest.fixture(scope="module")
def schema_auth_required(servers):
    return load(servers["required"])


auth_off = schemathesis.pytest.from_fixture("schema_auth_off")
auth_required = schemathesis.pytest.from_fixture("schema_auth_required")


@auth_off.parametrize()
@HYPOTHESIS
def test_api_with_auth_off(case):
    case.call_and_validate(timeout=60)


@auth_required.parametrize()
@HYPOTHESIS
def test_api_with_auth_required(case, token):
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, timeout=60)
