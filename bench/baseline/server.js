// A registry "of the original shape": Express + PostgreSQL (node-postgres), one process, a
// query per request. It is the benchmark's baseline, not a product: it answers the three
// routes the benchmark drives (register, heartbeat, service lookup), plus one instance and a
// health check, with the same JSON shapes as signpost-registry.
//
//   node server.js --listen 127.0.0.1:7400 --database-url postgres://postgres@127.0.0.1/db
//
// Options (or environment): --listen (LISTEN), --database-url (DATABASE_URL),
// --pool-size (POOL_SIZE, default 16: signpost-registry's default db_max_connections).
'use strict';

const express = require('express');
const { Pool } = require('pg');

function option(name, envName, fallback) {
  const flag = `--${name}`;
  const at = process.argv.indexOf(flag);
  if (at !== -1 && at + 1 < process.argv.length) return process.argv[at + 1];
  const inline = process.argv.find((arg) => arg.startsWith(`${flag}=`));
  if (inline) return inline.slice(flag.length + 1);
  return process.env[envName] || fallback;
}

const listen = option('listen', 'LISTEN', '127.0.0.1:7400');
const databaseUrl = option('database-url', 'DATABASE_URL', 'postgres://postgres@127.0.0.1:5432/postgres');
const poolSize = Number.parseInt(option('pool-size', 'POOL_SIZE', '16'), 10);
const colon = listen.lastIndexOf(':');
const host = listen.slice(0, colon);
const port = Number.parseInt(listen.slice(colon + 1), 10);
if (colon < 1 || !Number.isInteger(port) || !Number.isInteger(poolSize) || poolSize < 1) {
  console.error(`baseline: bad --listen ${listen} or --pool-size ${poolSize}`);
  process.exit(64);
}

const pool = new Pool({ connectionString: databaseUrl, max: poolSize });
pool.on('error', (err) => console.error('baseline: idle client error:', err.message));

const SCHEMA = `
CREATE SEQUENCE IF NOT EXISTS catalog_index;
CREATE TABLE IF NOT EXISTS instances (
    id               TEXT        PRIMARY KEY,
    service          TEXT        NOT NULL,
    address          TEXT        NOT NULL,
    port             INTEGER     NOT NULL,
    tags             JSONB       NOT NULL,
    meta             JSONB       NOT NULL,
    weight           INTEGER     NOT NULL,
    zone             TEXT,
    health           TEXT        NOT NULL,
    ttl_s            INTEGER     NOT NULL,
    change_index     BIGINT      NOT NULL,
    registered_at    TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL,
    lease_expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_service ON instances (service);
`;

const REGISTER = `
INSERT INTO instances (id, service, address, port, tags, meta, weight, zone, health, ttl_s,
                       change_index, registered_at, updated_at, lease_expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'passing', $9::integer, nextval('catalog_index'), now(), now(),
        now() + make_interval(secs => $9::integer))
ON CONFLICT (id) DO UPDATE SET service = excluded.service, address = excluded.address,
    port = excluded.port, tags = excluded.tags, meta = excluded.meta, weight = excluded.weight,
    zone = excluded.zone, health = excluded.health, ttl_s = excluded.ttl_s,
    change_index = excluded.change_index, updated_at = excluded.updated_at,
    lease_expires_at = excluded.lease_expires_at
RETURNING *, (xmax = 0) AS created`;

const HEARTBEAT = `
UPDATE instances SET lease_expires_at = now() + make_interval(secs => ttl_s)
WHERE id = $1 RETURNING *`;

const SERVICE = `
SELECT * FROM instances
WHERE service = $1 AND health IN ('passing', 'warning') AND lease_expires_at > now()
ORDER BY id`;

const INSTANCE = 'SELECT * FROM instances WHERE id = $1';

function toInstance(row) {
  return {
    id: row.id,
    service: row.service,
    address: row.address,
    port: row.port,
    tags: row.tags,
    meta: row.meta,
    weight: row.weight,
    zone: row.zone,
    health: row.health,
    ttl_s: row.ttl_s,
    index: Number(row.change_index),
    registered_at: row.registered_at,
    updated_at: row.updated_at,
    lease_expires_at: row.lease_expires_at,
  };
}

function problem(res, status, error, message) {
  res.status(status).json({ error, message });
}

// Refuses what the real registry would refuse on the fields the benchmark sends; the
// baseline is not a validator, but it must not store garbage either.
function registrationProblems(body) {
  const problems = [];
  if (typeof body !== 'object' || body === null) return ['the body must be a JSON object'];
  if (typeof body.id !== 'string' || !/^[A-Za-z0-9._:-]{1,128}$/.test(body.id)) problems.push('id');
  if (typeof body.service !== 'string' || !/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/.test(body.service)) problems.push('service');
  if (typeof body.address !== 'string' || body.address.length === 0) problems.push('address');
  if (!Number.isInteger(body.port) || body.port < 1 || body.port > 65535) problems.push('port');
  if (body.ttl_s !== undefined && (!Number.isInteger(body.ttl_s) || body.ttl_s < 1 || body.ttl_s > 86400)) problems.push('ttl_s');
  return problems;
}

// Express 5 passes a rejected promise of an async handler to the error handler below.
const app = express();
app.disable('x-powered-by');
app.disable('etag');
app.use(express.json({ limit: '64kb' }));

app.post('/v1/instances', async (req, res) => {
  const body = req.body;
  const problems = registrationProblems(body);
  if (problems.length > 0) return problem(res, 422, 'invalid', `invalid fields: ${problems.join(', ')}`);
  const { rows } = await pool.query(REGISTER, [
    body.id,
    body.service,
    body.address,
    body.port,
    JSON.stringify(body.tags || []),
    JSON.stringify(body.meta || {}),
    body.weight || 100,
    body.zone || null,
    body.ttl_s || 30,
  ]);
  res.status(rows[0].created ? 201 : 200).json(toInstance(rows[0]));
});

app.put('/v1/instances/:id/heartbeat', async (req, res) => {
  const { rows } = await pool.query(HEARTBEAT, [req.params.id]);
  if (rows.length === 0) return problem(res, 404, 'not_found', `no instance \`${req.params.id}\`; register it again`);
  res.json(toInstance(rows[0]));
});

app.get('/v1/instances/:id', async (req, res) => {
  const { rows } = await pool.query(INSTANCE, [req.params.id]);
  if (rows.length === 0) return problem(res, 404, 'not_found', `no instance \`${req.params.id}\``);
  res.json(toInstance(rows[0]));
});

app.get('/v1/services/:name', async (req, res) => {
  const { rows } = await pool.query(SERVICE, [req.params.name]);
  const instances = rows.map(toInstance);
  const index = instances.reduce((max, i) => Math.max(max, i.index), 0);
  res.json({ service: req.params.name, index, instances });
});

app.get('/healthz', async (_req, res) => {
  await pool.query('SELECT 1');
  res.json({ status: 'ok' });
});

app.use((_req, res) => problem(res, 404, 'not_found', 'no such route'));

// eslint-disable-next-line no-unused-vars
app.use((err, _req, res, _next) => {
  if (err.type === 'entity.parse.failed') return problem(res, 400, 'malformed_json', err.message);
  if (err.type === 'entity.too.large') return problem(res, 413, 'payload_too_large', err.message);
  console.error('baseline: request failed:', err.message);
  problem(res, 503, 'unavailable', err.message);
});

async function main() {
  await pool.query(SCHEMA);
  const server = app.listen(port, host, () => console.error(`baseline: listening on ${host}:${port}`));
  server.keepAliveTimeout = 60_000;
  const stop = () => {
    server.close(() => pool.end().then(() => process.exit(0)));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2_000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error('baseline: cannot start:', err.message);
  process.exit(1);
});
