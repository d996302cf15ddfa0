-- Prepaid credits (CONTRACT section 9): one balance row per owner (a company, else a developer's e-mail), the
-- grants that fed it, and the leases replicas hold. Plain types only, like the schemas before.

-- balance = granted - spent - reserved. `reserved` is the sum of `credit_leases.held` for the owner: credits
-- replicas may still serve, counted as spent until they report what they served. Every lease call and every
-- grant updates this row first, so its row lock orders all of an owner's ledger writes; a write that locks
-- several owners locks them in owner order.
CREATE TABLE credit_balances (
    owner TEXT PRIMARY KEY,
    granted BIGINT NOT NULL,
    spent BIGINT NOT NULL,
    reserved BIGINT NOT NULL,
    -- 1 while granted - spent is below the low-balance threshold: the write that crosses it logs once (leases
    -- do not count, so one taken and returned does not cross it back and forth).
    low BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Every grant or take-back. `source` names what caused it, unique across owners, so a retried request, a
-- webhook delivered again (even once its customer has moved to another owner) or a second replica refilling
-- the same period adds nothing: `api:<hash of the Idempotency-Key and the owner>`, `stripe:<invoice>:<line>`,
-- `refill:<owner>:<product>:<period start>`.
CREATE TABLE credit_grants (
    id BIGINT PRIMARY KEY,
    owner TEXT NOT NULL,
    amount BIGINT NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE INDEX credit_grants_by_owner ON credit_grants (owner, id);

-- What one replica holds for one owner. `held`: credits reserved for it and not reported served (served ones
-- included until reported). `reported`: the absolute count of credits it reported served in its current life,
-- so a report sent twice (a call whose answer was lost) is counted once.
-- `updated_at`: the last call of the replica for the owner. A live replica returns an idle lease within
-- seconds, so a row still holding credits long after is a replica that died for good (its id lost with its
-- folder): any replica settles it, keeping what it held as spent.
CREATE TABLE credit_leases (
    owner TEXT NOT NULL,
    replica TEXT NOT NULL,
    held BIGINT NOT NULL,
    reported BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (owner, replica)
);
CREATE INDEX credit_leases_by_age ON credit_leases (updated_at) WHERE held > 0;
CREATE INDEX credit_leases_by_replica ON credit_leases (replica);

-- Grant ids: one counter row, so ids are portable (no SERIAL / AUTOINCREMENT difference between the two).
CREATE TABLE credit_sequence (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    seq BIGINT NOT NULL
);
INSERT INTO credit_sequence (singleton, seq) VALUES (1, 0);
