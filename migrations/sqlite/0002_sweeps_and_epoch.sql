-- When the sweeper marked each lapsed instance critical (by the database's clock): an instance
-- is removed only after it has been critical for `deregister_after` as a running sweeper saw.
ALTER TABLE instances ADD COLUMN expired_at BIGINT;
UPDATE instances SET expired_at = updated_at WHERE lease_expired;

-- One row: when the sweeper last swept, so that a gap in sweeping (the registry down) is
-- noticed and leases get a full term to come back.
CREATE TABLE sweeper_state (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    swept_at BIGINT
);
INSERT INTO sweeper_state (id, swept_at) VALUES (1, NULL);

-- A random number per database (new when the catalog is restored under a running registry),
-- part of the catalog's ETag: an agent never takes one database's catalog for another's.
ALTER TABLE catalog_state ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
UPDATE catalog_state SET epoch = abs(random() % 9007199254740991);

-- Counting a node's instances (its quota) reads only that node's.
CREATE INDEX instances_node ON instances (node);

-- The number of instances, kept by triggers in the one row every write locks first, so that
-- the registry's instance limit is checked exactly and without counting the table.
ALTER TABLE catalog_state ADD COLUMN instance_count BIGINT NOT NULL DEFAULT 0;
UPDATE catalog_state SET instance_count = (SELECT COUNT(*) FROM instances);
CREATE TRIGGER instances_counted_insert AFTER INSERT ON instances
BEGIN
    UPDATE catalog_state SET instance_count = instance_count + 1 WHERE id = 1;
END;
CREATE TRIGGER instances_counted_delete AFTER DELETE ON instances
BEGIN
    UPDATE catalog_state SET instance_count = instance_count - 1 WHERE id = 1;
END;

-- When each agent itself last announced: the evidence of life other agents ask for (its
-- lease, which the sweeper extends after a gap, is not).
ALTER TABLE agents ADD COLUMN renewed_at BIGINT;
UPDATE agents SET renewed_at = lease_expires_at - ttl_s * 1000;
