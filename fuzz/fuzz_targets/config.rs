//! Fuzz target: any text given to the configuration loader yields a Config or located errors.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let path = std::path::Path::new("/nonexistent/fuzz.toml");
        match floorgate::config::parse_str(text, path) {
            Ok(_) => {}
            Err(e) => assert!(!e.0.is_empty()),
        }
        let _ = floorgate::config::parse_overlay(text, path);
    }
});
