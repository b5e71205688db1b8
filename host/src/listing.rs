//! What `commissaire-host plugins DIR` prints.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::plugin::{MethodInfo, PluginSet};

/// What `plugins --json` prints, and what the supervisor reads back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The plugins that loaded.
    pub plugins: Vec<ListedPlugin>,
    /// The files refused, with why.
    pub refused: Vec<ListedRefusal>,
}

/// A plugin that loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedPlugin {
    /// Its file.
    pub file: PathBuf,
    /// The service it exports.
    pub service: String,
    /// The plugin's version.
    pub version: String,
    /// The plugin-api version it was built against.
    pub plugin_api: String,
    /// Its description.
    pub description: Option<String>,
    /// Its methods.
    pub methods: Vec<MethodInfo>,
}

/// A file refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedRefusal {
    /// The file.
    pub file: PathBuf,
    /// Why.
    pub reason: String,
}

impl Listing {
    /// The listing of `set`.
    pub fn of(set: &PluginSet) -> Self {
        Self {
            plugins: set
                .plugins
                .iter()
                .map(|p| ListedPlugin {
                    file: p.path.clone(),
                    service: p.service_name.clone(),
                    version: p.plugin_version.clone(),
                    plugin_api: p.api_version.clone(),
                    description: p.description.clone(),
                    methods: p.methods.clone(),
                })
                .collect(),
            refused: set
                .refused
                .iter()
                .map(|e| ListedRefusal {
                    file: e.path.clone(),
                    reason: e.kind.to_string(),
                })
                .collect(),
        }
    }
}

/// Human-readable listing: each plugin with its methods, then each refused
/// file with its reason.
pub fn render_text(set: &PluginSet) -> String {
    let mut out = String::new();
    for p in &set.plugins {
        let _ = writeln!(out, "{}", p.path.display());
        let _ = writeln!(
            out,
            "  service {} {} (plugin-api {})",
            p.service_name, p.plugin_version, p.api_version
        );
        if let Some(d) = &p.description {
            let _ = writeln!(out, "  {}", first_sentence(d));
        }
        let width = p
            .methods
            .iter()
            .map(|m| m.signature().len())
            .max()
            .unwrap_or(0);
        for m in &p.methods {
            let doc = first_sentence(&m.doc);
            let sig = m.signature();
            if doc.is_empty() {
                let _ = writeln!(out, "    {sig}");
            } else {
                let _ = writeln!(out, "    {sig:<width$}  {doc}");
            }
        }
    }
    for e in &set.refused {
        let _ = writeln!(out, "{}", e.path.display());
        let _ = writeln!(out, "  refused: {}", e.kind);
    }
    out
}

/// The same as JSON, for scripts.
pub fn render_json(set: &PluginSet) -> serde_json::Value {
    serde_json::to_value(Listing::of(set)).unwrap_or_default()
}

/// The first sentence of a doc comment, whole: doc comments wrap
/// mid-sentence, so the first paragraph's lines are joined first. A
/// sentence ends at a `.`, `!` or `?` followed by a space (not in `e.g.`
/// or `i.e.`), or with the paragraph.
fn first_sentence(text: &str) -> String {
    let paragraph = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let mut end = paragraph.len();
    for (i, c) in paragraph.char_indices() {
        if !matches!(c, '.' | '!' | '?') || !paragraph[i + 1..].starts_with(' ') {
            continue;
        }
        let head = &paragraph[..=i];
        if ["e.g.", "i.e.", "etc."].iter().any(|a| head.ends_with(a)) && c == '.' {
            continue;
        }
        end = i + 1;
        break;
    }
    paragraph[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::first_sentence;

    #[test]
    fn the_first_sentence_whole_across_wrapped_lines() {
        let doc = "Aborts the whole process, as a segfault in native code would: on a\n\
                   broker only this worker dies.\nMore.";
        assert_eq!(
            first_sentence(doc),
            "Aborts the whole process, as a segfault in native code would: on a broker only this worker dies."
        );
        assert_eq!(
            first_sentence("Answers \"pong\". Takes no bus arguments."),
            "Answers \"pong\"."
        );
        assert_eq!(
            first_sentence("Adds, e.g. 1 and 2. Then more."),
            "Adds, e.g. 1 and 2."
        );
        assert_eq!(
            first_sentence("Calls `simple.add` over the bus"),
            "Calls `simple.add` over the bus"
        );
        assert_eq!(
            first_sentence("First paragraph\n\nsecond."),
            "First paragraph"
        );
        assert_eq!(first_sentence(""), "");
    }
}
