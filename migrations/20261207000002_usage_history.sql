-- Usage history (CONTRACT section 10): hourly rollups of sealed usage, added by every replica, and the
-- batches already added, so a replica replaying its spool after a crash adds nothing twice.

-- One row per (UTC hour, Stripe customer, app, product, meter): what every replica's closed windows of that
-- hour counted. Empty strings stand for "none" (no customer, an unidentified caller, no meter).
CREATE TABLE usage_rollups (
    hour BIGINT NOT NULL,
    customer TEXT NOT NULL,
    app TEXT NOT NULL,
    product TEXT NOT NULL,
    meter TEXT NOT NULL,
    allowed BIGINT NOT NULL,
    denied BIGINT NOT NULL,
    billable BIGINT NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (hour, customer, app, product, meter)
);
CREATE INDEX usage_rollups_by_customer ON usage_rollups (customer, hour);
CREATE INDEX usage_rollups_by_app ON usage_rollups (app, hour);

-- A batch is one closed metering window of one spool (`<producer>:<window start>:<length>`): added once.
-- Kept 7 days, far beyond what a spool can replay.
CREATE TABLE usage_rollup_batches (
    id TEXT PRIMARY KEY,
    added_at BIGINT NOT NULL
);
CREATE INDEX usage_rollup_batches_by_age ON usage_rollup_batches (added_at);
