-- The state store's first schema (CONTRACT section 7). Plain types only: the same file runs on SQLite and
-- PostgreSQL. Times are Unix seconds; ids of developers and apps are the sequence number of the write that
-- created them.

-- One row: the number of the last write. Each write increments it first and holds its row lock until
-- commit, so writes commit in sequence order.
CREATE TABLE state_sequence (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    seq BIGINT NOT NULL,
    -- Changes up to this number were pruned: a replica whose cursor is older reloads everything.
    pruned_through BIGINT NOT NULL
);
INSERT INTO state_sequence (singleton, seq, pruned_through) VALUES (1, 0, 0);

CREATE TABLE developers (
    id BIGINT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    company TEXT,
    stripe_customer TEXT,
    attributes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE apps (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    developer_id BIGINT NOT NULL REFERENCES developers (id),
    client_id TEXT UNIQUE,
    status TEXT NOT NULL,
    attributes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX apps_by_developer ON apps (developer_id, name);

CREATE TABLE app_products (
    app_id BIGINT NOT NULL REFERENCES apps (id),
    position BIGINT NOT NULL,
    product TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (app_id, product)
);

-- Only the key's SHA-256 is kept ("sha256:" + hex); the key itself was shown once and is gone.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    app_id BIGINT NOT NULL REFERENCES apps (id),
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);
CREATE INDEX api_keys_by_app ON api_keys (app_id);

-- What each write touched: kind is developer (name: e-mail), app (name) or key (name: hash).
CREATE TABLE changes (
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (seq, kind, name)
);

CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL
);

-- Answers to writes that carried an Idempotency-Key, for 24 hours. The key is the SHA-256 of the caller's
-- token id and the Idempotency-Key; the answer is sealed under a key derived from the Idempotency-Key, so
-- the database never holds a readable API key.
CREATE TABLE idempotency (
    key_hash TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    status BIGINT NOT NULL,
    sealed TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX idempotency_by_age ON idempotency (created_at);
