//! Rows as both databases return them, and their conversion into the model.

use chrono::{DateTime, Utc};
use signpost_shared::model::{CheckSpec, Health, Instance, InstanceSpec};
use signpost_shared::wire::AgentInfo;

use super::StoreError;

/// A row of `instances`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InstanceRow {
    pub id: String,
    pub service: String,
    pub address: String,
    pub port: i64,
    pub tags: String,
    pub meta: String,
    pub weight: i64,
    pub zone: Option<String>,
    pub health: String,
    pub output: Option<String>,
    pub maintenance: bool,
    pub maintenance_reason: Option<String>,
    pub node: Option<String>,
    pub check_spec: Option<String>,
    pub ttl_s: i64,
    pub lease_expired: bool,
    pub change_index: i64,
    pub registered_at: i64,
    pub updated_at: i64,
    pub lease_expires_at: i64,
}

impl InstanceRow {
    /// The health as answers show it: a lapsed lease is critical whatever was reported;
    /// maintenance wins over what the checks say.
    pub fn effective_health(&self) -> Result<Health, StoreError> {
        if self.lease_expired {
            return Ok(Health::Critical);
        }
        if self.maintenance {
            return Ok(Health::Maintenance);
        }
        self.reported_health()
    }

    /// The health the owner or the probe last reported.
    pub fn reported_health(&self) -> Result<Health, StoreError> {
        self.health.parse().map_err(|e| self.corrupt("health", e))
    }

    /// True when the stored description equals `spec` (lease and bookkeeping aside; a
    /// registration without a health keeps the stored one).
    pub fn describes(&self, spec: &InstanceSpec) -> Result<bool, StoreError> {
        let mut stored = self.spec()?;
        if spec.health.is_none() {
            stored.health = None;
        }
        Ok(stored == *spec && !self.lease_expired)
    }

    fn spec(&self) -> Result<InstanceSpec, StoreError> {
        Ok(InstanceSpec {
            id: self.id.clone(),
            service: self.service.clone(),
            address: self.address.clone(),
            port: u16::try_from(self.port).map_err(|e| self.corrupt("port", e.to_string()))?,
            tags: serde_json::from_str(&self.tags).map_err(|e| self.corrupt("tags", e.to_string()))?,
            meta: serde_json::from_str::<signpost_shared::model::Meta>(&self.meta).map_err(|e| self.corrupt("meta", e.to_string()))?,
            weight: u32::try_from(self.weight).map_err(|e| self.corrupt("weight", e.to_string()))?,
            zone: self.zone.clone(),
            health: Some(self.reported_health()?),
            node: self.node.clone(),
            check: self.check()?,
            ttl_s: u32::try_from(self.ttl_s).map_err(|e| self.corrupt("ttl_s", e.to_string()))?,
        })
    }

    /// The registry-run check, if any.
    pub fn check(&self) -> Result<Option<CheckSpec>, StoreError> {
        self.check_spec.as_deref().map(serde_json::from_str).transpose().map_err(|e| self.corrupt("check_spec", e.to_string()))
    }

    /// Converts into the answer's form.
    pub fn into_instance(self) -> Result<Instance, StoreError> {
        let spec = self.spec()?;
        Ok(Instance {
            health: self.effective_health()?,
            output: self.output.clone(),
            maintenance_reason: self.maintenance_reason.clone(),
            index: u64::try_from(self.change_index).unwrap_or_default(),
            registered_at: time(self.registered_at),
            updated_at: time(self.updated_at),
            lease_expires_at: time(self.lease_expires_at),
            id: spec.id,
            service: spec.service,
            address: spec.address,
            port: spec.port,
            tags: spec.tags,
            meta: spec.meta,
            weight: spec.weight,
            zone: spec.zone,
            node: spec.node,
            check: spec.check,
            ttl_s: spec.ttl_s,
        })
    }

    fn corrupt(&self, column: &str, problem: impl Into<String>) -> StoreError {
        StoreError::Corrupt(format!("instance {}: column {column}: {}", self.id, problem.into()))
    }
}

/// A row of `agents`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AgentRow {
    pub node: String,
    pub gossip_addr: String,
    pub http_addr: String,
    pub zone: Option<String>,
    pub ttl_s: i64,
    pub change_index: i64,
    pub updated_at: i64,
    pub lease_expires_at: i64,
    /// When the agent itself last announced (a lease given by the sweeper after a gap is no
    /// renewal).
    pub renewed_at: Option<i64>,
    /// The public key its gossip values are signed with.
    pub signing_key: Option<String>,
}

impl AgentRow {
    /// True while the announcement holds at `now_ms`.
    pub fn alive(&self, now_ms: i64) -> bool {
        self.lease_expires_at > now_ms
    }

    /// Converts into the answer's form.
    pub fn into_info(self, now_ms: i64) -> AgentInfo {
        AgentInfo {
            alive: self.alive(now_ms),
            node: self.node,
            gossip_addr: self.gossip_addr,
            http_addr: self.http_addr,
            zone: self.zone,
            updated_at: time(self.updated_at),
            lease_expires_at: time(self.lease_expires_at),
            renewed_at: self.renewed_at.map(time),
            signing_key: self.signing_key,
        }
    }
}

/// Unix milliseconds as a UTC time (the epoch for a value out of range).
pub fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}
