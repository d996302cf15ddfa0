-- Stripe drives access (CONTRACT section 8): subscriptions as tollgate last saw them, and the webhook events
-- it verified. Plain types only, like the first schema.

-- One row per Stripe subscription; `state` is its JSON (status, prices, past-due time, where it was learned).
-- `as_of` is the time of the observation it comes from: an older one never replaces it.
CREATE TABLE stripe_subscriptions (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    state TEXT NOT NULL,
    as_of BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX stripe_subscriptions_by_customer ON stripe_subscriptions (customer);

-- Verified webhook events, by id: a second delivery of an id changes nothing. `event` holds only the fields
-- tollgate reads, not Stripe's whole body. Applied right after the answer; kept 7 days for de-duplication
-- (Stripe retries a delivery for up to 3 days).
CREATE TABLE stripe_events (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    customer TEXT NOT NULL,
    event TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    -- Set by the replica that takes a pending event in its sweep, so replicas do not all apply the same one.
    claimed_at BIGINT,
    applied_at BIGINT
);
CREATE INDEX stripe_events_by_receipt ON stripe_events (received_at);
-- Every replica looks for events left pending every few seconds: only the pending ones are indexed.
CREATE INDEX stripe_events_pending ON stripe_events (received_at) WHERE applied_at IS NULL;

-- When the last full re-read of subscriptions from Stripe started: replicas take turns through it.
CREATE TABLE stripe_resync (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    started_at BIGINT NOT NULL
);
INSERT INTO stripe_resync (singleton, started_at) VALUES (1, 0);
