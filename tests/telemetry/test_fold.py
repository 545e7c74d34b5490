"""The fold is a pure function: properties that hold for any devices (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from telemetry_service.projection.fold import fold

USERS = ["u1", "u2"]
BASE = datetime(2026, 1, 1, tzinfo=UTC)

buckets = st.builds(
    lambda n, s, days, first, span, cmds: {
        "invocations": n,
        "successCount": min(s, n),
        "failureCount": n - min(s, n),
        "commandCounts": cmds,
        "activeDays": sorted(days),
        "firstSeenAt": BASE + timedelta(hours=first),
        "lastSeenAt": BASE + timedelta(hours=first + span),
    },
    st.integers(0, 50),
    st.integers(0, 50),
    st.sets(st.sampled_from(["2026-01-01", "2026-01-02", "2026-01-03"])),
    st.integers(0, 100),
    st.integers(0, 100),
    st.dictionaries(st.sampled_from(["model", "run", "init"]), st.integers(1, 5), max_size=3),
)
devices = st.lists(
    st.builds(
        lambda i, owner, anon, users: {
            "_id": f"d{i}",
            "ownerUserId": owner,
            "anon": anon,
            "users": users,
        },
        st.integers(0, 10_000),
        st.sampled_from([None, *USERS]),
        buckets,
        st.dictionaries(st.sampled_from(USERS), buckets, max_size=2),
    ),
    max_size=6,
    unique_by=lambda d: d["_id"],
)


def ids(devs: list[dict[str, Any]]) -> list[str]:
    return [d["_id"] for d in devs]


@given(devices, st.randoms())
def test_device_order_never_matters(devs: list[dict[str, Any]], rnd: Any) -> None:
    shuffled = devs[:]
    rnd.shuffle(shuffled)
    assert fold("u1", devs, ids(devs)) == fold("u1", shuffled, ids(shuffled))


@given(devices)
def test_totals_are_sums_of_own_buckets_plus_owned_anonymous_ones(
    devs: list[dict[str, Any]],
) -> None:
    result = fold("u1", devs, ids(devs))
    expected = sum(d["users"].get("u1", {}).get("invocations", 0) for d in devs)
    expected += sum(d["anon"]["invocations"] for d in devs if d["ownerUserId"] == "u1")
    assert result["totalInvocations"] == expected
    assert result["successCount"] + result["failureCount"] == expected
    assert result["activeDays"] == len(result["activeDayList"])


@given(devices, devices)
def test_folding_more_devices_never_lowers_a_count(
    a: list[dict[str, Any]], b: list[dict[str, Any]]
) -> None:
    b = [d | {"_id": f"b{d['_id']}"} for d in b]
    small, big = fold("u1", a, ids(a)), fold("u1", a + b, ids(a + b))
    for name in ("totalInvocations", "successCount", "failureCount", "activeDays"):
        assert big[name] >= small[name]
    if small["firstSeenAt"] is not None:
        assert big["firstSeenAt"] <= small["firstSeenAt"]
        assert big["lastSeenAt"] >= small["lastSeenAt"]


@given(devices)
def test_another_user_s_buckets_never_count(devs: list[dict[str, Any]]) -> None:
    without_u2 = [d | {"users": {k: v for k, v in d["users"].items() if k != "u2"}} for d in devs]
    assert fold("u1", devs, ids(devs)) == fold("u1", without_u2, ids(devs))
