//! Reads a page of the registry's catalog feed (`GET /v1/catalog`, the contract's
//! `CatalogPage`) into the cache's shared instances: each instance is decoded, and when the
//! registry view the agent already holds has it unchanged, that one is kept and the decoded
//! copy dropped at once. A page thus costs memory for what changed, not a second catalog.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use chrono::Utc;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use signpost_shared::model::Instance;
use signpost_shared::wire::AgentInfo;

use crate::cache::RegistryView;

/// Decodes a page against `held`, the registry view the agent holds.
pub struct PageSeed<'a> {
    /// What the agent holds; its unchanged instances are reused.
    pub held: &'a RegistryView,
}

impl<'de> DeserializeSeed<'de> for PageSeed<'_> {
    type Value = RegistryView;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RegistryView, D::Error> {
        deserializer.deserialize_map(PageVisitor { held: self.held })
    }
}

struct PageVisitor<'a> {
    held: &'a RegistryView,
}

/// The page's fields; others are skipped, as a `CatalogPage` would.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Index,
    Epoch,
    SelfPreservation,
    Instances,
    Agents,
    #[serde(other)]
    Other,
}

impl<'de> Visitor<'de> for PageVisitor<'_> {
    type Value = RegistryView;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a catalog page")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RegistryView, A::Error> {
        use serde::de::Error;
        let (mut index, mut self_preservation, mut instances, mut agents) = (None, None, None, None);
        let mut epoch = 0;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Index => index = Some(map.next_value::<u64>()?),
                Field::Epoch => epoch = map.next_value::<u64>()?,
                Field::SelfPreservation => self_preservation = Some(map.next_value::<bool>()?),
                Field::Instances => instances = Some(map.next_value_seed(InstancesSeed { held: self.held })?),
                Field::Agents => agents = Some(map.next_value::<Vec<AgentInfo>>()?),
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(RegistryView {
            index: index.ok_or_else(|| A::Error::missing_field("index"))?,
            epoch,
            self_preservation: self_preservation.ok_or_else(|| A::Error::missing_field("self_preservation"))?,
            instances: instances.ok_or_else(|| A::Error::missing_field("instances"))?,
            agents: agents.ok_or_else(|| A::Error::missing_field("agents"))?,
            confirmed_at: Some(Utc::now()),
        })
    }
}

struct InstancesSeed<'a> {
    held: &'a RegistryView,
}

impl<'de> DeserializeSeed<'de> for InstancesSeed<'_> {
    type Value = Vec<Arc<Instance>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InstancesSeed<'_> {
    type Value = Vec<Arc<Instance>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of instances")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let held: HashMap<&str, &Arc<Instance>> = self.held.instances.iter().map(|i| (i.id.as_str(), i)).collect();
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(held.len()).min(1 << 20));
        while let Some(instance) = seq.next_element::<Instance>()? {
            match held.get(instance.id.as_str()) {
                Some(same) if ***same == instance => out.push(Arc::clone(same)),
                _ => out.push(Arc::new(instance)),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, port: u16) -> serde_json::Value {
        serde_json::json!({
            "id": id, "service": "web", "address": "10.0.0.1", "port": port, "tags": ["a"], "meta": {"k": "v"},
            "weight": 100, "zone": null, "health": "passing", "output": null, "maintenance_reason": null,
            "node": null, "check": null, "ttl_s": 30, "index": 7,
            "registered_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:01Z", "lease_expires_at": "2026-01-01T00:00:31Z"
        })
    }

    fn read(page: &serde_json::Value, held: &RegistryView) -> RegistryView {
        let text = page.to_string();
        let mut deserializer = serde_json::Deserializer::from_str(&text);
        PageSeed { held }.deserialize(&mut deserializer).expect("a page")
    }

    #[test]
    fn test_unchanged_instances_are_kept_not_copied() {
        let first = read(
            &serde_json::json!({"index": 1, "self_preservation": false, "instances": [instance("a", 80), instance("b", 81)], "agents": []}),
            &RegistryView::default(),
        );
        assert_eq!(first.index, 1);
        assert_eq!(first.instances.len(), 2);
        let second = read(
            &serde_json::json!({"index": 2, "self_preservation": true, "instances": [instance("a", 80), instance("b", 82)], "agents": [], "new_field": 1}),
            &first,
        );
        assert!(second.self_preservation);
        assert!(Arc::ptr_eq(&first.instances[0], &second.instances[0]), "a is the same: kept");
        assert_eq!(second.instances[1].port, 82, "b changed: the new one");
        let missing = serde_json::json!({"index": 3, "instances": [], "agents": []}).to_string();
        let error = PageSeed { held: &second }.deserialize(&mut serde_json::Deserializer::from_str(&missing)).err();
        assert!(error.is_some_and(|e| e.to_string().contains("self_preservation")));
    }
}
