-- Signpost registry schema (PostgreSQL). Times are unix milliseconds (BIGINT) so that the
-- same queries and row types serve PostgreSQL and SQLite.

-- One row: the catalog's change index and the sweeper's self-preservation state.
CREATE TABLE catalog_state (
    id                SMALLINT PRIMARY KEY CHECK (id = 1),
    change_index      BIGINT   NOT NULL,
    self_preservation BOOLEAN  NOT NULL DEFAULT FALSE
);
INSERT INTO catalog_state (id, change_index, self_preservation) VALUES (1, 1, FALSE);

CREATE TABLE instances (
    id                 TEXT    PRIMARY KEY,
    service            TEXT    NOT NULL,
    address            TEXT    NOT NULL,
    port               BIGINT  NOT NULL,
    tags               TEXT    NOT NULL,  -- JSON array
    meta               TEXT    NOT NULL,  -- JSON object
    weight             BIGINT  NOT NULL,
    zone               TEXT,
    health             TEXT    NOT NULL,  -- reported: passing | warning | critical
    output             TEXT,
    maintenance        BOOLEAN NOT NULL DEFAULT FALSE,
    maintenance_reason TEXT,
    node               TEXT,
    check_spec         TEXT,              -- JSON CheckSpec
    ttl_s              BIGINT  NOT NULL,
    lease_expired      BOOLEAN NOT NULL DEFAULT FALSE,
    change_index       BIGINT  NOT NULL,
    registered_at      BIGINT  NOT NULL,
    updated_at         BIGINT  NOT NULL,
    lease_expires_at   BIGINT  NOT NULL
);
CREATE INDEX instances_service ON instances (service);
CREATE INDEX instances_lease ON instances (lease_expires_at);
CREATE INDEX instances_probed ON instances (id) WHERE node IS NULL AND check_spec IS NOT NULL;

CREATE TABLE agents (
    node             TEXT   PRIMARY KEY,
    gossip_addr      TEXT   NOT NULL,
    http_addr        TEXT   NOT NULL,
    zone             TEXT,
    ttl_s            BIGINT NOT NULL,
    change_index     BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL
);

-- Every change of the index is announced, so that the waiters of every replica wake at once.
-- NOTIFY is delivered at commit, in commit order.
CREATE FUNCTION signpost_notify_catalog() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('signpost_catalog', NEW.change_index::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER catalog_state_notify
    AFTER UPDATE OF change_index ON catalog_state
    FOR EACH ROW EXECUTE FUNCTION signpost_notify_catalog();
