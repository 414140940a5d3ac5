"""Env states and the only legal transitions between them. Every state change goes through here.

    creating ──> pooled ──> assigned <──> installing
        │          │           │              │
        └──────────┴─> broken <┘<─────────────┘
    assigned ──> retired ──> deleting
    any state ──> deleting (then the row is removed)

``creating``: a uv run is building the venv; never handed out. After a crash these are deleted.
``pooled``: ready, owned by nobody. ``assigned``: belongs to (uid, key). ``installing``: a package
install into it is under way. ``broken``: unusable; ``error`` says why. ``retired``: its notebook
moved to a new env on another interpreter (envswitch.py); it has no key, and is removed once no
kernel runs in it.
"""

CREATING = "creating"
POOLED = "pooled"
ASSIGNED = "assigned"
INSTALLING = "installing"
BROKEN = "broken"
DELETING = "deleting"
RETIRED = "retired"

ALL_STATES = (CREATING, POOLED, ASSIGNED, INSTALLING, BROKEN, DELETING, RETIRED)
# A notebook's env, built and not being deleted: what follows its notebook across a rename.
SETTLED_NOTEBOOK_STATES = (ASSIGNED, INSTALLING, BROKEN)

TRANSITIONS = {
    CREATING: frozenset({POOLED, ASSIGNED, BROKEN, DELETING}),
    POOLED: frozenset({ASSIGNED, BROKEN, DELETING}),
    ASSIGNED: frozenset({INSTALLING, BROKEN, DELETING, RETIRED}),
    INSTALLING: frozenset({ASSIGNED, BROKEN, DELETING}),
    BROKEN: frozenset({DELETING}),
    DELETING: frozenset(),
    RETIRED: frozenset({DELETING}),
}


class IllegalTransition(Exception):
    """A bug: some code tried a state change the table does not allow."""


def check_transition(old: str, new: str) -> None:
    if new not in TRANSITIONS.get(old, ()):
        raise IllegalTransition("env state cannot go from %r to %r" % (old, new))
