"""Local users of the embedded identity mode: a name, roles and an argon2id password hash."""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from integration.auth.principal import ROLES
from integration.db.store import Store
from integration.db.tables import LocalUser

_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")
MIN_PASSWORD_LENGTH = 8
_hasher = PasswordHasher()  # argon2id with the library's current defaults (RFC 9106 low-memory profile)
# verified against when the user does not exist, so a wrong name costs as long as a wrong password
_DUMMY_HASH = _hasher.hash("not a password anyone has")


class UserError(ValueError):
    """A user cannot be added as asked; the message says what to change."""


def add_user(store: Store, name: str, password: str, roles: list[str], display_name: str | None = None) -> None:
    """Create (or replace the password and roles of) local user ``name``."""
    if not _NAME.match(name):
        raise UserError("a user name is 1-128 letters, digits or . _ @ -")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise UserError(f"choose roles from {', '.join(ROLES)}")
    with store.session() as s:
        user = s.get(LocalUser, name) or LocalUser(name=name)
        user.password_hash = _hasher.hash(password)
        user.roles = sorted(set(roles))
        user.display_name = display_name
        s.add(user)


def authenticate_user(store: Store, name: str, password: str) -> LocalUser | None:
    """The user whose name and password these are, or None."""
    user = None
    if _NAME.match(name):
        with store.read_session() as s:
            user = s.get(LocalUser, name)
            if user is not None:
                s.expunge(user)
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    return user
