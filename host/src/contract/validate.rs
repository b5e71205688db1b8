//! Checking a call's params against the callee's contract before it is
//! sent: the same verdicts, in the same words, as the plugin's own -32602
//! answers (plugin-api's `params.rs`), without the bus round trip.
//!
//! The check never refuses what the handler would take: `format` is not
//! asserted (a handler's decoding, not the schema, says which strings it
//! takes), and a schema that does not compile accepts anything (logged
//! once). A handler may still refuse what the check let through: what a
//! handler decides after binding (an overflowing sum), and what a schema
//! cannot say (a serde `alias`, a custom `Deserialize`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use commissaire_plugin_api::RpcError;
use jsonschema::{Draft, Validator};
use serde_json::{json, Map, Value};

use super::{Contract, DISCOVER_METHOD};

/// Why a call's params do not fit the method.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamProblem {
    /// The service has no such method.
    #[error("method not found: `{method}`")]
    UnknownMethod {
        /// The method asked for.
        method: String,
    },
    /// `params` is neither an array nor an object.
    #[error("`params` must be an array or an object")]
    NotStructured,
    /// More positional values than the method takes.
    #[error("too many params: `{method}` takes {} ({}), got {got}", takes.len(), takes.join(", "))]
    TooMany {
        /// The method.
        method: String,
        /// Its parameters' names, in order.
        takes: Vec<String>,
        /// How many values the call gave.
        got: usize,
    },
    /// A name the method does not take.
    #[error("unknown argument `{name}` for `{method}` (takes: {})", takes.join(", "))]
    UnknownName {
        /// The method.
        method: String,
        /// The name given.
        name: String,
        /// Its parameters' names, in order.
        takes: Vec<String>,
    },
    /// A required parameter was not given.
    #[error("missing argument `{name}`")]
    Missing {
        /// The parameter.
        name: String,
    },
    /// A value its schema refuses.
    #[error("invalid argument `{name}`: {reason}")]
    Invalid {
        /// The parameter.
        name: String,
        /// What the schema says, and where in the value when it is inside.
        reason: String,
    },
}

impl ParamProblem {
    /// The parameter at fault, when one is: the missing, refused or
    /// unknown one.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::UnknownName { name, .. }
            | Self::Missing { name }
            | Self::Invalid { name, .. } => Some(name),
            Self::UnknownMethod { .. } | Self::NotStructured | Self::TooMany { .. } => None,
        }
    }

    /// The error the plugin itself would answer: -32602, or -32601 for an
    /// unknown method and -32600 for params of the wrong shape.
    pub fn to_rpc_error(&self) -> RpcError {
        match self {
            Self::UnknownMethod { method } => RpcError::method_not_found(method),
            Self::NotStructured => RpcError::invalid_request(self.to_string()),
            _ => RpcError::invalid_params(self.to_string()),
        }
    }
}

/// A contract's compiled parameter schemas, built on the first check and
/// shared by its clones. A cache: any two are equal.
#[derive(Clone, Default)]
pub(super) struct CompiledChecks(OnceLock<Arc<HashMap<String, Vec<Option<Validator>>>>>);

impl PartialEq for CompiledChecks {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for CompiledChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "CompiledChecks(compiled)"
        } else {
            "CompiledChecks(not yet)"
        })
    }
}

impl Contract {
    /// Checks a call of `method` with `params` (an array fills parameters
    /// by position, an object by name, `None` gives none) as the handler
    /// would: shape first, then each parameter in order, missing or
    /// against its schema. A derived contract (every schema "any") checks
    /// names, count and required parameters only.
    ///
    /// The discovery method is the host's, not the document's: it always
    /// passes.
    pub fn check_params(&self, method: &str, params: Option<&Value>) -> Result<(), ParamProblem> {
        let Some(view) = self.method(method) else {
            if method == DISCOVER_METHOD {
                return Ok(());
            }
            return Err(ParamProblem::UnknownMethod {
                method: method.to_owned(),
            });
        };
        let names: Vec<&str> = view.params().map(|p| p.name).collect();
        let takes = || names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        match params {
            None => {}
            Some(Value::Array(values)) if values.len() > names.len() => {
                return Err(ParamProblem::TooMany {
                    method: method.to_owned(),
                    takes: takes(),
                    got: values.len(),
                })
            }
            Some(Value::Array(_)) => {}
            Some(Value::Object(members)) => {
                if let Some(name) = members.keys().find(|k| !names.contains(&k.as_str())) {
                    return Err(ParamProblem::UnknownName {
                        method: method.to_owned(),
                        name: name.clone(),
                        takes: takes(),
                    });
                }
            }
            Some(_) => return Err(ParamProblem::NotStructured),
        }
        let validators = self.checks.0.get_or_init(|| Arc::new(compile(self)));
        let validators = validators
            .get(method)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (index, param) in view.params().enumerate() {
            let value = match params {
                Some(Value::Array(values)) => values.get(index),
                Some(Value::Object(members)) => members.get(param.name),
                _ => None,
            };
            let Some(value) = value else {
                if param.required {
                    return Err(ParamProblem::Missing {
                        name: param.name.to_owned(),
                    });
                }
                continue;
            };
            if let Some(Some(validator)) = validators.get(index) {
                if let Err(e) = validator.validate(value) {
                    let shown = e.masked_with(shown_value(e.instance()));
                    let at = e.instance_path().to_string();
                    let reason = if at.is_empty() {
                        shown.to_string()
                    } else {
                        format!("at {at}: {shown}")
                    };
                    return Err(ParamProblem::Invalid {
                        name: param.name.to_owned(),
                        reason,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The bytes of components compiled into one contract's checks, at most:
/// each parameter whose schema has a `$ref` carries its own copy of them.
/// The plugins here need a few KB; a document made to be costly (a
/// discovery answer is anyone's) leaves its remaining parameters
/// unchecked, which the service checks anyway.
const COMPILE_BUDGET: usize = 32 << 20;

/// Every parameter's validator, by method; `None` for a parameter that
/// takes any value, or that is not checked here.
fn compile(contract: &Contract) -> HashMap<String, Vec<Option<Validator>>> {
    let components = contract.document().get("components");
    let components_bytes = components.map_or(0, |c| c.to_string().len());
    let mut spent = 0usize;
    let mut over_budget = false;
    let mut out = HashMap::new();
    for method in contract.methods() {
        let mut validators = Vec::new();
        for param in method.params() {
            if takes_anything(param.schema) {
                validators.push(None);
                continue;
            }
            // `$ref`s point into the document's components: such a
            // parameter's schema is compiled as a document of its own
            // that carries them.
            let mut root = Map::new();
            root.insert("allOf".into(), json!([param.schema]));
            if has_ref(param.schema) {
                spent = spent.saturating_add(components_bytes);
                if spent > COMPILE_BUDGET {
                    over_budget = true;
                    validators.push(None);
                    continue;
                }
                if let Some(components) = components {
                    root.insert("components".into(), components.clone());
                }
            }
            let built = jsonschema::options()
                .with_draft(Draft::Draft7)
                .should_validate_formats(false)
                .build(&Value::Object(root));
            validators.push(match built {
                Ok(validator) => Some(validator),
                Err(e) => {
                    tracing::warn!(
                        service = contract.service(), method = method.name(),
                        param = param.name, error = %e,
                        "a parameter's schema does not compile; calls are not checked against it"
                    );
                    None
                }
            });
        }
        out.insert(method.name().to_owned(), validators);
    }
    if over_budget {
        tracing::warn!(
            service = contract.service(),
            components_bytes,
            "the contract is too costly to check in full; some parameters are left to the service"
        );
    }
    out
}

/// Whether `schema` has a `$ref` anywhere.
fn has_ref(schema: &Value) -> bool {
    match schema {
        Value::Object(m) => m.contains_key("$ref") || m.values().any(has_ref),
        Value::Array(a) => a.iter().any(has_ref),
        _ => false,
    }
}

/// `true` or `{}`: the schema of a type without one, or of any JSON value.
fn takes_anything(schema: &Value) -> bool {
    match schema {
        Value::Bool(b) => *b,
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// A refused value as a message shows it: whole when short, cut
/// otherwise (a value may be a 16 MiB HTTP body).
pub(super) fn shown_value(value: &Value) -> String {
    const LONGEST: usize = 40;
    let text = value.to_string();
    if text.chars().count() <= LONGEST {
        return text;
    }
    let cut: String = text.chars().take(LONGEST - 1).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document as `#[service]` writes it: `add(x: i64, y: Option<i64>)`,
    /// `place(at: Point)` with a shared `Point`, `mood(m: Mood)`.
    fn contract() -> Contract {
        let int64 = json!({"type": "integer", "format": "int64",
            "minimum": i64::MIN, "maximum": i64::MAX});
        let opt_int64 = json!({"type": ["integer", "null"], "format": "int64",
            "minimum": i64::MIN, "maximum": i64::MAX});
        Contract::from_value(json!({
            "openrpc": "1.3.2",
            "info": {"title": "simple", "version": "0.1.0"},
            "methods": [
                {"name": "add", "paramStructure": "either", "params": [
                    {"name": "x", "required": true, "schema": int64},
                    {"name": "y", "required": false, "schema": opt_int64}],
                 "result": {"name": "result", "schema": int64}},
                {"name": "place", "paramStructure": "either", "params": [
                    {"name": "at", "required": true,
                     "schema": {"$ref": "#/components/schemas/Point"}}],
                 "result": {"name": "result", "schema": true}},
                {"name": "mood", "paramStructure": "either", "params": [
                    {"name": "m", "required": true,
                     "schema": {"$ref": "#/components/schemas/Mood"}},
                    {"name": "any", "required": false, "schema": true}],
                 "x-notification": true},
            ],
            "components": {"schemas": {
                "Point": {"type": "object", "required": ["x", "y"], "properties": {
                    "x": {"type": "integer", "format": "uint8", "minimum": 0, "maximum": 255},
                    "y": {"type": "number", "format": "double"},
                    "label": {"type": "string", "format": "email"}}},
                "Mood": {"type": "string", "enum": ["calm", "cross"]},
            }},
        }))
        .expect("a contract")
    }

    fn check(method: &str, params: Value) -> Result<(), ParamProblem> {
        contract().check_params(method, Some(&params))
    }

    fn message(method: &str, params: Value) -> String {
        match check(method, params.clone()) {
            Ok(()) => panic!("{method} {params} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn values_the_handler_takes_pass_by_position_and_by_name() {
        for params in [
            json!([1, 2]),
            json!([1]),
            json!([1, null]),
            json!({"x": 1}),
            json!({"y": 2, "x": 1}),
            json!({"x": i64::MAX}),
        ] {
            assert_eq!(check("add", params.clone()), Ok(()), "{params}");
        }
        assert_eq!(check("place", json!([{"x": 3, "y": 0.5}])), Ok(()));
        assert_eq!(check("mood", json!({"m": "calm", "any": [1, "a"]})), Ok(()));
    }

    #[test]
    fn a_method_without_params_takes_none_given() {
        let c = contract();
        assert_eq!(
            c.check_params("add", None).map_err(|e| e.to_string()),
            Err("missing argument `x`".to_owned())
        );
        assert_eq!(
            c.check_params("mood", None).map_err(|e| e.to_string()),
            Err("missing argument `m`".to_owned())
        );
    }

    #[test]
    fn shape_problems_read_as_the_plugin_answers_them() {
        assert_eq!(
            message("add", json!([1, 2, 3])),
            "too many params: `add` takes 2 (x, y), got 3"
        );
        assert_eq!(
            message("add", json!({"x": 1, "z": 3})),
            "unknown argument `z` for `add` (takes: x, y)"
        );
        assert_eq!(message("add", json!([])), "missing argument `x`");
        assert_eq!(message("add", json!({"y": 1})), "missing argument `x`");
        assert_eq!(
            message("add", json!(3)),
            "`params` must be an array or an object"
        );
    }

    #[test]
    fn a_value_the_schema_refuses_names_its_parameter() {
        let e = check("add", json!([1, "two"])).expect_err("refused");
        assert_eq!(e.param(), Some("y"));
        assert_eq!(
            e.to_string(),
            r#"invalid argument `y`: "two" is not of types "null", "integer""#
        );
        assert_eq!(
            message("add", json!({"x": 9_223_372_036_854_775_808_u64})),
            "invalid argument `x`: 9223372036854775808 is greater than the maximum of \
             9223372036854775807"
        );
        assert_eq!(
            message("add", json!([1.5])),
            r#"invalid argument `x`: 1.5 is not of type "integer""#
        );
    }

    #[test]
    fn shared_schemas_are_followed_and_the_place_inside_is_named() {
        assert_eq!(
            message("place", json!([{"x": 256, "y": 1}])),
            "invalid argument `at`: at /x: 256 is greater than the maximum of 255"
        );
        assert_eq!(
            message("place", json!({"at": {"x": 1}})),
            r#"invalid argument `at`: "y" is a required property"#
        );
        assert_eq!(
            message("mood", json!(["glum"])),
            r#"invalid argument `m`: "glum" is not one of "calm" or "cross""#
        );
    }

    #[test]
    fn formats_are_not_asserted() {
        // The handler's decoding decides which strings it takes.
        assert_eq!(
            check(
                "place",
                json!([{"x": 1, "y": 2, "label": "not an address"}])
            ),
            Ok(())
        );
    }

    #[test]
    fn a_long_refused_value_is_cut() {
        let long = "a".repeat(1000);
        let text = message("add", json!([long]));
        assert!(text.len() < 100, "{text}");
        assert!(text.starts_with(r#"invalid argument `x`: "aaaa"#), "{text}");
        assert!(text.contains("… is not of type"), "{text}");
    }

    #[test]
    fn errors_carry_the_codes_the_plugin_would_answer() {
        let e = check("nope", json!([])).expect_err("no such method");
        assert_eq!(e.to_string(), "method not found: `nope`");
        assert_eq!(e.to_rpc_error().code, RpcError::METHOD_NOT_FOUND);
        assert_eq!(e.param(), None);
        let e = check("add", json!([])).expect_err("missing");
        assert_eq!(
            e.to_rpc_error(),
            RpcError::invalid_params("missing argument `x`")
        );
        assert_eq!(e.param(), Some("x"));
        let e = check("add", json!({"z": 1})).expect_err("unknown");
        assert_eq!(e.param(), Some("z"));
        assert_eq!(
            check("add", json!("x"))
                .expect_err("not structured")
                .to_rpc_error()
                .code,
            RpcError::INVALID_REQUEST
        );
        assert_eq!(
            check("add", json!([1, 2, 3]))
                .expect_err("too many")
                .param(),
            None
        );
    }

    #[test]
    fn the_discovery_method_is_the_hosts() {
        assert_eq!(contract().check_params(DISCOVER_METHOD, None), Ok(()));
    }

    #[test]
    fn a_derived_contract_checks_names_count_and_required_only() {
        let c = Contract::derived("old", "0.1.0", None, &crate::contract::tests::old_add());
        assert_eq!(
            c.check_params("add", Some(&json!(["any", {"thing": 1}]))),
            Ok(())
        );
        assert_eq!(
            c.check_params("add", Some(&json!({"y": 1})))
                .map_err(|e| e.to_string()),
            Err("missing argument `x`".to_owned())
        );
        assert!(c.check_params("add", Some(&json!([1, 2, 3]))).is_err());
        assert!(c.check_params("sub", None).is_err());
    }

    #[test]
    fn a_schema_that_does_not_compile_checks_nothing() {
        let c = Contract::from_value(json!({
            "openrpc": "1.3.2", "info": {"title": "s", "version": "1"},
            "methods": [{"name": "m", "params": [
                {"name": "a", "required": true, "schema": {"$ref": "#/components/schemas/Gone"}}]}],
        }))
        .expect("a contract");
        assert_eq!(c.check_params("m", Some(&json!([1]))), Ok(()));
        assert!(c.check_params("m", Some(&json!([]))).is_err());
    }

    #[test]
    fn clones_share_the_compiled_checks_and_compare_by_document() {
        let c = contract();
        let before = c.clone();
        assert_eq!(check("add", json!([1])), Ok(()));
        c.check_params("add", Some(&json!([1])))
            .expect("compiles the checks");
        let after = c.clone();
        assert!(after.checks.0.get().is_some());
        assert_eq!(before, after);
        fn shared<T: Send + Sync + Clone>(_: &T) {}
        shared(&c);
    }
}
