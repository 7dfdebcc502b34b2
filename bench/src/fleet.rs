//! The benchmark's fleet: how seeded and new instances are named, spread over services of
//! `per_service` instances, and what their registration bodies hold. Seed, heartbeat and
//! lookup agree on these names, so they must run with the same `--prefix`, `--instances` and
//! `--per-service`.

use std::collections::BTreeMap;

use serde::Serialize;

/// The seeded part of the fleet.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Start of every id and service name (lower case letters, digits and `-`).
    pub prefix: String,
    /// How many instances are seeded.
    pub instances: u64,
    /// Instances per service.
    pub per_service: u64,
}

impl Fleet {
    /// The id of seeded instance `n` (`0..instances`).
    pub fn instance_id(&self, n: u64) -> String {
        format!("{}-{n:06}", self.prefix)
    }

    /// The service of seeded instance `n`.
    pub fn service_of(&self, n: u64) -> String {
        self.service(n / self.per_service)
    }

    /// The name of seeded service `s` (`0..services()`).
    pub fn service(&self, s: u64) -> String {
        format!("{}-svc-{s:05}", self.prefix)
    }

    /// How many services the seeded instances are spread over.
    pub fn services(&self) -> u64 {
        self.instances.div_ceil(self.per_service)
    }

    /// How many instances seeded service `s` holds (the last one may hold fewer).
    pub fn instances_in_service(&self, s: u64) -> u64 {
        self.instances.saturating_sub(s * self.per_service).min(self.per_service)
    }

    /// The id of new instance `n` of a `register` run tagged `run`.
    pub fn new_instance_id(&self, run: &str, n: u64) -> String {
        format!("{}-r{run}-{n:07}", self.prefix)
    }

    /// The service of new instance `n` of a `register` run tagged `run`.
    pub fn new_service_of(&self, run: &str, n: u64) -> String {
        format!("{}-r{run}-{:05}", self.prefix, n / self.per_service)
    }
}

/// A `POST /v1/instances` body; both registries accept it as it is.
#[derive(Debug, Serialize)]
pub struct Registration {
    id: String,
    service: String,
    address: String,
    port: u16,
    tags: [&'static str; 1],
    meta: BTreeMap<&'static str, String>,
    ttl_s: u32,
}

impl Registration {
    /// The body registering instance number `n` as `id` in `service`. The address is a
    /// loopback one: nothing ever connects to it (the instance declares no check).
    pub fn new(id: String, service: String, n: u64, ttl_s: u32) -> Self {
        let address = format!("127.0.{}.{}", (n / 250) % 250, n % 250 + 1);
        // Stays within 8000..=8999, so the conversion cannot fail.
        let port = u16::try_from(8000 + n % 1000).unwrap_or(8000);
        let meta = BTreeMap::from([("seq", n.to_string())]);
        Registration { id, service, address, port, tags: ["bench"], meta, ttl_s }
    }
}

/// A short tag that makes a `register` run's ids new: the current unix time in base 36.
pub fn run_tag() -> String {
    let mut secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut tag = Vec::new();
    loop {
        let digit = u8::try_from(secs % 36).unwrap_or(0);
        tag.push(if digit < 10 { b'0' + digit } else { b'a' + digit - 10 });
        secs /= 36;
        if secs == 0 {
            break;
        }
    }
    tag.reverse();
    String::from_utf8(tag).unwrap_or_default()
}

/// Whether `text` is a DNS label as the registry wants service names.
pub fn is_dns_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    let inner_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (1..=63).contains(&bytes.len()) && bytes.iter().all(inner_ok) && edge_ok(bytes.first()) && edge_ok(bytes.last())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        Fleet { prefix: "bench".into(), instances: 10_005, per_service: 10 }
    }

    #[test]
    fn names_are_valid_for_the_registry() {
        let fleet = fleet();
        let tag = run_tag();
        for name in [fleet.service_of(0), fleet.service_of(10_004), fleet.new_service_of(&tag, 9_999_999)] {
            assert!(is_dns_label(&name), "{name}");
        }
        assert_eq!(fleet.instance_id(42), "bench-000042");
        assert!(fleet.new_instance_id(&tag, 1).len() <= 128);
    }

    #[test]
    fn services_hold_per_service_instances() {
        let fleet = fleet();
        assert_eq!(fleet.services(), 1_001);
        assert_eq!(fleet.service_of(9), fleet.service(0));
        assert_eq!(fleet.service_of(10), fleet.service(1));
        assert_eq!(fleet.instances_in_service(0), 10);
        assert_eq!(fleet.instances_in_service(1_000), 5);
    }

    #[test]
    fn registration_fields_stay_in_range() {
        let body = serde_json::to_value(Registration::new("a".into(), "b".into(), 123_456_789, 3600)).expect("serializes");
        assert_eq!(body["port"], 8789);
        assert_eq!(body["address"], "127.0.77.40");
        assert_eq!(body["meta"]["seq"], "123456789");
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("A"));
        assert!(!is_dns_label(""));
    }
}
