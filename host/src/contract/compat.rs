//! Comparing a service's contract with its next version: what changed,
//! and whether callers written against the old one keep working against
//! the new one. A roll refuses a breaking change; `plugins --diff` shows
//! the same verdict offline.
//!
//! Params are judged from the caller's side (the new schema must take
//! everything the old one took), results from the reader's (the old
//! schema must take everything the new one may return); see
//! [`inclusion`](super::inclusion). A derived contract (a plugin built
//! before contracts) has no types: against one, only names, positions and
//! which parameters are required are compared.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::inclusion::{accepts_all, same, same_but_wording, Gap};
use super::{Contract, MethodView, ParamView};

/// One difference between two versions of a contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The method it concerns ("" for the service itself).
    pub method: String,
    /// What kind of change.
    pub change: Change,
    /// What changed, in words ("param `y` added, required").
    pub detail: String,
}

impl Difference {
    /// Whether callers of the old version may fail against the new one.
    pub fn is_breaking(&self) -> bool {
        self.change.is_breaking()
    }
}

/// The kinds of change, each breaking or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "&'static str")]
pub enum Change {
    /// The service's name: callers route by it.
    ServiceRenamed,
    /// A method gone: its callers get -32601.
    MethodRemoved,
    /// A new method.
    MethodAdded,
    /// A new parameter callers must give: old calls lack it.
    RequiredParamAdded,
    /// A new parameter callers may leave out.
    OptionalParamAdded,
    /// A parameter gone: handlers refuse an unknown name, or one value
    /// too many, with -32602.
    ParamRemoved,
    /// A parameter at another position: positional calls fill the wrong
    /// one.
    ParamMoved,
    /// An optional parameter now required.
    ParamNowRequired,
    /// A required parameter now optional.
    ParamNowOptional,
    /// A parameter's schema that may refuse what the old one took (or
    /// that cannot be proven to take it all).
    ParamType,
    /// A parameter's schema that takes all the old one took, and more.
    ParamTypeWidened,
    /// A result's schema that may return what the old one never did (or
    /// that cannot be proven not to).
    ResultType,
    /// A result's schema that returns less than the old one allowed.
    ResultTypeNarrowed,
    /// A request method turned notification: callers wait for a result
    /// that never comes.
    NowNotification,
    /// A notification turned request method: the method's meaning changed
    /// under callers that never read its result.
    NowRequest,
    /// A doc comment or summary, or a schema's wording that takes the same
    /// values.
    DocChanged,
    /// The declared errors.
    ErrorsChanged,
    /// The handler turned `async fn` or back.
    AsyncChanged,
}

impl Change {
    /// Every kind, for a metric's label set.
    pub const ALL: [Change; 18] = [
        Change::ServiceRenamed,
        Change::MethodRemoved,
        Change::MethodAdded,
        Change::RequiredParamAdded,
        Change::OptionalParamAdded,
        Change::ParamRemoved,
        Change::ParamMoved,
        Change::ParamNowRequired,
        Change::ParamNowOptional,
        Change::ParamType,
        Change::ParamTypeWidened,
        Change::ResultType,
        Change::ResultTypeNarrowed,
        Change::NowNotification,
        Change::NowRequest,
        Change::DocChanged,
        Change::ErrorsChanged,
        Change::AsyncChanged,
    ];

    /// Its name as a metric label and in JSON.
    pub fn label(&self) -> &'static str {
        self.describe().0
    }

    /// Whether callers of the old version may fail against the new one.
    pub fn is_breaking(&self) -> bool {
        self.describe().1
    }

    /// (label, breaking): the one table.
    fn describe(&self) -> (&'static str, bool) {
        match self {
            Change::ServiceRenamed => ("service_renamed", true),
            Change::MethodRemoved => ("method_removed", true),
            Change::MethodAdded => ("method_added", false),
            Change::RequiredParamAdded => ("required_param_added", true),
            Change::OptionalParamAdded => ("optional_param_added", false),
            Change::ParamRemoved => ("param_removed", true),
            Change::ParamMoved => ("param_moved", true),
            Change::ParamNowRequired => ("param_now_required", true),
            Change::ParamNowOptional => ("param_now_optional", false),
            Change::ParamType => ("param_type_changed", true),
            Change::ParamTypeWidened => ("param_type_widened", false),
            Change::ResultType => ("result_type_changed", true),
            Change::ResultTypeNarrowed => ("result_type_narrowed", false),
            Change::NowNotification => ("now_notification", true),
            Change::NowRequest => ("now_request", true),
            Change::DocChanged => ("doc_changed", false),
            Change::ErrorsChanged => ("errors_changed", false),
            Change::AsyncChanged => ("async_changed", false),
        }
    }
}

impl From<Change> for &'static str {
    fn from(change: Change) -> Self {
        change.label()
    }
}

/// What changed from `old` to `new`, the old methods in order, then the
/// new ones. Empty when nothing did.
pub fn compare(old: &Contract, new: &Contract) -> Vec<Difference> {
    let mut out = Differences(Vec::new());
    if old.service() != new.service() {
        out.push(
            "",
            Change::ServiceRenamed,
            format!("service `{}` is now `{}`", old.service(), new.service()),
        );
    }
    let sides = Sides {
        old: old.document(),
        new: new.document(),
        // A derived new side (a rollback to a plugin built before
        // contracts) is compared as typed: its "any" results cannot be
        // proven to stay within the old types.
        typed: !old.is_derived(),
    };
    for before in old.methods() {
        match new.method(before.name()) {
            Some(after) => sides.method(&before, &after, &mut out),
            None => out.push(before.name(), Change::MethodRemoved, "removed".into()),
        }
    }
    for after in new.methods().filter(|m| old.method(m.name()).is_none()) {
        out.push(after.name(), Change::MethodAdded, "added".into());
    }
    out.0
}

/// Whether any of `differences` breaks callers.
pub fn is_breaking(differences: &[Difference]) -> bool {
    differences.iter().any(Difference::is_breaking)
}

struct Differences(Vec<Difference>);

impl Differences {
    fn push(&mut self, method: &str, change: Change, detail: String) {
        self.0.push(Difference {
            method: method.to_owned(),
            change,
            detail,
        });
    }
}

/// The two documents, and whether both carry types.
struct Sides<'c> {
    old: &'c Value,
    new: &'c Value,
    typed: bool,
}

impl Sides<'_> {
    fn method(&self, before: &MethodView<'_>, after: &MethodView<'_>, out: &mut Differences) {
        let name = before.name();
        if self.typed && before.is_notification() != after.is_notification() {
            let (change, detail) = if after.is_notification() {
                (Change::NowNotification, "now a notification: no result")
            } else {
                (
                    Change::NowRequest,
                    "now answers a result: it was a notification",
                )
            };
            out.push(name, change, detail.into());
        }
        self.params(name, before, after, out);
        if let (Some(was), Some(is)) = (before.result(), after.result()) {
            if self.typed {
                self.result(name, was, is, out);
            }
        }
        let summary_changed = self.typed && before.summary() != after.summary();
        if before.doc() != after.doc() || summary_changed {
            out.push(name, Change::DocChanged, "doc changed".into());
        }
        if self.typed {
            errors(name, before, after, out);
        }
        if before.is_async() != after.is_async() {
            let detail = if after.is_async() {
                "now async"
            } else {
                "no longer async"
            };
            out.push(name, Change::AsyncChanged, detail.into());
        }
    }

    fn params(
        &self,
        name: &str,
        before: &MethodView<'_>,
        after: &MethodView<'_>,
        out: &mut Differences,
    ) {
        let was: Vec<ParamView<'_>> = before.params().collect();
        let is: Vec<ParamView<'_>> = after.params().collect();
        for (i, p) in was.iter().enumerate() {
            let Some((j, q)) = is.iter().enumerate().find(|(_, q)| q.name == p.name) else {
                out.push(
                    name,
                    Change::ParamRemoved,
                    format!("param `{}` removed", p.name),
                );
                continue;
            };
            if i != j {
                out.push(
                    name,
                    Change::ParamMoved,
                    format!(
                        "param `{}` moved from position {} to {}",
                        p.name,
                        i + 1,
                        j + 1
                    ),
                );
            }
            match (p.required, q.required) {
                (false, true) => out.push(
                    name,
                    Change::ParamNowRequired,
                    format!("param `{}` now required", p.name),
                ),
                (true, false) => out.push(
                    name,
                    Change::ParamNowOptional,
                    format!("param `{}` now optional", p.name),
                ),
                _ => {}
            }
            if self.typed {
                self.param_schema(name, p, q, out);
            }
        }
        for q in is.iter().filter(|q| !was.iter().any(|p| p.name == q.name)) {
            let (change, kind) = if q.required {
                (Change::RequiredParamAdded, "required")
            } else {
                (Change::OptionalParamAdded, "optional")
            };
            out.push(name, change, format!("param `{}` added, {kind}", q.name));
        }
    }

    /// The new schema must take everything the old one took.
    fn param_schema(
        &self,
        name: &str,
        p: &ParamView<'_>,
        q: &ParamView<'_>,
        out: &mut Differences,
    ) {
        if same(p.schema, self.old, q.schema, self.new) {
            return;
        }
        let what = format!("param `{}`", p.name);
        match accepts_all(q.schema, self.new, p.schema, self.old) {
            Err(gap) => out.push(
                name,
                Change::ParamType,
                lost(&what, "no longer takes", &gap),
            ),
            Ok(()) => match accepts_all(p.schema, self.old, q.schema, self.new) {
                Err(gap @ Gap::Values { .. }) => out.push(
                    name,
                    Change::ParamTypeWidened,
                    lost(&what, "now also takes", &gap),
                ),
                Err(Gap::Unproven { .. }) => out.push(
                    name,
                    Change::ParamTypeWidened,
                    format!("{what}: schema changed, takes all it took"),
                ),
                Ok(()) if same_but_wording(p.schema, self.old, q.schema, self.new) => {
                    out.push(name, Change::DocChanged, format!("{what}: schema reworded"))
                }
                Ok(()) => out.push(
                    name,
                    Change::ParamTypeWidened,
                    format!("{what}: schema changed, takes what it took"),
                ),
            },
        }
    }

    /// The old schema, which callers read results with, must take
    /// everything the new one may return.
    fn result(&self, name: &str, was: &Value, is: &Value, out: &mut Differences) {
        if same(was, self.old, is, self.new) {
            return;
        }
        match accepts_all(was, self.old, is, self.new) {
            Err(gap) => out.push(name, Change::ResultType, lost("result", "may now be", &gap)),
            Ok(()) => match accepts_all(is, self.new, was, self.old) {
                Err(gap @ Gap::Values { .. }) => out.push(
                    name,
                    Change::ResultTypeNarrowed,
                    lost("result", "is no longer", &gap),
                ),
                Err(Gap::Unproven { .. }) => out.push(
                    name,
                    Change::ResultTypeNarrowed,
                    "result: schema changed, within the old one".into(),
                ),
                Ok(()) if same_but_wording(was, self.old, is, self.new) => {
                    out.push(name, Change::DocChanged, "result: schema reworded".into());
                }
                Ok(()) => out.push(
                    name,
                    Change::ResultTypeNarrowed,
                    "result: schema changed, within the old one".into(),
                ),
            },
        }
    }
}

/// "param `x` no longer takes null", or "param `x`: cannot prove
/// compatible: …".
fn lost(what: &str, verb: &str, gap: &Gap) -> String {
    match gap {
        Gap::Values { .. } => format!("{what} {verb} {gap}"),
        Gap::Unproven { .. } => format!("{what}: {gap}"),
    }
}

fn errors(name: &str, before: &MethodView<'_>, after: &MethodView<'_>, out: &mut Differences) {
    let was: Vec<(i64, &str)> = before.errors().collect();
    let is: Vec<(i64, &str)> = after.errors().collect();
    let mut detail = String::new();
    for (verb, from, to) in [("added", &is, &was), ("removed", &was, &is)] {
        let listed: Vec<String> = from
            .iter()
            .filter(|e| !to.contains(e))
            .map(|(code, message)| format!("{code} {message:?}"))
            .collect();
        if !listed.is_empty() {
            let sep = if detail.is_empty() { "" } else { "; " };
            let _ = write!(detail, "{sep}{verb} {}", listed.join(", "));
        }
    }
    if !detail.is_empty() {
        out.push(name, Change::ErrorsChanged, format!("errors {detail}"));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::plugin::{MethodInfo, ParamInfo};

    fn int64() -> Value {
        json!({"type": "integer", "format": "int64", "minimum": i64::MIN, "maximum": i64::MAX})
    }

    fn param(name: &str, required: bool, schema: Value) -> Value {
        json!({"name": name, "required": required, "schema": schema})
    }

    /// `simple` with `add` as `method` says, beside an untouched `ping`.
    fn with_add(add: Value) -> Contract {
        with(add, json!({}))
    }

    fn with(add: Value, components: Value) -> Contract {
        Contract::from_value(json!({
            "openrpc": "1.3.2",
            "info": {"title": "simple", "version": "0.1.0"},
            "methods": [
                {"name": "ping", "params": [], "result": {"name": "result", "schema": {"type": "string"}}},
                add,
            ],
            "components": {"schemas": components},
        }))
        .expect("a contract")
    }

    /// `add(x: i64, y: i64) -> i64`, then `edit` applied.
    fn add(edit: impl FnOnce(&mut Value)) -> Value {
        let mut m = json!({
            "name": "add", "summary": "Adds.", "description": "Adds.",
            "paramStructure": "either",
            "params": [param("x", true, int64()), param("y", true, int64())],
            "result": {"name": "result", "schema": int64()},
        });
        edit(&mut m);
        m
    }

    /// (label, breaking, detail) of each difference from the unedited
    /// `add` to the edited one.
    fn diff(edit: impl FnOnce(&mut Value)) -> Vec<(&'static str, bool, String)> {
        let old = with_add(add(|_| {}));
        let new = with_add(add(edit));
        compare(&old, &new)
            .into_iter()
            .map(|d| {
                assert_eq!(d.method, "add");
                (d.change.label(), d.is_breaking(), d.detail)
            })
            .collect()
    }

    fn one(label: &'static str, breaking: bool, detail: &str) -> Vec<(&'static str, bool, String)> {
        vec![(label, breaking, detail.to_owned())]
    }

    #[test]
    fn a_type_described_at_last_is_not_a_change_of_type() {
        let undescribed = json!({"x-undescribed": true});
        let old = with_add(add(|m| m["params"][1]["schema"] = undescribed.clone()));
        let new = with_add(add(|_| {}));
        assert!(
            !is_breaking(&compare(&old, &new)),
            "{:?}",
            compare(&old, &new)
        );
    }

    #[test]
    fn a_rollback_to_a_plugin_without_a_contract_cannot_be_proven() {
        let typed = with_add(add(|_| {}));
        let info = |name: &str| ParamInfo {
            name: name.into(),
            ty: "i64".into(),
            optional: false,
        };
        let methods = ["ping", "add"].map(|name| MethodInfo {
            name: name.into(),
            doc: String::new(),
            params: if name == "add" {
                vec![info("x"), info("y")]
            } else {
                vec![]
            },
            returns: "i64".into(),
            is_async: false,
        });
        let derived = Contract::derived("simple", "0.0.9", None, &methods);
        let back = compare(&typed, &derived);
        assert!(
            back.iter()
                .any(|d| d.change == Change::ResultType && d.is_breaking()),
            "{back:?}"
        );
        // The other way, the first typed version, rolls.
        assert!(!is_breaking(&compare(&derived, &typed)));
    }

    #[test]
    fn the_same_contract_has_no_differences() {
        assert_eq!(diff(|_| {}), vec![]);
    }

    #[test]
    fn each_rule() {
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let table: Vec<(&str, Edit, &str, bool, &str)> = vec![
            (
                "required param added",
                Box::new(|m| {
                    m["params"]
                        .as_array_mut()
                        .unwrap()
                        .push(param("z", true, int64()))
                }),
                "required_param_added",
                true,
                "param `z` added, required",
            ),
            (
                "optional param added",
                Box::new(|m| {
                    m["params"].as_array_mut().unwrap().push(param(
                        "z",
                        false,
                        json!({"type": ["integer", "null"]}),
                    ))
                }),
                "optional_param_added",
                false,
                "param `z` added, optional",
            ),
            (
                "param removed",
                Box::new(|m| {
                    m["params"].as_array_mut().unwrap().pop();
                }),
                "param_removed",
                true,
                "param `y` removed",
            ),
            (
                "required to optional",
                Box::new(|m| m["params"][1]["required"] = false.into()),
                "param_now_optional",
                false,
                "param `y` now optional",
            ),
            (
                "param type widened",
                Box::new(|m| m["params"][1]["schema"] = json!({"type": "number"})),
                "param_type_widened",
                false,
                "param `y` now also takes numbers that are not integers",
            ),
            (
                "param type narrowed",
                Box::new(|m| {
                    m["params"][1]["schema"] = json!({"type": "integer", "format": "int32"})
                }),
                "param_type_changed",
                true,
                "param `y` no longer takes integers < -2147483648",
            ),
            (
                "param type changed",
                Box::new(|m| m["params"][0]["schema"] = json!({"type": "string"})),
                "param_type_changed",
                true,
                "param `x` no longer takes integers",
            ),
            (
                "param made nullable",
                Box::new(|m| m["params"][0]["schema"]["type"] = json!(["integer", "null"])),
                "param_type_widened",
                false,
                "param `x` now also takes null",
            ),
            (
                "result widened",
                Box::new(|m| m["result"]["schema"]["type"] = json!(["integer", "null"])),
                "result_type_changed",
                true,
                "result may now be null",
            ),
            (
                "result narrowed",
                Box::new(|m| m["result"]["schema"] = json!({"type": "integer", "format": "uint8"})),
                "result_type_narrowed",
                false,
                "result is no longer integers < 0",
            ),
            (
                "result that cannot be proven",
                Box::new(|m| m["result"]["schema"]["multipleOf"] = json!(2)),
                "result_type_narrowed",
                false,
                "result: schema changed, within the old one",
            ),
            (
                "now a notification",
                Box::new(|m| {
                    m.as_object_mut().unwrap().remove("result");
                    m["x-notification"] = true.into();
                }),
                "now_notification",
                true,
                "now a notification: no result",
            ),
            (
                "doc changed",
                Box::new(|m| {
                    m["description"] = "Adds two.\n\nMore.".into();
                    m["summary"] = "Adds two.".into();
                }),
                "doc_changed",
                false,
                "doc changed",
            ),
            (
                "schema reworded",
                Box::new(|m| m["params"][0]["schema"]["description"] = "The first.".into()),
                "doc_changed",
                false,
                "param `x`: schema reworded",
            ),
            (
                "errors declared",
                Box::new(|m| m["errors"] = json!([{"code": -32004, "message": "overflow"}])),
                "errors_changed",
                false,
                "errors added -32004 \"overflow\"",
            ),
            (
                "now async",
                Box::new(|m| m["x-async"] = true.into()),
                "async_changed",
                false,
                "now async",
            ),
        ];
        for (rule, edit, label, breaking, detail) in table {
            assert_eq!(diff(edit), one(label, breaking, detail), "{rule}");
        }
    }

    #[test]
    fn an_optional_param_made_required_breaks() {
        let old = with_add(add(|m| m["params"][1]["required"] = false.into()));
        let new = with_add(add(|_| {}));
        let d = compare(&old, &new);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].change, Change::ParamNowRequired);
        assert_eq!(d[0].detail, "param `y` now required");
        assert!(d[0].is_breaking());
    }

    #[test]
    fn a_notification_turned_request_breaks() {
        let old = with_add(add(|m| {
            m.as_object_mut().unwrap().remove("result");
            m["x-notification"] = true.into();
        }));
        let new = with_add(add(|_| {}));
        assert_eq!(
            compare(&old, &new)
                .iter()
                .map(|d| (d.change, d.is_breaking()))
                .collect::<Vec<_>>(),
            [(Change::NowRequest, true)]
        );
    }

    #[test]
    fn a_param_moved_breaks_positional_callers() {
        let d = diff(|m| m["params"].as_array_mut().unwrap().reverse());
        assert_eq!(
            d,
            vec![
                (
                    "param_moved",
                    true,
                    "param `x` moved from position 1 to 2".to_owned()
                ),
                (
                    "param_moved",
                    true,
                    "param `y` moved from position 2 to 1".to_owned()
                ),
            ]
        );
        // An optional param put before `y` moves it too.
        let d = diff(|m| {
            m["params"]
                .as_array_mut()
                .unwrap()
                .insert(1, param("scale", false, true.into()));
        });
        assert_eq!(
            d[0],
            (
                "param_moved",
                true,
                "param `y` moved from position 2 to 3".to_owned()
            )
        );
        assert_eq!(d[1].0, "optional_param_added");
    }

    #[test]
    fn methods_removed_and_added() {
        let old = with_add(add(|_| {}));
        let new = with_add(add(|m| m["name"] = "sum".into()));
        let d: Vec<(String, Change)> = compare(&old, &new)
            .into_iter()
            .map(|d| (d.method, d.change))
            .collect();
        assert_eq!(
            d,
            [
                ("add".to_owned(), Change::MethodRemoved),
                ("sum".to_owned(), Change::MethodAdded)
            ]
        );
        assert!(is_breaking(&compare(&old, &new)));
        assert!(!is_breaking(&compare(&new, &new)));
        // Added alone is compatible.
        let fewer = Contract::from_value(json!({"openrpc": "1.3.2",
            "info": {"title": "simple", "version": "0"}, "methods": []}))
        .unwrap();
        let d = compare(&fewer, &old);
        assert_eq!(d.len(), 2);
        assert!(!is_breaking(&d));
    }

    #[test]
    fn a_renamed_service_breaks() {
        let old = with_add(add(|_| {}));
        let mut doc = old.document().clone();
        doc["info"]["title"] = "complex".into();
        let new = Contract::from_value(doc).unwrap();
        let d = compare(&old, &new);
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].method.as_str(), d[0].change),
            ("", Change::ServiceRenamed)
        );
        assert_eq!(d[0].detail, "service `simple` is now `complex`");
    }

    #[test]
    fn unprovable_schemas_break_and_say_so() {
        let d = diff(|m| m["params"][0]["schema"]["multipleOf"] = json!(2));
        assert_eq!(
            d,
            one(
                "param_type_changed",
                true,
                "param `x`: cannot prove compatible: `multipleOf` added"
            )
        );
    }

    #[test]
    fn shared_schemas_are_compared_through_their_refs() {
        let point = |extra: Option<(&str, Value, bool)>| {
            let mut p = json!({"type": "object", "required": ["x"],
                "properties": {"x": {"type": "integer", "format": "uint8", "minimum": 0, "maximum": 255}}});
            if let Some((name, schema, required)) = extra {
                p["properties"][name] = schema;
                if required {
                    p["required"].as_array_mut().unwrap().push(name.into());
                }
            }
            json!({"Point": p})
        };
        let place = add(|m| {
            m["params"] = json!([param(
                "at",
                true,
                json!({"$ref": "#/components/schemas/Point"})
            )]);
            m["result"]["schema"] = json!({"$ref": "#/components/schemas/Point"});
        });
        let old = with(place.clone(), point(None));
        let optional = with(
            place.clone(),
            point(Some(("label", json!({"type": ["string", "null"]}), false))),
        );
        let required = with(
            place.clone(),
            point(Some(("label", json!({"type": "string"}), true))),
        );
        // A new optional field: the param takes what it took, the result
        // may carry a field old readers ignore.
        let d = compare(&old, &optional);
        assert_eq!(
            d.iter()
                .map(|d| (d.change, d.detail.as_str()))
                .collect::<Vec<_>>(),
            [
                (
                    Change::ParamTypeWidened,
                    "param `at`: schema changed, takes what it took"
                ),
                (
                    Change::ResultTypeNarrowed,
                    "result: schema changed, within the old one"
                ),
            ]
        );
        assert!(!is_breaking(&d));
        let d = compare(&old, &required);
        assert_eq!(
            d.iter()
                .map(|d| (d.change, d.detail.as_str()))
                .collect::<Vec<_>>(),
            [
                (
                    Change::ParamType,
                    "param `at` no longer takes objects without `label`"
                ),
                (
                    Change::ResultTypeNarrowed,
                    "result is no longer objects without `label`"
                ),
            ]
        );
        // The other way, the result loses a field readers required.
        let back = compare(&required, &old);
        assert_eq!(back[0].change, Change::ParamTypeWidened);
        assert_eq!(back[1].change, Change::ResultType);
        assert_eq!(back[1].detail, "result may now be objects without `label`");
    }

    #[test]
    fn derived_contracts_compare_names_and_required_only() {
        let derived = |params: &[(&str, bool)]| {
            let methods = [MethodInfo {
                name: "add".into(),
                doc: "Adds.".into(),
                params: params
                    .iter()
                    .map(|(n, optional)| ParamInfo {
                        name: (*n).into(),
                        ty: "i64".into(),
                        optional: *optional,
                    })
                    .collect(),
                returns: "i64".into(),
                is_async: false,
            }];
            Contract::derived("simple", "0.1.0", None, &methods)
        };
        let old = derived(&[("x", false), ("y", false)]);
        // Its own contract, with types: nothing breaks.
        let typed = with_add(add(|m| m["errors"] = json!([{"code": 1, "message": "m"}])));
        let d = compare(&old, &typed);
        assert_eq!(
            d.iter().map(|d| d.method.as_str()).collect::<Vec<_>>(),
            ["ping"],
            "{d:?}"
        );
        assert_eq!(d[0].change, Change::MethodAdded);
        assert_eq!(
            compare(&old, &derived(&[("x", false)]))[0].change,
            Change::ParamRemoved
        );
        assert_eq!(
            compare(&old, &derived(&[("x", false), ("y", true)]))[0].change,
            Change::ParamNowOptional
        );
    }

    #[test]
    fn labels_are_distinct_and_json_uses_them() {
        let mut labels: Vec<&str> = Change::ALL.iter().map(Change::label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Change::ALL.len());
        let d = Difference {
            method: "add".into(),
            change: Change::MethodRemoved,
            detail: "removed".into(),
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"method": "add", "change": "method_removed", "detail": "removed"})
        );
    }
}
