//! The service's contract: an OpenRPC 1.x document that `#[service]`
//! builds from the handlers' signatures, doc comments and declared errors,
//! with a JSON Schema for every argument and result (schemars, draft 7,
//! shared definitions under `components.schemas`).
//!
//! Used by the code `#[service]` generates; public only for that reason.

use std::marker::PhantomData;

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::transform::Transform;
use schemars::{JsonSchema, Schema};
use serde_json::{json, Map, Value};

/// The OpenRPC version of the documents.
pub const OPENRPC_VERSION: &str = "1.3.2";

/// The bus method every service answers with its contract (see the
/// protocol documentation): `<service>.rpc_discover`. JSON-RPC's own name,
/// `rpc.discover`, cannot be a routing key's last word.
pub const DISCOVER_METHOD: &str = "rpc_discover";

/// Builds one service's document, method by method.
pub struct ContractBuilder {
    generator: SchemaGenerator,
    methods: Vec<Value>,
}

/// One method as `#[service]` saw it.
pub struct MethodSpec {
    /// The bus method name.
    pub name: &'static str,
    /// The handler's doc comment.
    pub doc: &'static str,
    /// An `async fn` handler.
    pub is_async: bool,
    /// Marked `#[notification]`: callers expect no result.
    pub notification: bool,
    /// Its declared errors: (code, message).
    pub errors: &'static [(i64, &'static str)],
}

impl Default for ContractBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ContractBuilder {
    /// An empty document.
    pub fn new() -> Self {
        let settings = SchemaSettings::draft07().with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        });
        let generator = settings.with_transform(IntegerBounds).into_generator();
        Self {
            generator,
            methods: Vec::new(),
        }
    }

    /// The generator the argument and result schemas come from (see
    /// [`Probe`]).
    pub fn generator(&mut self) -> &mut SchemaGenerator {
        &mut self.generator
    }

    /// Adds a method with its `params` as (name, required, schema) and
    /// its result's schema.
    pub fn method(&mut self, spec: MethodSpec, params: Vec<(&str, bool, Value)>, result: Value) {
        let mut method = Map::new();
        method.insert("name".into(), spec.name.into());
        let summary = first_sentence(spec.doc);
        if !summary.is_empty() {
            method.insert("summary".into(), summary.into());
        }
        if !spec.doc.is_empty() {
            method.insert("description".into(), spec.doc.into());
        }
        method.insert("paramStructure".into(), "either".into());
        let params: Vec<Value> = params
            .into_iter()
            .map(|(name, required, schema)| {
                json!({ "name": name, "required": required, "schema": schema })
            })
            .collect();
        method.insert("params".into(), params.into());
        if !spec.notification {
            method.insert(
                "result".into(),
                json!({ "name": "result", "schema": result }),
            );
        }
        if !spec.errors.is_empty() {
            let errors: Vec<Value> = spec
                .errors
                .iter()
                .map(|(code, message)| json!({ "code": code, "message": message }))
                .collect();
            method.insert("errors".into(), errors.into());
        }
        if spec.is_async {
            method.insert("x-async".into(), true.into());
        }
        if spec.notification {
            method.insert("x-notification".into(), true.into());
        }
        self.methods.push(Value::Object(method));
    }

    /// The document as JSON text.
    pub fn finish(mut self, service: &str, version: &str, description: &str) -> String {
        let mut info = Map::new();
        info.insert("title".into(), service.into());
        info.insert("version".into(), version.into());
        if !description.is_empty() {
            info.insert("description".into(), description.into());
        }
        info.insert("x-plugin-api".into(), crate::abi::API_VERSION.into());
        let mut doc = Map::new();
        doc.insert("openrpc".into(), OPENRPC_VERSION.into());
        doc.insert("info".into(), Value::Object(info));
        doc.insert("methods".into(), Value::Array(self.methods));
        let schemas = self.generator.take_definitions(true);
        if !schemas.is_empty() {
            doc.insert("components".into(), json!({ "schemas": schemas }));
        }
        Value::Object(doc).to_string()
    }
}

/// The first sentence of a doc comment's first paragraph: up to its
/// first `. `, lines joined.
fn first_sentence(doc: &str) -> String {
    let paragraph: Vec<&str> = doc
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let text = paragraph.join(" ");
    match text.find(". ") {
        Some(end) => text[..=end].to_owned(),
        None => text,
    }
}

/// Stands for a handler's argument or result type `T` while its schema is
/// chosen: `(&Probe::<T>::new()).describe_schema(…)`, at the concrete type, finds [`Described`] when `T`
/// implements `JsonSchema`, else [`Undescribed`], whose deprecation is the
/// author's build-time warning. Method lookup tries `Probe<T>` by
/// reference (receiver `&Probe<T>`) before `&Probe<T>` by reference
/// (`&&Probe<T>`), so the first applies whenever it can.
pub struct Probe<T: ?Sized>(PhantomData<fn() -> Box<T>>);

impl<T: ?Sized> Probe<T> {
    /// A probe for `T`.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T: ?Sized> Default for Probe<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The branch for a type with a JSON Schema.
pub trait Described {
    /// Its schema.
    fn describe_schema(&self, generator: &mut SchemaGenerator) -> Value;
}

impl<T: ?Sized + JsonSchema> Described for Probe<T> {
    fn describe_schema(&self, generator: &mut SchemaGenerator) -> Value {
        // The settings' transforms (draft 7's, the integer bounds) reach
        // only the shared definitions by themselves: an inline schema
        // (`i64`'s, a tuple's) gets them here.
        let mut schema = generator.subschema_for::<T>();
        for transform in generator.transforms_mut() {
            transform.transform(&mut schema);
        }
        schema.to_value()
    }
}

/// The branch for a type without one: its contract says "any value".
pub trait Undescribed {
    /// "Any value", marked as the schema of a type without one (hosts
    /// compare it as unknown, not as "any").
    #[deprecated(
        note = "this type does not implement `schemars::JsonSchema`, so the service's \
                contract says it takes any value; add `#[derive(schemars::JsonSchema)]` to \
                it (with `schemars = \"1\"` in Cargo.toml) to describe it"
    )]
    fn describe_schema(&self, generator: &mut SchemaGenerator) -> Value {
        let _ = generator;
        serde_json::json!({ "x-undescribed": true })
    }
}

impl<T: ?Sized> Undescribed for &Probe<T> {}

/// Gives the integer formats schemars leaves unbounded (`int32`, `int64`,
/// `uint64`, …) the bounds the handler's decoding enforces, so that the
/// schema refuses what the handler answers -32602 to.
#[derive(Clone, Debug)]
struct IntegerBounds;

impl Transform for IntegerBounds {
    fn transform(&mut self, schema: &mut Schema) {
        schemars::transform::transform_subschemas(self, schema);
        let bounds: Option<(Value, Value)> = match schema.get("format").and_then(Value::as_str) {
            Some("int32") => Some((i32::MIN.into(), i32::MAX.into())),
            Some("int64" | "int") => Some((i64::MIN.into(), i64::MAX.into())),
            Some("uint32") => Some((0.into(), u32::MAX.into())),
            Some("uint64" | "uint") => Some((0.into(), u64::MAX.into())),
            _ => None,
        };
        let Some((min, max)) = bounds else { return };
        if let Some(object) = schema.as_object_mut() {
            object.entry("minimum").or_insert(min);
            object.entry("maximum").or_insert(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Opaque {
        x: i64,
    }

    #[test]
    #[allow(clippy::needless_borrow)] // The borrow picks the branch.
    fn a_described_type_gets_its_schema_and_another_any() {
        let mut builder = ContractBuilder::new();
        let int = (&Probe::<i64>::new()).describe_schema(builder.generator());
        assert_eq!(int["type"], "integer");
        assert_eq!(int["maximum"], i64::MAX);
        #[allow(deprecated)]
        let any = (&Probe::<Opaque>::new()).describe_schema(builder.generator());
        assert_eq!(any, json!({ "x-undescribed": true }));
    }

    #[test]
    fn the_first_sentence_is_the_summary() {
        assert_eq!(first_sentence("Adds. Then more.\nAnd more"), "Adds.");
        assert_eq!(
            first_sentence("Adds two\nnumbers. Then\n\nmore"),
            "Adds two numbers."
        );
        assert_eq!(first_sentence(""), "");
    }
}
