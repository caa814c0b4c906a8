//! Remote control from the cloud: signed configuration and device commands.

use base64::Engine as _;

/// Decodes `uplink.config_public_key` (base64 of a 32-byte ed25519 key).
pub fn decode_public_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{} bytes, expected 32", bytes.len()))
}
