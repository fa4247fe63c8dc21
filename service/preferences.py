"""Setting and showing a user's training preferences (their PFIT reward mix) from the gateway.

The one place both `fedpersona users reward-mix` and the admin API (`PATCH /admin/users/{name}`,
`POST /admin/users`) go through. The preference's format, range and place are the trainer's and
the gateway's shared contract (`fedpersona.adapters.preferences`): the gateway writes the file
into the user's directory of the adapter store, the trainer's clients read it each round. The
registry answers whether the user exists (an unknown user is a 404 here as everywhere) and
orders the write against deleting the user (`Registry.while_user_exists`): a deleted user never
keeps a preferences file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedpersona.adapters.errors import InvalidPreferences
from fedpersona.adapters.preferences import (
    Preferences,
    check_reward_mix,
    effective_preferences,
    write_preferences,
)
from fedpersona.service.errors import BadRequest, StoreUnwritable
from fedpersona.service.registry import Registry

logger = logging.getLogger(__name__)


def reward_mix_of(store_root: Path, name: str) -> float:
    """The reward mix `name` trains with: theirs, or the default if they never set one."""
    return effective_preferences(store_root, name).reward_mix


def set_reward_mix(
    registry: Registry, *, name: str, reward_mix: float, store_root: Path, field: str = "reward_mix"
) -> Preferences:
    """Store `name`'s reward mix (validated; `field` names it in the error) and return it.

    `UserNotFound` (404) for a user the registry does not know; `StoreUnwritable` (503) if the
    store refuses the write, in which case the previous preference stands.
    """
    try:
        preferences = Preferences(reward_mix=check_reward_mix(reward_mix, where=field))
    except InvalidPreferences as e:
        raise BadRequest(str(e), param=field) from e
    # Written only while the user exists, under the registry's write lock: a concurrent delete
    # tombstones them either before (404, nothing written) or after the write (their store
    # directory, preferences included, is then quarantined), never in between.
    with registry.while_user_exists(name):
        try:
            write_preferences(store_root, name, preferences)
        except OSError as e:
            logger.error("cannot write %s's preferences below %s: %s", name, store_root, e)
            raise StoreUnwritable() from e
    logger.info("reward mix of %s set to %g", name, preferences.reward_mix)
    return preferences
