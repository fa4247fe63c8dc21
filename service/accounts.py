"""Creating and deleting a user across the registry, the adapter store and the silos.

The one place both `fedpersona users` and the admin API go through, so a deleted user's name
behaves the same everywhere:

- deleting tombstones the name in the registry (keys gone at once) and quarantines the user's
  store slots (`AdapterStore.quarantine_user`: served, personal and expert move out of
  serving, labelled with the deleted user's immutable id); the answer says what was moved, and
  whether the user's silo (their training data) is still on disk;
- creating a tombstoned name is refused (`NameDeleted`) unless the operator asks to reuse it;
  reuse starts from a clean slate: it is refused while the old silo exists, and whatever the
  store holds for the name (e.g. published by a round after the delete) is quarantined first.

The gateway's own store is read-only; the quarantine opens a writable store on the same root
for the one operation. If that is impossible (a read-only volume) the delete still holds (the
name stays refused) and the answer says the slots were not moved; a reuse is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedpersona.adapters import AdapterError, AdapterStore
from fedpersona.service.errors import Conflict
from fedpersona.service.registry import Registry, Tombstone, User, check_user_name

logger = logging.getLogger(__name__)


class NameNotClean(Conflict):
    """A deleted user's name cannot start over: something of theirs is still there."""

    code = "user_name_not_clean"
    default_message = "The deleted user's data is still present."


@dataclass(frozen=True)
class Deletion:
    """What deleting a user did; `message` is the one sentence the CLI and the API answer."""

    tombstone: Tombstone
    quarantined: tuple[str, ...] = ()  # slot paths that had a current version
    quarantine: Path | None = None  # where they went, below the store root
    store_problem: str | None = None  # why the slots could not be moved
    silo: Path | None = None  # the user's silo, if still on disk

    @property
    def message(self) -> str:
        name = self.tombstone.name
        parts = [f"deleted user {name} ({self.tombstone.user_id}) and their keys"]
        if self.store_problem is not None:
            parts.append(
                f"their store slots were NOT quarantined ({self.store_problem}); they are never "
                "served, since the name stays refused"
            )
        elif self.quarantined:
            parts.append(
                f"quarantined {', '.join(self.quarantined)} into {self.quarantine} "
                "(never served again)"
            )
        else:
            parts.append("they had nothing in the store")
        if self.silo is not None:
            parts.append(
                f"their training data is still in {self.silo}: remove it, or rounds keep "
                "training the deleted name"
            )
        parts.append("the name cannot be given to a new user without --reuse-deleted-name")
        return "; ".join(parts) + "."


def delete_user(registry: Registry, *, name: str, store_root: Path, silos: Path | None) -> Deletion:
    """Tombstone `name` in the registry, then quarantine their store slots (see module doc).

    `silos` is the directory holding one silo per user, where this process can see it.
    """
    tombstone = registry.delete_user(name)
    silo = None if silos is None else silos / name
    if not store_root.is_dir():  # no store here: nothing of theirs can be served from it
        return Deletion(tombstone, silo=_existing(silo))
    try:
        moved = AdapterStore(store_root).quarantine_user(name, label=tombstone.user_id)
    except (OSError, AdapterError) as e:
        logger.warning("could not quarantine the slots of deleted user %s: %s", name, e)
        return Deletion(tombstone, store_problem=str(e), silo=_existing(silo))
    return Deletion(tombstone, moved.slots, moved.path, silo=_existing(silo))


def create_user(
    registry: Registry,
    *,
    name: str,
    proxy_alpha: float | None,
    reuse_deleted_name: bool,
    store_root: Path,
    silos: Path | None,
) -> User:
    """Create `name`; a deleted user's name only with `reuse_deleted_name`, from a clean slate."""
    check_user_name(name)
    silo = None if silos is None else silos / name
    if reuse_deleted_name and registry.is_deleted_name(name):
        if _existing(silo) is not None:
            raise NameNotClean(
                f"cannot reuse the deleted user name {name!r}: the old user's training data is "
                f"still in {silo}; move it away first",
                param="name",
            )
        if not store_root.is_dir():
            return registry.create_user(name, proxy_alpha=proxy_alpha, reuse_deleted_name=True)
        try:
            moved = AdapterStore(store_root).quarantine_user(name, label="before-reuse")
        except (OSError, AdapterError) as e:
            raise NameNotClean(
                f"cannot reuse the deleted user name {name!r}: the store's slots for it could "
                f"not be cleared ({e})",
                param="name",
            ) from e
        if moved.slots:
            logger.info("quarantined %s before reusing the name %s", moved.slots, name)
    return registry.create_user(
        name, proxy_alpha=proxy_alpha, reuse_deleted_name=reuse_deleted_name
    )


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.exists() else None
