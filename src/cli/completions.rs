//! `floorgate completions <SHELL>` and `floorgate man`: shell completions and the manual page,
//! generated from the command-line definition (the Debian package ships both).

use super::{Cli, Failure};
use clap::CommandFactory;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;
use std::io::Write;

/// Shells with a completion script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Shell {
    /// Bash.
    Bash,
    /// Zsh.
    Zsh,
    /// Fish.
    Fish,
}

/// `floorgate completions` arguments.
#[derive(Debug, clap::Args)]
pub(super) struct CompletionsArgs {
    /// Shell to print the completion script for.
    #[arg(value_enum)]
    shell: Shell,
}

/// Prints the completion script of a shell to stdout.
pub(super) fn completions(args: CompletionsArgs) -> Result<(), Failure> {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "floorgate", &mut out);
    write_stdout(&out)
}

/// Prints the manual page (roff, section 1) to stdout.
pub(super) fn man() -> Result<(), Failure> {
    let out = render_man().map_err(|e| Failure::new(format!("cannot render the manual: {e}")))?;
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::new(format!("cannot write to stdout: {e}")))
}

/// One self-contained page: the top-level sections, then every visible subcommand with its own
/// synopsis and options (no separate `floorgate-run(1)` pages to install and keep in step).
fn render_man() -> std::io::Result<Vec<u8>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let page = Man::new(cmd.clone());
    let mut out = Vec::new();
    page.render_title(&mut out)?;
    page.render_name_section(&mut out)?;
    page.render_synopsis_section(&mut out)?;
    page.render_description_section(&mut out)?;
    page.render_options_section(&mut out)?;

    let mut heading = Roff::new();
    heading.control("SH", ["COMMANDS"]);
    heading.text([roman(
        "The options above apply to every command; each command also takes -h/--help.",
    )]);
    heading.to_writer(&mut out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_command(sub, &mut out)?;
    }

    let mut tail = Roff::new();
    for (title, items) in EXTRA_SECTIONS {
        tail.control("SH", [*title]);
        for (term, text) in *items {
            tail.control("TP", []);
            tail.text([bold(*term)]);
            tail.text([roman(*text)]);
        }
    }
    tail.to_writer(&mut out)?;
    page.render_version_section(&mut out)?;
    Ok(single_preamble(&String::from_utf8_lossy(&out)).into_bytes())
}

/// A subcommand as a subsection: usage, description and its own options (global options and
/// `--help` are described once at the top); nested subcommands follow.
fn render_command(cmd: &clap::Command, out: &mut Vec<u8>) -> std::io::Result<()> {
    let name = cmd.get_bin_name().unwrap_or_else(|| cmd.get_name());
    let mut head = Roff::new();
    head.control("SS", [name]);
    head.to_writer(out)?;
    let own = cmd.clone().mut_args(|a| {
        if a.is_global_set() || a.get_id() == "help" {
            a.hide(true)
        } else {
            a
        }
    });
    let page = Man::new(own);
    if cmd.has_subcommands() {
        out.extend(section_body(|w| page.render_description_section(w))?);
    } else {
        out.extend(section_body(|w| page.render_synopsis_section(w))?);
        out.extend(section_body(|w| page.render_description_section(w))?);
        out.extend(section_body(|w| page.render_options_section(w))?);
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_command(sub, out)?;
    }
    Ok(())
}

/// Renders one section of a subcommand's page with its `.SH` heading turned into a paragraph
/// break, so that it nests under the command's `.SS`.
fn section_body(
    render: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    render(&mut buf)?;
    let mut kept = String::new();
    for line in String::from_utf8_lossy(&buf).lines() {
        if line.starts_with(".SH ") {
            kept.push_str(".PP\n");
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    Ok(kept.into_bytes())
}

/// The roff writer starts every piece with the definition of the apostrophe string (`Aq`); the
/// page keeps one, right after `.TH`, so that it starts with the `.TH` header.
fn single_preamble(page: &str) -> String {
    let is_preamble = |l: &str| l.starts_with(".ie \\n(.g .ds Aq") || l.starts_with(".el .ds Aq");
    let preamble: Vec<&str> = page.lines().filter(|l| is_preamble(l)).take(2).collect();
    let mut out = String::with_capacity(page.len());
    for line in page.lines().filter(|l| !is_preamble(l)) {
        out.push_str(line);
        out.push('\n');
        if line.starts_with(".TH ") {
            for p in &preamble {
                out.push_str(p);
                out.push('\n');
            }
        }
    }
    out
}

type Items = &'static [(&'static str, &'static str)];

const EXTRA_SECTIONS: &[(&str, Items)] = &[
    (
        "EXIT STATUS",
        &[
            (
                "0",
                "Success; after SIGTERM the daemon exits 0 once it has committed and flushed.",
            ),
            (
                "78",
                "Invalid configuration or unusable TLS files (EX_CONFIG). The systemd unit does \
                 not restart on it.",
            ),
            (
                "other",
                "Any other failure, with a one-line cause on stderr.",
            ),
        ],
    ),
    (
        "SIGNALS",
        &[
            (
                "SIGTERM, SIGINT",
                "Stop polling, commit what was read, let the uplink drain for up to 5 s, flush, \
                 exit.",
            ),
            (
                "SIGHUP",
                "Reload the configuration. A valid one replaces the pipeline without touching the \
                 store; an invalid one is logged and the running configuration stays.",
            ),
        ],
    ),
    (
        "ENVIRONMENT",
        &[
            (
                "FLOORGATE_CONFIG",
                "Configuration file when --config is not given.",
            ),
            ("FLOORGATE_LOG", "Log filter, e.g. floorgate=debug."),
        ],
    ),
    (
        "FILES",
        &[
            (
                "/etc/floorgate/floorgate.toml",
                "Configuration (default path).",
            ),
            (
                "/etc/floorgate/profiles/",
                "Device profiles included by the example configuration.",
            ),
            (
                "/var/lib/floorgate/",
                "State directory: the event store and the applied configurations.",
            ),
            ("/lib/systemd/system/floorgate.service", "The systemd unit."),
            (
                "/usr/share/doc/floorgate/floorgate.example.toml",
                "Every configuration key with its default.",
            ),
        ],
    ),
];

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn man_page_has_every_visible_command_once() {
        let page = String::from_utf8(render_man().unwrap()).unwrap();
        assert!(page.starts_with(".TH floorgate 1"), "{page}");
        assert_eq!(page.matches(".TH ").count(), 1);
        assert_eq!(page.matches(".ds Aq").count(), 2, "one apostrophe preamble");
        for name in ["run", "demo", "simulate", "config", "config validate"] {
            assert!(
                page.contains(&format!(".SS \"floorgate {name}\"\n")),
                "{name}: {page}"
            );
        }
        // Hidden plumbing commands stay out of the page.
        assert!(!page.contains("floorgate completions"));
        assert!(!page.contains("floorgate man"));
    }
}
