-- When the sweeper marked each lapsed instance critical (by the database's clock): an instance
-- is removed only after it has been critical for `deregister_after` as a running sweeper saw.
ALTER TABLE instances ADD COLUMN expired_at BIGINT;
UPDATE instances SET expired_at = updated_at WHERE lease_expired;

-- One row: when the sweeper last swept, so that a gap in sweeping (the registry or its
-- database down, no leader) is noticed and leases get a full term to come back.
CREATE TABLE sweeper_state (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    swept_at BIGINT
);
INSERT INTO sweeper_state (id, swept_at) VALUES (1, NULL);

-- A random number per database (new when the catalog is restored under a running registry),
-- part of the catalog's ETag: an agent never takes one database's catalog for another's.
ALTER TABLE catalog_state ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
UPDATE catalog_state SET epoch = floor(random() * 9007199254740991)::BIGINT;
