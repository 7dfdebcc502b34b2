//! A node's gossip identity: every value a node gossips is signed with its own Ed25519 key,
//! over the cluster, the node's chitchat id (name, generation, gossip address), the key, the
//! value's chitchat version and the payload. The public half reaches the other agents through
//! the registry (the agent's announcement, authenticated by its token), so a peer that holds
//! no node's private key cannot speak for that node: not under its name with another
//! generation or address, not by replaying its values at another version, not by setting a key
//! it never set.
//!
//! A signed value is `SIGNATURE.PAYLOAD`: the 64-byte signature in URL-safe base64 without
//! padding (86 characters), a dot, and the payload as it was.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};

/// Length of the signature part of a value, before the dot.
const SIGNATURE_B64_LEN: usize = 86;
/// What every signed message starts with, so a signature means nothing anywhere else.
const DOMAIN: &[u8] = b"signpost gossip value v1";

/// Whose value it is: the fields of the node's chitchat id, and the cluster.
#[derive(Debug, Clone, Copy)]
pub struct Signer<'a> {
    /// The gossip cluster id.
    pub cluster_id: &'a str,
    /// The node's name.
    pub node: &'a str,
    /// The node's chitchat generation (a new one each start).
    pub generation: u64,
    /// The node's gossip address, as chitchat carries it (`ip:port`).
    pub gossip_addr: &'a str,
}

impl Signer<'_> {
    /// The bytes signed for `key` at `version` holding `payload`: each part length-prefixed,
    /// so that no two different values share a message.
    fn message(&self, key: &str, version: u64, payload: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(DOMAIN.len() + 64 + self.node.len() + key.len() + payload.len());
        for part in [DOMAIN, self.cluster_id.as_bytes(), self.node.as_bytes(), self.gossip_addr.as_bytes(), key.as_bytes()] {
            out.extend_from_slice(&(part.len() as u64).to_be_bytes());
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        out.extend_from_slice(payload.as_bytes());
        out
    }
}

/// Why a signed value or a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// Not `SIGNATURE.PAYLOAD`.
    #[error("the value carries no signature")]
    Unsigned,
    /// The signature does not verify with the node's key.
    #[error("the signature does not verify with the node's key")]
    BadSignature,
    /// A key that is not 32 bytes of URL-safe base64, or not a valid Ed25519 public key.
    #[error("not a node key: {0}")]
    BadKey(String),
}

/// A node's private signing key.
pub struct NodeSigningKey(SigningKey);

impl NodeSigningKey {
    /// A new random key.
    pub fn generate() -> NodeSigningKey {
        NodeSigningKey(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    /// Reads a key written by [`NodeSigningKey::to_base64`].
    pub fn from_base64(text: &str) -> Result<NodeSigningKey, SignError> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|e| SignError::BadKey(e.to_string()))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| SignError::BadKey("a key is 32 bytes".into()))?;
        Ok(NodeSigningKey(SigningKey::from_bytes(&bytes)))
    }

    /// The secret, in URL-safe base64 (for the key file only).
    pub fn to_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0.to_bytes())
    }

    /// The public half, as the registry publishes it.
    pub fn public(&self) -> NodePublicKey {
        NodePublicKey(self.0.verifying_key())
    }

    /// `payload` signed as `signer`'s value of `key` at `version`.
    pub fn sign_value(&self, signer: &Signer<'_>, key: &str, version: u64, payload: &str) -> String {
        let signature = self.0.sign(&signer.message(key, version, payload));
        let mut out = URL_SAFE_NO_PAD.encode(signature.to_bytes());
        out.push('.');
        out.push_str(payload);
        out
    }
}

impl std::fmt::Debug for NodeSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeSigningKey({})", self.public())
    }
}

/// A node's public key, as the registry publishes it (`signing_key` of an agent).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NodePublicKey(VerifyingKey);

impl NodePublicKey {
    /// Reads a public key (URL-safe base64 of 32 bytes, a valid Ed25519 point).
    pub fn parse(text: &str) -> Result<NodePublicKey, SignError> {
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|e| SignError::BadKey(e.to_string()))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| SignError::BadKey("a key is 32 bytes".into()))?;
        VerifyingKey::from_bytes(&bytes).map(NodePublicKey).map_err(|e| SignError::BadKey(e.to_string()))
    }

    /// The payload of `value` if it is `signer`'s value of `key` at `version`, signed with
    /// this key.
    pub fn open_value<'v>(&self, signer: &Signer<'_>, key: &str, version: u64, value: &'v str) -> Result<&'v str, SignError> {
        let (signature, payload) = split(value).ok_or(SignError::Unsigned)?;
        let mut bytes = [0u8; 64];
        match URL_SAFE_NO_PAD.decode_slice(signature, &mut bytes) {
            Ok(64) => {}
            _ => return Err(SignError::Unsigned),
        }
        let signature = Signature::from_bytes(&bytes);
        self.0.verify(&signer.message(key, version, payload), &signature).map_err(|_| SignError::BadSignature)?;
        Ok(payload)
    }
}

impl std::fmt::Display for NodePublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0.to_bytes()))
    }
}

impl std::fmt::Debug for NodePublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodePublicKey({self})")
    }
}

/// `SIGNATURE.PAYLOAD` split, without verifying (for a value already verified on its way in).
pub fn split(value: &str) -> Option<(&str, &str)> {
    let signature = value.get(..SIGNATURE_B64_LEN)?;
    let payload = value.get(SIGNATURE_B64_LEN..)?.strip_prefix('.')?;
    Some((signature, payload))
}

/// The payload of a value already verified (what follows the signature).
pub fn payload(value: &str) -> Option<&str> {
    split(value).map(|(_, payload)| payload)
}

/// Checks a public key's text, for the registry's validation of an announcement.
pub fn check_public_key(text: &str) -> Result<(), String> {
    NodePublicKey::parse(text).map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(generation: u64) -> Signer<'static> {
        Signer { cluster_id: "signpost", node: "node-a", generation, gossip_addr: "10.0.0.1:7302" }
    }

    #[test]
    fn a_signed_value_opens_only_as_it_was_signed() {
        let key = NodeSigningKey::generate();
        let public = NodePublicKey::parse(&key.public().to_string()).expect("the public key reads back");
        let value = key.sign_value(&signer(7), "inst:web-1", 5, "{\"v\":1}");
        assert_eq!(public.open_value(&signer(7), "inst:web-1", 5, &value), Ok("{\"v\":1}"));
        assert_eq!(payload(&value), Some("{\"v\":1}"));
        // Each part of the context is bound.
        assert_eq!(public.open_value(&signer(8), "inst:web-1", 5, &value), Err(SignError::BadSignature), "another generation");
        assert_eq!(public.open_value(&signer(7), "inst:web-1", 6, &value), Err(SignError::BadSignature), "another version");
        assert_eq!(public.open_value(&signer(7), "inst:web-2", 5, &value), Err(SignError::BadSignature), "another key");
        let other_addr = Signer { gossip_addr: "6.6.6.6:7302", ..signer(7) };
        assert_eq!(public.open_value(&other_addr, "inst:web-1", 5, &value), Err(SignError::BadSignature), "another address");
        let other_node = Signer { node: "node-b", ..signer(7) };
        assert_eq!(public.open_value(&other_node, "inst:web-1", 5, &value), Err(SignError::BadSignature), "another node");
        let other_cluster = Signer { cluster_id: "other", ..signer(7) };
        assert_eq!(public.open_value(&other_cluster, "inst:web-1", 5, &value), Err(SignError::BadSignature), "another cluster");
        let changed = value.replace("\"v\":1", "\"v\":2");
        assert_eq!(public.open_value(&signer(7), "inst:web-1", 5, &changed), Err(SignError::BadSignature), "another payload");
        let stranger = NodeSigningKey::generate().public();
        assert_eq!(stranger.open_value(&signer(7), "inst:web-1", 5, &value), Err(SignError::BadSignature), "another key pair");
    }

    #[test]
    fn unsigned_and_malformed_values_and_keys_are_refused() {
        let public = NodeSigningKey::generate().public();
        for value in ["", "{\"v\":1}", ".{}", &format!("{}.x", "A".repeat(85)), &format!("{}x", "A".repeat(86)), "é".repeat(60).as_str()] {
            assert_eq!(public.open_value(&signer(1), "k", 1, value), Err(SignError::Unsigned), "{value:?}");
        }
        for key in ["", "AAAA", "not base64!", &"A".repeat(44)] {
            assert!(NodePublicKey::parse(key).is_err(), "{key:?}");
        }
        let key = NodeSigningKey::generate();
        let again = NodeSigningKey::from_base64(&key.to_base64()).expect("the secret reads back");
        assert_eq!(again.public(), key.public());
    }
}
