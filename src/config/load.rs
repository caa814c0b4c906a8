//! Reading configuration files: TOML syntax, per-section deserialisation, `include` of profile files.
//! Each section and each array element is deserialised on its own so that one bad entry does not
//! hide the problems of the others.

use super::raw::{RawBus, RawDevice, RawGateway, RawMetrics, RawProfile, RawStore, RawUplink};
use super::{validate, Config, ConfigError, ConfigErrors};
use serde::de::DeserializeOwned;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// Source texts and the problems found in them.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    files: Vec<(PathBuf, String)>,
    pub(crate) errors: Vec<ConfigError>,
}

/// Index of a file in [`Sources`].
pub(crate) type FileId = usize;

impl Sources {
    fn add(&mut self, path: PathBuf, text: String) -> FileId {
        self.files.push((path, text));
        self.files.len() - 1
    }

    /// Records a problem at a byte span of a file.
    pub(crate) fn error(
        &mut self,
        file: FileId,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) {
        let (path, text) = &self.files[file];
        let (line, col) = match span {
            Some(span) => line_col(text, span.start),
            None => (0, 0),
        };
        self.errors.push(ConfigError {
            file: path.clone(),
            line,
            col,
            message: message.into(),
        });
    }

    pub(crate) fn path(&self, file: FileId) -> &Path {
        &self.files[file].0
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The sections of one configuration, as written, with the file each came from.
#[derive(Debug, Default)]
pub(crate) struct RawConfig {
    pub(crate) main: FileId,
    pub(crate) gateway: Option<Spanned<RawGateway>>,
    pub(crate) store: Option<RawStore>,
    pub(crate) uplink: Option<Spanned<RawUplink>>,
    pub(crate) metrics: Option<RawMetrics>,
    pub(crate) buses: Vec<Spanned<RawBus>>,
    pub(crate) devices: Vec<Spanned<RawDevice>>,
    pub(crate) profiles: Vec<(FileId, Spanned<String>, RawProfile)>,
    pub(crate) poll:
        Option<Spanned<std::collections::BTreeMap<String, Spanned<super::units::Dur>>>>,
    /// A fleet overlay: `[poll]` may name profiles defined by the gateway itself.
    pub(crate) overlay: bool,
}

/// Loads and checks the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse_str(&text, path)
}

/// Checks configuration text as if read from `path` (includes resolve relative to its folder).
pub fn parse_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    parse_with(text, path, false)
}

pub(crate) fn parse_with(text: &str, path: &Path, overlay: bool) -> Result<Config, ConfigErrors> {
    let mut src = Sources::default();
    let main = src.add(path.to_path_buf(), text.to_string());
    let mut raw = RawConfig {
        main,
        overlay,
        ..RawConfig::default()
    };
    parse_main(&mut src, &mut raw, text);
    if let Some(gw) = &raw.gateway {
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let patterns: Vec<Spanned<String>> = gw.get_ref().include.clone();
        for pat in patterns {
            include(&mut src, &mut raw, &base, &pat);
        }
    }
    // Semantic checks run even after syntax or type errors in some entries, so that one run
    // reports every problem it can see.
    let config = validate::validate(&mut src, raw);
    match config {
        Some(c) if src.errors.is_empty() => Ok(c),
        _ => {
            let mut errors = src.errors;
            errors.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
            errors.dedup();
            Err(ConfigErrors(errors))
        }
    }
}

fn parse_doc<'a>(src: &mut Sources, file: FileId, text: &'a str) -> Option<DeTable<'a>> {
    let (table, errors) = DeTable::parse_recoverable(text);
    if errors.is_empty() {
        return Some(table.into_inner());
    }
    for e in errors {
        src.error(file, e.span(), e.message().to_string());
    }
    None
}

fn de<T: DeserializeOwned>(
    src: &mut Sources,
    file: FileId,
    value: Spanned<DeValue<'_>>,
) -> Option<T> {
    let span = value.span();
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(v),
        Err(e) => {
            src.error(file, e.span().or(Some(span)), e.message().to_string());
            None
        }
    }
}

fn de_spanned<T: DeserializeOwned>(
    src: &mut Sources,
    file: FileId,
    value: Spanned<DeValue<'_>>,
) -> Option<Spanned<T>> {
    de::<Spanned<T>>(src, file, value)
}

fn elements<'a>(
    src: &mut Sources,
    file: FileId,
    key: &str,
    value: Spanned<DeValue<'a>>,
) -> Vec<Spanned<DeValue<'a>>> {
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => items.iter().cloned().collect(),
        _ => {
            src.error(
                file,
                Some(span),
                format!("`{key}` must be an array of tables ([[{key}]])"),
            );
            Vec::new()
        }
    }
}

fn parse_main(src: &mut Sources, raw: &mut RawConfig, text: &str) {
    let file = raw.main;
    let Some(doc) = parse_doc(src, file, text) else {
        return;
    };
    for (key, value) in doc {
        let key_span = key.span();
        match key.get_ref().as_ref() {
            "gateway" => raw.gateway = de_spanned(src, file, value),
            "store" => raw.store = de(src, file, value),
            "uplink" => raw.uplink = de_spanned(src, file, value),
            "metrics" => raw.metrics = de(src, file, value),
            "bus" => {
                for item in elements(src, file, "bus", value) {
                    raw.buses.extend(de_spanned(src, file, item));
                }
            }
            "device" => {
                for item in elements(src, file, "device", value) {
                    raw.devices.extend(de_spanned(src, file, item));
                }
            }
            "profiles" => profiles(src, raw, file, value),
            "poll" => raw.poll = de_spanned(src, file, value),
            other => src.error(
                file,
                Some(key_span),
                format!(
                    "unknown section `{other}`, expected one of gateway, store, uplink, metrics, bus, device, profiles, poll"
                ),
            ),
        }
    }
    if raw.gateway.is_none() && src.errors.is_empty() {
        src.error(
            file,
            None,
            "missing section [gateway] (it needs at least `id`)",
        );
    }
}

fn profiles(src: &mut Sources, raw: &mut RawConfig, file: FileId, value: Spanned<DeValue<'_>>) {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        src.error(
            file,
            Some(span),
            "`profiles` must be a table of profiles ([profiles.NAME])",
        );
        return;
    };
    for (name, body) in table {
        let name = Spanned::new(name.span(), name.get_ref().to_string());
        if let Some(p) = de::<RawProfile>(src, file, body) {
            raw.profiles.push((file, name, p));
        }
    }
}

fn include(src: &mut Sources, raw: &mut RawConfig, base: &Path, pattern: &Spanned<String>) {
    let full = base.join(pattern.get_ref());
    let full = full.to_string_lossy().to_string();
    let paths = match glob::glob(&full) {
        Ok(paths) => paths,
        Err(e) => {
            src.error(
                raw.main,
                Some(pattern.span()),
                format!("bad include pattern: {e}"),
            );
            return;
        }
    };
    let mut found: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
    found.sort();
    if found.is_empty() {
        src.error(
            raw.main,
            Some(pattern.span()),
            format!(
                "include pattern `{}` matches no file (looked for {full})",
                pattern.get_ref()
            ),
        );
    }
    for path in found {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                src.error(
                    raw.main,
                    Some(pattern.span()),
                    format!("cannot read {}: {e}", path.display()),
                );
                continue;
            }
        };
        let file = src.add(path, text.clone());
        let Some(doc) = parse_doc(src, file, &text) else {
            continue;
        };
        for (key, value) in doc {
            if key.get_ref() == "profiles" {
                profiles(src, raw, file, value);
            } else {
                src.error(
                    file,
                    Some(key.span()),
                    format!(
                        "an included file may only hold [profiles.NAME], not `{}`",
                        key.get_ref()
                    ),
                );
            }
        }
    }
}
