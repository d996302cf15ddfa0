-- Prepaid credits (CONTRACT section 9): one balance row per owner (a company, else a developer's e-mail), the
-- grants that fed it, and the leases replicas hold. Plain types only, like the schemas before.

-- balance = granted - spent - reserved. `reserved` is the sum of `credit_leases.held` for the owner: credits
-- replicas may still serve, counted as spent until they report what they served. Every lease call and every
-- grant updates this row first, so its row lock orders all of an owner's ledger writes.
CREATE TABLE credit_balances (
    owner TEXT PRIMARY KEY,
    granted BIGINT NOT NULL,
    spent BIGINT NOT NULL,
    reserved BIGINT NOT NULL,
    -- 1 while the balance is below the low-balance threshold: the write that crosses it logs once.
    low BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Every grant or take-back. `source` names what caused it, unique per owner, so a retried request, a webhook
-- delivered again or a second replica refilling the same period adds nothing: `api:<idempotency hash>`,
-- `stripe:<invoice>:<line>`, `refill:<product>:<period start>`.
CREATE TABLE credit_grants (
    id BIGINT PRIMARY KEY,
    owner TEXT NOT NULL,
    amount BIGINT NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (owner, source)
);
CREATE INDEX credit_grants_by_owner ON credit_grants (owner, id);

-- What one replica holds for one owner. `held`: credits reserved for it and not reported served (served ones
-- included until reported). `reported`: the absolute count of credits it reported served in its current life,
-- so a report sent twice (a call whose answer was lost) is counted once.
CREATE TABLE credit_leases (
    owner TEXT NOT NULL,
    replica TEXT NOT NULL,
    held BIGINT NOT NULL,
    reported BIGINT NOT NULL,
    PRIMARY KEY (owner, replica)
);
CREATE INDEX credit_leases_by_replica ON credit_leases (replica);

-- Grant ids: one counter row, so ids are portable (no SERIAL / AUTOINCREMENT difference between the two).
CREATE TABLE credit_sequence (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    seq BIGINT NOT NULL
);
INSERT INTO credit_sequence (singleton, seq) VALUES (1, 0);
