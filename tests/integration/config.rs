//! Configuration: the shipped example loads; bad files report every problem with its location.

use std::path::Path;
use std::process::Command;

fn floorgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_floorgate"))
}

#[test]
fn shipped_example_config_loads_with_its_profiles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = floorgate::config::load(&root.join("config/floorgate.example.toml"))
        .expect("example config is valid");
    assert!(cfg.profiles.contains_key("bag_dispenser"));
    let cab = &cfg.profiles["charging_cabinet"];
    assert!(cab
        .points
        .iter()
        .any(|p| p.name == "slot12.present" && p.address == 144 && p.bit == Some(0)));
    assert_eq!(
        cfg.uplink.as_ref().map(|u| u.topic_prefix.as_str()),
        Some("floorgate/st-mary/floor-3-west")
    );
}

#[test]
fn invalid_config_reports_every_problem_at_once_with_file_line_col_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[gateway]
id = "gw1"
state_dir = "/tmp/x"

[store]
max_bytes = "12 parsecs"

[[bus]]
name = "a"
rtu = { port = "/dev/null", baud = 1234 }
colour = "blue"

[[device]]
name = "d1"
bus = "nope"
unit = 300
profile = "ghost"

[profiles.p]
[[profiles.p.points]]
name = "x"
table = "holding"
address = 0
type = "u32"
[[profiles.p.points]]
name = "y"
table = "holding"
address = 1
type = "u16"
"#,
    )
    .unwrap();
    let out = floorgate()
        .args(["config", "validate"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    for (line, needle) in [
        (6, "invalid size unit"),
        (11, "unknown field `colour`"),
        (15, "unknown bus \"nope\""),
        (16, "unit must be between 1 and 247"),
        (17, "unknown profile \"ghost\""),
        (26, "overlaps point \"x\""),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("{file}:{line}:")) && l.contains(needle)),
            "missing `{needle}` at line {line} in:\n{err}"
        );
    }
}

#[test]
fn plaintext_uplink_is_refused_unless_allowed() {
    let base = "[gateway]\nid = \"gw\"\n[uplink]\nurl = \"mqtt://127.0.0.1:1883\"\n";
    let err = floorgate::config::parse_str(base, Path::new("p.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("p.toml:4:7: plaintext mqtt:// is refused"),
        "{err}"
    );
    let ok = format!("{base}allow_plaintext = true\n");
    assert!(floorgate::config::parse_str(&ok, Path::new("p.toml")).is_ok());
}

#[test]
fn syntax_errors_are_located() {
    let err = floorgate::config::parse_str("[gateway\nid = 1\n", Path::new("s.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("s.toml:1:"), "{err}");
}
