//! Remote control from the cloud: signed configuration and device commands.
//!
//! A signed configuration is published on `config/set` as [`ConfigSet`]
//! (`{"version":N,"toml":TEXT,"sig":B64}`). `sig` is the standard-base64 ed25519 signature over
//! [`signing_message`]: the UTF-8 bytes `floorgate-config/v1\n{version}\n{toml}`.

use base64::Engine as _;
use ed25519_dalek::Signer as _;

/// Domain-separation prefix of the signed configuration message.
pub const SIGNING_CONTEXT: &str = "floorgate-config/v1";

/// Decodes `uplink.config_public_key` (base64 of a 32-byte ed25519 key).
pub fn decode_public_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{} bytes, expected 32", bytes.len()))
}

/// The payload of `config/set`: a configuration version, its TOML text and the signature.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigSet {
    /// Configuration version; the gateway applies only versions newer than its own.
    pub version: u64,
    /// The complete TOML text.
    pub toml: String,
    /// Base64 ed25519 signature over [`signing_message`]; absent in unsigned pushes, which the
    /// gateway rejects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl ConfigSet {
    /// A signed `config/set` payload.
    pub fn signed(key: &ed25519_dalek::SigningKey, version: u64, toml: &str) -> ConfigSet {
        ConfigSet {
            version,
            toml: toml.to_string(),
            sig: Some(sign(key, version, toml)),
        }
    }

    /// Checks the signature against `public`; an absent signature is an error.
    pub fn verify(&self, public: &[u8; 32]) -> Result<(), String> {
        match &self.sig {
            Some(sig) => verify(public, self.version, &self.toml, sig),
            None => Err("unsigned configuration".into()),
        }
    }
}

/// The bytes that are signed: `floorgate-config/v1\n{version}\n{toml}`.
pub fn signing_message(version: u64, toml: &str) -> Vec<u8> {
    format!("{SIGNING_CONTEXT}\n{version}\n{toml}").into_bytes()
}

/// Signs a configuration; returns the signature as standard base64.
pub fn sign(key: &ed25519_dalek::SigningKey, version: u64, toml: &str) -> String {
    let sig = key.sign(&signing_message(version, toml));
    base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
}

/// Verifies a base64 signature of a configuration with a 32-byte ed25519 public key.
pub fn verify(public: &[u8; 32], version: u64, toml: &str, sig_b64: &str) -> Result<(), String> {
    let key = ed25519_dalek::VerifyingKey::from_bytes(public)
        .map_err(|e| format!("bad public key: {e}"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sig_b64.trim())
        .map_err(|e| format!("signature is not base64: {e}"))?;
    let sig = ed25519_dalek::Signature::from_slice(&bytes)
        .map_err(|_| format!("signature has {} bytes, expected 64", bytes.len()))?;
    key.verify_strict(&signing_message(version, toml), &sig)
        .map_err(|_| "signature does not match".to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    /// RFC 8032 section 7.1, test 1: secret key (seed) and public key.
    const SEED_HEX: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const PUBLIC_HEX: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&hex(SEED_HEX).try_into().unwrap())
    }

    fn public() -> [u8; 32] {
        key().verifying_key().to_bytes()
    }

    #[test]
    fn message_format_is_pinned() {
        assert_eq!(
            signing_message(7, "[gateway]\nid = \"a\"\n"),
            b"floorgate-config/v1\n7\n[gateway]\nid = \"a\"\n".to_vec()
        );
    }

    #[test]
    fn sign_verify_round_trip() {
        let toml = "[gateway]\nid = \"gw-1\"\n";
        let sig = sign(&key(), 3, toml);
        verify(&public(), 3, toml, &sig).unwrap();
        let set = ConfigSet::signed(&key(), 3, toml);
        set.verify(&public()).unwrap();
        let json = serde_json::to_string(&set).unwrap();
        let back: ConfigSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back, set);
    }

    #[test]
    fn changed_toml_or_version_fails() {
        let toml = "[gateway]\nid = \"gw-1\"\n";
        let sig = sign(&key(), 3, toml);
        assert!(verify(&public(), 4, toml, &sig).is_err());
        assert!(verify(&public(), 3, "[gateway]\nid = \"gw-2\"\n", &sig).is_err());
        let other = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        assert!(verify(&other.verifying_key().to_bytes(), 3, toml, &sig).is_err());
    }

    #[test]
    fn bad_base64_or_length_fails() {
        let e = verify(&public(), 1, "x", "not base64!!").unwrap_err();
        assert!(e.contains("not base64"), "{e}");
        let e = verify(&public(), 1, "x", &B64.encode([0u8; 10])).unwrap_err();
        assert!(e.contains("expected 64"), "{e}");
    }

    #[test]
    fn unsigned_config_set_is_represented_and_fails() {
        let set: ConfigSet = serde_json::from_str(r#"{"version":2,"toml":"x"}"#).unwrap();
        assert_eq!(set.sig, None);
        assert_eq!(
            serde_json::to_string(&set).unwrap(),
            r#"{"version":2,"toml":"x"}"#
        );
        assert!(set.verify(&public()).is_err());
    }

    /// Pins the format: a known seed gives a known public key and (ed25519 being deterministic)
    /// a known signature. The signature was cross-checked with OpenSSL
    /// (`openssl pkeyutl -sign -rawin`) over the same message, independent of this code.
    #[test]
    fn fixed_test_vector() {
        assert_eq!(public().to_vec(), hex(PUBLIC_HEX));
        assert_eq!(
            B64.encode(public()),
            "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
        );
        assert_eq!(
            decode_public_key("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=").unwrap(),
            public()
        );
        let toml = "[gateway]\nid = \"gw-1\"\nsite = \"north\"\n";
        let sig = sign(&key(), 42, toml);
        assert_eq!(
            sig,
            "QSW5BHq+x87maLmnLLzJ36RQH2azd4bZ5JY5UNDa5yYFBBUKaJIAG5+0lqcqBqNq3Gfi7gkMoqOcHQ2mHrimAg=="
        );
        verify(&public(), 42, toml, &sig).unwrap();
    }
}
