//! `Meta`: an instance's string pairs, held compactly.
//!
//! An agent keeps every instance of the catalog, so the pairs are a sorted boxed slice: one
//! allocation of exactly the pairs given, where a `BTreeMap` of one pair costs a node of
//! about 540 bytes. On the wire it is a JSON object, as before; a key given twice keeps its
//! last value, as a map does.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// String pairs, sorted by key, each key once.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Meta(Box<[(String, String)]>);

impl Meta {
    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True without pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|i| self.0[i].1.as_str())
    }

    /// The pairs, by key.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl From<BTreeMap<String, String>> for Meta {
    fn from(map: BTreeMap<String, String>) -> Self {
        Meta(map.into_iter().collect())
    }
}

impl FromIterator<(String, String)> for Meta {
    /// Later pairs win over earlier ones with the same key.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        pairs.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

impl<const N: usize> From<[(String, String); N]> for Meta {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Meta {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (String, String)>, fn(&'a (String, String)) -> (&'a String, &'a String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Meta {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(Meta::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn reads_and_writes_a_json_object_sorted_by_key() {
        let meta: Meta = serde_json::from_str(r#"{"b": "2", "a": "1", "b": "3"}"#).expect("an object");
        assert_eq!(meta.len(), 2);
        assert_eq!((meta.get("a"), meta.get("b"), meta.get("c")), (Some("1"), Some("3"), None));
        assert_eq!(serde_json::to_string(&meta).expect("writes"), r#"{"a":"1","b":"3"}"#);
        assert_eq!(format!("{meta:?}"), r#"{"a": "1", "b": "3"}"#);
    }

    #[test]
    fn refuses_what_is_not_an_object_of_strings() {
        for bad in [r#"["a"]"#, r#"{"a": 1}"#, r#""a""#, "null"] {
            assert!(serde_json::from_str::<Meta>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_last_pair_of_a_key_wins_and_order_does_not_matter() {
        let meta = Meta::from([pair("z", "1"), pair("a", "2"), pair("z", "3")]);
        assert_eq!(meta.iter().collect::<Vec<_>>(), [(&"a".to_string(), &"2".to_string()), (&"z".to_string(), &"3".to_string())]);
        assert_eq!(meta, Meta::from([pair("a", "2"), pair("z", "3")]));
    }
}
