//! What `commissaire-host plugins DIR` prints.

use std::fmt::Write as _;

use serde_json::json;

use crate::plugin::PluginSet;

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
            let _ = writeln!(out, "  {}", first_line(d));
        }
        let width = p
            .methods
            .iter()
            .map(|m| m.signature().len())
            .max()
            .unwrap_or(0);
        for m in &p.methods {
            let doc = first_line(&m.doc);
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
    json!({
        "plugins": set.plugins.iter().map(|p| json!({
            "file": p.path,
            "service": p.service_name,
            "version": p.plugin_version,
            "plugin_api": p.api_version,
            "description": p.description,
            "methods": p.methods,
        })).collect::<Vec<_>>(),
        "refused": set.refused.iter().map(|e| json!({
            "file": e.path,
            "reason": e.kind.to_string(),
        })).collect::<Vec<_>>(),
    })
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("").trim()
}
