"""The tables.  One schema for SQLite and PostgreSQL; Alembic migrations create it."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

# The server's own bindings and unbindings: what it pushes to its replication peers.
OWN_SOURCE, NO_ORIGIN = "source = 'local'", "origin_server IS NULL"
OWN_ROWS = f"{OWN_SOURCE} AND {NO_ORIGIN}"

# Every write (bind or unbind) gives the row a new, larger id, so "what changed since
# id N" is one indexed range query: that is how the in-memory lookup index of every
# process stays coherent with the store.  An unbind leaves a tombstone (mxid NULL).
# Associations replicated from a peer are bindings too (source 'local'), one row per
# address with the server's own: `origin_server` names the peer and `origin_id` is the
# row's id there; both are NULL on the server's own rows.
threepid_associations = Table(
    "threepid_associations",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("source", String(16), nullable=False),
    Column("medium", String(16), nullable=False),
    Column("address", Text, nullable=False),
    Column("mxid", Text, nullable=True),
    Column("ts", BigInteger, nullable=False),
    Column("not_before", BigInteger, nullable=False),
    Column("not_after", BigInteger, nullable=False),
    Column("lookup_hash", String(64), nullable=False),
    Column("origin_server", String(255), nullable=True),
    Column("origin_id", BigInteger, nullable=True),
    UniqueConstraint("source", "medium", "address", name="uq_threepid_source_medium_address"),
    Index("ix_threepid_own_changes", "id", sqlite_where=text(OWN_ROWS),
          postgresql_where=text(OWN_ROWS)),
    sqlite_autoincrement=True,
)

accounts = Table(
    "accounts",
    metadata,
    Column("user_id", Text, primary_key=True),
    Column("created_ts", BigInteger, nullable=False),
    Column("consent_version", Text, nullable=True),
)

# Only a SHA-256 of each access token is kept: a leaked database grants no access.
account_tokens = Table(
    "account_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", Text, nullable=False, index=True),
    Column("created_ts", BigInteger, nullable=False),
)

accepted_terms_urls = Table(
    "accepted_terms_urls",
    metadata,
    Column("user_id", Text, nullable=False),
    Column("url", Text, nullable=False),
    UniqueConstraint("user_id", "url", name="uq_accepted_terms_user_url"),
)

# Small named values the server keeps for itself: the lookup pepper, ...
server_state = Table(
    "server_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Sessions proving that a caller reads an email address or phone number.  The id (the
# `sid` clients see) is random, not a sequence: a sid must not be guessable.  The token
# is kept in clear because a repeated requestToken must send the same token again.
threepid_validation_sessions = Table(
    "threepid_validation_sessions",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("medium", String(16), nullable=False),
    Column("address", Text, nullable=False),
    Column("client_secret", Text, nullable=False),
    Column("validated_at", BigInteger, nullable=True),
    Column("mtime", BigInteger, nullable=False),
    Column("next_link", Text, nullable=True),
    Column("send_attempt", Integer, nullable=False),
    Column("token", Text, nullable=False),
    Column("failed_attempts", Integer, nullable=False),
    UniqueConstraint("medium", "address", "client_secret",
                     name="uq_validation_session_medium_address_secret"),
)

# 3PID invites waiting for their address to be bound (store-invite).  `sent_ts` is set
# when a bind hands them to the onbind queue; the token is what the invitee's homeserver
# exchanges for the invite, so it is unique.  Times in ms.
invite_tokens = Table(
    "invite_tokens",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("medium", String(16), nullable=False),
    Column("address", Text, nullable=False),
    Column("room_id", Text, nullable=False),
    Column("sender", Text, nullable=False),
    Column("token", String(255), nullable=False),
    Column("received_ts", BigInteger, nullable=False),
    Column("sent_ts", BigInteger, nullable=True),
    UniqueConstraint("token", name="uq_invite_tokens_token"),
    Index("ix_invite_tokens_medium_address", "medium", "address"),
    sqlite_autoincrement=True,
)

# The public halves of the per-invite ephemeral keys (the private seed is only mailed).
ephemeral_public_keys = Table(
    "ephemeral_public_keys",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("public_key", String(64), nullable=False),
    Column("verify_count", Integer, nullable=False),
    Column("persistence_ts", BigInteger, nullable=False),
    UniqueConstraint("public_key", name="uq_ephemeral_public_keys_public_key"),
    sqlite_autoincrement=True,
)

# The durable onbind queue: one row per bind that carried invites, POSTed to the
# homeserver of `mxid` until it answers 200 (state 'done') or the retries time out
# ('gave_up').  A sender claims a row by setting `claimed_until` (a lease) in one
# conditional UPDATE, so of several workers exactly one sends it.
onbind_deliveries = Table(
    "onbind_deliveries",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("destination", Text, nullable=False),
    Column("mxid", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_ts", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_ts", BigInteger, nullable=False),
    Column("claimed_until", BigInteger, nullable=True),
    Column("state", String(16), nullable=False),
    Column("finished_ts", BigInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    Index("ix_onbind_deliveries_state_next", "state", "next_attempt_ts"),
    sqlite_autoincrement=True,
)

# Replication peers: those taken over from Sydent (with `port`, `base_replication_url`,
# `active` and keys as Sydent had them), and the push state of every peer, the
# configured ones too.  `name` is the peer's server name, which is also its TLS
# certificate's CN.  `last_sent_version` is the id of the last own association the peer
# acknowledged (NULL: none yet); times are ms.
replication_peers = Table(
    "replication_peers",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("port", Integer, nullable=True),
    Column("base_replication_url", Text, nullable=True),
    Column("active", Boolean, nullable=False),
    Column("last_sent_version", BigInteger, nullable=True),
    Column("last_success_ts", BigInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("last_error_ts", BigInteger, nullable=True),
)

# The peers' signing keys: `key` is unpadded standard base64.
replication_peer_keys = Table(
    "replication_peer_keys",
    metadata,
    Column("name", String(255), nullable=False),
    Column("alg", String(64), nullable=False),
    Column("key", Text, nullable=False),
    PrimaryKeyConstraint("name", "alg", name="pk_replication_peer_keys"),
)

# Rate limits (kith.services.limits): one row per limit and key, holding the bucket's
# "theoretical arrival time": the moment the bucket will be empty again, in microseconds
# since the epoch.  A row whose time has passed is an empty bucket and may be deleted.
# The key is hashed, so no address or user ID is kept here.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("bucket", String(96), primary_key=True),
    Column("tat_us", BigInteger, nullable=False),
    Index("ix_rate_limits_tat_us", "tat_us"),
)
