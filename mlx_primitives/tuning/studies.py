"""The tuner's Optuna studies, kept in the tuning database itself (Optuna's RDB storage, in
Optuna's own tables beside the records), so that ``optuna-dashboard <url>`` opens them.

One study per chip and problem (the problem key names the op), named ``<chip>/<problem>``;
it holds the latest tuning of that problem's search.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ..store.database import DatabaseError, connect_args, shown_url

# Optuna stores a study's name in at most this many characters.
MAX_NAME = 512
# Workers starting together on a new database race to make Optuna's tables; losers retry.
ATTEMPTS = 5


def study_name(chip: str, problem: str) -> str:
    """The study of ``problem`` (a problem key) on ``chip``; a name too long for Optuna is cut
    and ends in a hash of the whole."""
    name = f"{chip}/{problem}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[: MAX_NAME - len(digest) - 1]}#{digest}"


def storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage in the database at ``url`` (its tables are made on first use), waiting
    for locks and servers as the tuning database does.

    Args:
        url: the tuning database's SQLAlchemy URL.
    """
    kwargs = {"connect_args": connect_args(make_url(url).get_backend_name())}
    failed = 0
    while True:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            failed += 1
            if failed == ATTEMPTS:
                raise DatabaseError(f"{shown_url(url)}: cannot open Optuna's storage: {e}") from e
            time.sleep(0.2 * failed)


def fresh_study(
    where: optuna.storages.RDBStorage, name: str, sampler: optuna.samplers.BaseSampler
) -> optuna.Study:
    """The study ``name``, emptied of an earlier search: the search starts from nothing, so a
    seeded sampler suggests what it would in a new process, whatever was searched before.

    Args:
        where: the storage.
        name: the study's name (:func:`study_name`).
        sampler: the search's sampler.
    """
    with contextlib.suppress(KeyError):  # KeyError: never tuned before
        optuna.delete_study(study_name=name, storage=where)
    return optuna.create_study(
        study_name=name, storage=where, sampler=sampler, direction="minimize", load_if_exists=True
    )
