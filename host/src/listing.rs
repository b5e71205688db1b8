//! What `commissaire-host plugins` prints: a directory's listing, its
//! services' contracts (`--openrpc`), and the differences between two
//! versions of a plugin (`--diff`).

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::contract::{Contract, Difference};
use crate::plugin::{MethodInfo, PluginLibrary, PluginSet};

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
    /// Whether it carries its own contract (plugin-api ≥ 1.6); absent in
    /// the listings of hosts before contracts.
    #[serde(default)]
    pub contract: bool,
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
                    contract: has_contract(p),
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
        let marker = if has_contract(p) {
            ""
        } else {
            " (no contract)"
        };
        let _ = writeln!(
            out,
            "  service {} {} (plugin-api {}){marker}",
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

/// Each service's contract, by service name: its own, or the one derived
/// from its method list (marked `x-derived`).
pub fn render_openrpc(set: &PluginSet) -> Value {
    let documents: Map<String, Value> = set
        .plugins
        .iter()
        .map(|p| (p.service_name.clone(), Contract::of(p).document().clone()))
        .collect();
    Value::Object(documents)
}

/// Whether the plugin has a contract of its own, one this host reads.
fn has_contract(p: &PluginLibrary) -> bool {
    !Contract::of(p).is_derived()
}

/// What `plugins --diff --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffListing {
    /// The plugin compared from.
    pub old: DiffSide,
    /// The plugin compared to.
    pub new: DiffSide,
    /// What changed, in the old contract's method order.
    pub differences: Vec<ListedDifference>,
    /// "compatible" or "breaking".
    pub verdict: &'static str,
}

/// One of the two plugins compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffSide {
    /// Its file.
    pub file: PathBuf,
    /// Its service.
    pub service: String,
    /// Its version.
    pub version: String,
    /// Whether it carries its own contract.
    pub contract: bool,
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListedDifference {
    /// The method ("" for the service).
    pub method: String,
    /// Its kind (a [`crate::contract::Change`] label).
    pub change: &'static str,
    /// Whether it breaks callers of the old version.
    pub breaking: bool,
    /// What changed.
    pub detail: String,
}

impl DiffListing {
    /// The listing of `differences` between `old` and `new`.
    pub fn of(old: &PluginLibrary, new: &PluginLibrary, differences: &[Difference]) -> Self {
        let side = |p: &PluginLibrary| DiffSide {
            file: p.path.clone(),
            service: p.service_name.clone(),
            version: p.plugin_version.clone(),
            contract: has_contract(p),
        };
        Self {
            old: side(old),
            new: side(new),
            differences: differences
                .iter()
                .map(|d| ListedDifference {
                    method: d.method.clone(),
                    change: d.change.label(),
                    breaking: d.is_breaking(),
                    detail: d.detail.clone(),
                })
                .collect(),
            verdict: if crate::contract::compat::is_breaking(differences) {
                "breaking"
            } else {
                "compatible"
            },
        }
    }

    /// Whether any difference breaks callers.
    pub fn is_breaking(&self) -> bool {
        self.differences.iter().any(|d| d.breaking)
    }

    /// One aligned line per difference, then the verdict:
    ///
    /// ```text
    /// BREAKING  add   param `y` added, required
    /// ok        ping  doc changed
    /// breaking: 1 of 2 differences break callers of simple 0.1.0 (→ 0.2.0)
    /// ```
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let method = |d: &ListedDifference| {
            if d.method.is_empty() {
                "(service)".to_owned()
            } else {
                d.method.clone()
            }
        };
        let width = self
            .differences
            .iter()
            .map(|d| method(d).chars().count())
            .max()
            .unwrap_or(0);
        for d in &self.differences {
            let verdict = if d.breaking { "BREAKING" } else { "ok" };
            let _ = writeln!(out, "{verdict:<8}  {:<width$}  {}", method(d), d.detail);
        }
        let (old, new) = (&self.old, &self.new);
        let versions = if old.service == new.service {
            format!("{} {} → {}", old.service, old.version, new.version)
        } else {
            format!(
                "{} {} → {} {}",
                old.service, old.version, new.service, new.version
            )
        };
        let breaking = self.differences.iter().filter(|d| d.breaking).count();
        let total = self.differences.len();
        let _ = match (breaking, total) {
            (0, 0) => writeln!(out, "compatible: no differences ({versions})"),
            (0, n) => writeln!(
                out,
                "compatible: {n} {} ({versions})",
                plural(n, "difference")
            ),
            (b, n) => writeln!(
                out,
                "breaking: {b} of {n} {} {} callers ({versions})",
                plural(n, "difference"),
                if b == 1 { "breaks" } else { "break" }
            ),
        };
        let lacking = match (old.contract, new.contract) {
            (true, true) => None,
            (false, true) => Some("OLD has no contract"),
            (true, false) => Some("NEW has no contract"),
            (false, false) => Some("neither has a contract"),
        };
        if let Some(lacking) = lacking {
            let _ = writeln!(
                out,
                "note: {lacking} of its own: only method names, params' positions and which \
                 are required were compared"
            );
        }
        out
    }
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        noun.to_owned()
    } else {
        format!("{noun}s")
    }
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
    use super::*;

    fn listing(
        differences: &[(&str, &'static str, bool, &str)],
        contracts: (bool, bool),
    ) -> DiffListing {
        let side = |version: &str, contract: bool| DiffSide {
            file: "libsimple.so".into(),
            service: "simple".into(),
            version: version.into(),
            contract,
        };
        DiffListing {
            old: side("0.1.0", contracts.0),
            new: side("0.2.0", contracts.1),
            differences: differences
                .iter()
                .map(|(method, change, breaking, detail)| ListedDifference {
                    method: (*method).into(),
                    change,
                    breaking: *breaking,
                    detail: (*detail).into(),
                })
                .collect(),
            verdict: "",
        }
    }

    #[test]
    fn a_diff_reads_as_aligned_lines_then_the_verdict() {
        let l = listing(
            &[
                (
                    "add",
                    "required_param_added",
                    true,
                    "param `y` added, required",
                ),
                ("ping", "doc_changed", false, "doc changed"),
                ("", "service_renamed", true, "service `a` is now `b`"),
            ],
            (true, true),
        );
        assert_eq!(
            l.render_text(),
            "BREAKING  add        param `y` added, required\n\
             ok        ping       doc changed\n\
             BREAKING  (service)  service `a` is now `b`\n\
             breaking: 2 of 3 differences break callers (simple 0.1.0 → 0.2.0)\n"
        );
        let l = listing(&[("add", "method_removed", true, "removed")], (true, true));
        assert!(l
            .render_text()
            .ends_with("breaking: 1 of 1 difference breaks callers (simple 0.1.0 → 0.2.0)\n"));
        let l = listing(
            &[("add", "doc_changed", false, "doc changed")],
            (false, true),
        );
        assert_eq!(
            l.render_text(),
            "ok        add  doc changed\n\
             compatible: 1 difference (simple 0.1.0 → 0.2.0)\n\
             note: OLD has no contract of its own: only method names, params' positions and \
             which are required were compared\n"
        );
    }

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
