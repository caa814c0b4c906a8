//! Packaging: completions and man page from the binary; the systemd unit, Cross.toml and the
//! Debian package metadata say what the field installation needs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn floorgate_stdout(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "floorgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_cover_the_commands_for_each_shell() {
    let bash = floorgate_stdout(&["completions", "bash"]);
    assert!(bash.contains("floorgate"), "{bash}");
    assert!(bash.contains("demo"), "{bash}");
    assert!(
        bash.contains("complete "),
        "not a bash completion script: {bash}"
    );
    for shell in ["zsh", "fish"] {
        let script = floorgate_stdout(&["completions", shell]);
        assert!(
            script.contains("floorgate") && script.contains("demo"),
            "{shell}"
        );
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn man_page_is_roff_with_every_command() {
    let page = floorgate_stdout(&["man"]);
    assert!(
        page.starts_with(".TH "),
        "no roff header: {}",
        &page[..80.min(page.len())]
    );
    assert!(page.contains(".SH NAME"));
    for section in [
        ".SH SYNOPSIS",
        ".SH COMMANDS",
        ".SH \"EXIT STATUS\"",
        ".SH FILES",
    ] {
        assert!(page.contains(section), "{section} missing");
    }
    for command in [
        "floorgate run",
        "floorgate demo",
        "floorgate config validate",
    ] {
        assert!(
            page.contains(&format!(".SS \"{command}\"")),
            "{command} missing"
        );
    }
}

#[test]
fn systemd_unit_is_notify_with_watchdog_and_no_restart_on_config_errors() {
    let unit = read("systemd/floorgate.service");
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let has = |key: &str, value: &str| settings.iter().any(|&(k, v)| k == key && v == value);
    assert!(has("Type", "notify"));
    assert!(settings.iter().any(|&(k, _)| k == "WatchdogSec"));
    assert!(has("RestartPreventExitStatus", "78"));
    assert!(has("Restart", "on-failure"));
    assert!(has(
        "ExecStart",
        "/usr/bin/floorgate run --config /etc/floorgate/floorgate.toml"
    ));
    assert!(has("ExecReload", "/bin/kill -HUP $MAINPID"));
    assert!(has("User", "floorgate"));
    assert!(has("SupplementaryGroups", "dialout"));
    assert!(has("StateDirectory", "floorgate"));
    // ProtectClock=yes blocks adjtimex()/clock_adjtime() even for reading, and every event would
    // then carry "clock":"unsynced"; the unit allows the calls, without CAP_SYS_TIME.
    assert!(!has("ProtectClock", "yes"));
    assert!(settings
        .iter()
        .any(|&(k, v)| k == "SystemCallFilter" && v.split(' ').any(|c| c == "clock_adjtime")));
    // The daemon's exit code for configuration errors is the one systemd must not restart on.
    assert_eq!(floorgate::cli::EX_CONFIG, 78);
}

#[test]
fn cross_toml_has_both_arm_targets() {
    let cross: toml::Table = toml::from_str(&read("Cross.toml")).unwrap();
    let targets = cross["target"].as_table().unwrap();
    for triple in ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"] {
        assert!(targets.contains_key(triple), "{triple} missing");
    }
}

#[test]
fn debian_metadata_installs_binary_unit_config_profiles_man_and_completions() {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let deb = manifest["package"]["metadata"]["deb"].as_table().unwrap();
    let assets: Vec<(String, String)> = deb["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            (
                a[0].as_str().unwrap().to_string(),
                a[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let installs = |src: &str, dest: &str| assets.iter().any(|(s, d)| s == src && d == dest);
    assert!(installs("target/release/floorgate", "usr/bin/"));
    assert!(installs(
        "config/floorgate.example.toml",
        "etc/floorgate/floorgate.toml"
    ));
    assert!(installs(
        "config/floorgate.example.toml",
        "usr/share/doc/floorgate/"
    ));
    assert!(installs(
        "config/profiles/*.toml",
        "etc/floorgate/profiles/"
    ));
    assert!(assets.iter().any(|(_, d)| d == "usr/share/man/man1/"));
    for dest in ["bash-completion", "zsh", "fish"] {
        assert!(assets.iter().any(|(_, d)| d.contains(dest)), "{dest}");
    }
    // Every listed source that is not a build product exists.
    for (src, _) in &assets {
        if !src.starts_with("target/") {
            let matches = glob::glob(root().join(src).to_str().unwrap())
                .unwrap()
                .count();
            assert!(matches > 0, "asset {src} matches no file");
        }
    }
    // The unit is installed (and its maintainer-script snippets generated) by systemd-units from
    // the directory holding systemd/floorgate.service.
    let units = deb["systemd-units"].as_table().unwrap();
    let dir = units["unit-scripts"].as_str().unwrap();
    assert!(Path::new(&root().join(dir))
        .join("floorgate.service")
        .is_file());
    assert_eq!(units["enable"].as_bool(), Some(false));
    let scripts = deb["maintainer-scripts"].as_str().unwrap();
    for script in ["postinst", "postrm"] {
        let text = read(&format!("{}/{script}", scripts.trim_end_matches('/')));
        assert!(text.contains("#DEBHELPER#"), "{script} lacks #DEBHELPER#");
    }
    assert!(read("debian/postinst").contains("adduser --system"));
}
