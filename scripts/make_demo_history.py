"""Write the sample history that `secledger demo` replays (src/secledger/demo/*.json).

Run from the repository root: python scripts/make_demo_history.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builders import label_change, mr_event

OUT = Path(__file__).resolve().parents[1] / "src" / "secledger" / "demo"

HISTORY = [
    # !11: opened already labelled, approved by the security reviewer, merged by its author.
    mr_event(
        "open",
        iid=11,
        labels=["sec::high", "backend"],
        actor="alice",
        author="alice",
        created_at="2026-11-02 09:00:00 UTC",
        updated_at="2026-11-02 09:00:00 UTC",
        reviewers=["bob"],
        title="Rotate session signing keys",
    ),
    mr_event(
        "approved",
        iid=11,
        labels=["sec::high", "backend"],
        actor="bob",
        created_at="2026-11-02 09:00:00 UTC",
        updated_at="2026-11-02 13:30:00 UTC",
        reviewers=["bob"],
        title="Rotate session signing keys",
    ),
    mr_event(
        "merge",
        iid=11,
        labels=["sec::high", "backend"],
        actor="alice",
        created_at="2026-11-02 09:00:00 UTC",
        updated_at="2026-11-02 14:05:10 UTC",
        reviewers=["bob"],
        title="Rotate session signing keys",
    ),
    # !12: labelled later by an update; an approval is revoked, another one follows.
    mr_event(
        "open",
        iid=12,
        labels=["frontend"],
        actor="dave",
        author="dave",
        created_at="2026-11-03T08:00:00Z",
        updated_at="2026-11-03T08:00:00Z",
        title="Escape user names in the audit view",
    ),
    mr_event(
        "update",
        iid=12,
        labels=["frontend", "sec/critical"],
        actor="erin",
        author="dave",
        created_at="2026-11-03T08:00:00Z",
        updated_at="2026-11-03T08:20:00Z",
        changes=label_change(["frontend"], ["frontend", "sec/critical"], "2026-11-03 08:20:00 UTC"),
        reviewers=["carol"],
        title="Escape user names in the audit view",
    ),
    mr_event(
        "approved",
        iid=12,
        labels=["frontend", "sec/critical"],
        actor="carol",
        author="dave",
        created_at="2026-11-03T08:00:00Z",
        updated_at="2026-11-03 02:10:00 -0700",
        reviewers=["carol"],
        title="Escape user names in the audit view",
    ),
    mr_event(
        "unapproved",
        iid=12,
        labels=["frontend", "sec/critical"],
        actor="carol",
        author="dave",
        created_at="2026-11-03T08:00:00Z",
        updated_at="2026-11-03 09:40:00 UTC",
        reviewers=["carol"],
        title="Escape user names in the audit view",
    ),
    mr_event(
        "approved",
        iid=12,
        labels=["frontend", "sec/critical"],
        actor="bob",
        author="dave",
        created_at="2026-11-03T08:00:00Z",
        updated_at="2026-11-03T11:02:13.512Z",
        reviewers=["carol", "bob"],
        title="Escape user names in the audit view",
    ),
    mr_event(
        "merge",
        iid=12,
        labels=["frontend", "sec/critical"],
        actor="dave",
        author="dave",
        created_at="2026-11-03T08:00:00Z",
        updated_at="2026-11-03 11:15:00 UTC",
        reviewers=["carol", "bob"],
        title="Escape user names in the audit view",
    ),
    # !13: closed without merge.
    mr_event(
        "open",
        iid=13,
        labels=["sec::medium"],
        actor="erin",
        author="erin",
        created_at="2026-11-05 10:00:00 UTC",
        updated_at="2026-11-05 10:00:00 UTC",
        title="Allow wildcard CORS origins",
    ),
    mr_event(
        "close",
        iid=13,
        labels=["sec::medium"],
        actor="bob",
        author="erin",
        created_at="2026-11-05 10:00:00 UTC",
        updated_at="2026-11-06 16:00:00 UTC",
        title="Allow wildcard CORS origins",
    ),
    # !14: self-approved and merged by its author.
    mr_event(
        "open",
        iid=14,
        labels=["sec/low"],
        actor="alice",
        author="alice",
        created_at="2026-11-09 07:00:00 UTC",
        updated_at="2026-11-09 07:00:00 UTC",
        title="Bump TLS library",
    ),
    mr_event(
        "approved",
        iid=14,
        labels=["sec/low"],
        actor="alice",
        author="alice",
        created_at="2026-11-09 07:00:00 UTC",
        updated_at="2026-11-09 07:05:00 UTC",
        title="Bump TLS library",
    ),
    mr_event(
        "merge",
        iid=14,
        labels=["sec/low"],
        actor="alice",
        author="alice",
        created_at="2026-11-09 07:00:00 UTC",
        updated_at="2026-11-09 07:06:00 UTC",
        title="Bump TLS library",
    ),
    # !15: not a security merge request: ignored.
    mr_event(
        "open",
        iid=15,
        labels=["docs"],
        actor="carol",
        author="carol",
        created_at="2026-11-10 12:00:00 UTC",
        updated_at="2026-11-10 12:00:00 UTC",
        title="Fix typo in README",
    ),
    # !16: tier raised from high to critical by a scoped-label change; still open.
    mr_event(
        "open",
        iid=16,
        labels=["sec::high"],
        actor="dave",
        author="dave",
        created_at="2026-11-20 09:00:00 UTC",
        updated_at="2026-11-20 09:00:00 UTC",
        reviewers=["bob"],
        title="Add SAML single sign-on",
    ),
    mr_event(
        "update",
        iid=16,
        labels=["sec::critical"],
        actor="erin",
        author="dave",
        created_at="2026-11-20 09:00:00 UTC",
        updated_at="2026-11-20 10:00:00 UTC",
        changes=label_change(["sec::high"], ["sec::critical"], "2026-11-20 10:00:00 UTC"),
        reviewers=["bob"],
        title="Add SAML single sign-on",
    ),
]


def main() -> None:
    """Write one file per delivery, numbered in delivery order."""
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    for number, body in enumerate(HISTORY, start=1):
        attrs = body["object_attributes"]
        name = f"{number:02d}-mr{attrs['iid']}-{attrs['action']}.json"
        (OUT / name).write_text(json.dumps(body, indent=2) + "\n")
    print(f"wrote {len(HISTORY)} deliveries to {OUT}")


if __name__ == "__main__":
    main()
