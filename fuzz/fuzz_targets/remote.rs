//! Fuzz target: remote config and command payloads are parsed and checked without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = serde_json::from_slice::<floorgate::remote::ConfigSet>(data) {
        let _ = floorgate::remote::verify_signature(&[7u8; 32], &set);
        let _ = floorgate::config::parse_str(&set.toml, std::path::Path::new("/nonexistent/f.toml"));
    }
    if let Ok(cmd) = serde_json::from_slice::<floorgate::remote::Command>(data) {
        let cfg = floorgate::config::parse_str(
            "[gateway]\nid = \"f\"\n[profiles.p]\n[[profiles.p.points]]\nname = \"x\"\ntable = \"holding\"\naddress = 0\ntype = \"i32\"\nscale = 0.5\nwritable = true\nmin = -10\nmax = 10\n[[bus]]\nname = \"b\"\ntcp = { address = \"127.0.0.1:1\" }\n[[device]]\nname = \"d\"\nbus = \"b\"\nunit = 1\nprofile = \"p\"\n",
            std::path::Path::new("/nonexistent/f.toml"),
        )
        .expect("fixed config");
        let _ = floorgate::remote::check_command(&cfg, &cmd);
    }
});
