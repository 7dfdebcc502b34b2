-- Signpost registry schema (SQLite). Times are unix milliseconds (BIGINT) so that the
-- same queries and row types serve PostgreSQL and SQLite.

-- One row: the catalog's change index and the sweeper's self-preservation state.
CREATE TABLE catalog_state (
    id                INTEGER  PRIMARY KEY CHECK (id = 1),
    change_index      BIGINT   NOT NULL,
    self_preservation INTEGER  NOT NULL DEFAULT 0
);
INSERT INTO catalog_state (id, change_index, self_preservation) VALUES (1, 1, 0);

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
    maintenance        INTEGER NOT NULL DEFAULT 0,
    maintenance_reason TEXT,
    node               TEXT,
    check_spec         TEXT,              -- JSON CheckSpec
    ttl_s              BIGINT  NOT NULL,
    lease_expired      INTEGER NOT NULL DEFAULT 0,
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
