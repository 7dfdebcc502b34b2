-- The public key an agent signs its gossip values with, as it announced it (URL-safe base64
-- of an Ed25519 key): other agents believe a node's gossip only when it verifies with it.
ALTER TABLE agents ADD COLUMN signing_key TEXT;
