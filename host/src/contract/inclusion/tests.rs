//! The inclusion rules, one case at a time.

use super::*;

/// A document holding `components`.
fn doc(components: Value) -> Value {
    json!({ "components": { "schemas": components } })
}

/// `wide` takes all of `narrow`, both without components.
fn takes(wide: Value, narrow: Value) -> Result<(), String> {
    let d = doc(json!({}));
    accepts_all(&wide, &d, &narrow, &d).map_err(|g| g.to_string())
}

fn int(format: &str) -> Value {
    json!({ "type": "integer", "format": format })
}

#[test]
fn identical_and_any_are_proven() {
    let point = json!({"type": "object", "properties": {"x": {"type": "integer"}}});
    assert_eq!(takes(point.clone(), point.clone()), Ok(()));
    assert_eq!(takes(json!(true), point.clone()), Ok(()));
    assert_eq!(takes(json!({}), point.clone()), Ok(()));
    assert_eq!(
        takes(json!({"description": "anything"}), point.clone()),
        Ok(())
    );
    assert_eq!(takes(point.clone(), json!(false)), Ok(()));
    assert_eq!(takes(point, json!(true)), Err("null".to_owned()));
}

#[test]
fn type_sets_widen_and_narrow() {
    let t = |types: Value| json!({ "type": types });
    assert_eq!(
        takes(t(json!(["integer", "null"])), t(json!("integer"))),
        Ok(())
    );
    assert_eq!(
        takes(t(json!("integer")), t(json!(["integer", "null"]))),
        Err("null".to_owned())
    );
    assert_eq!(
        takes(t(json!("string")), t(json!("integer"))),
        Err("integers".to_owned())
    );
    // integer ⊂ number.
    assert_eq!(takes(t(json!("number")), t(json!("integer"))), Ok(()));
    assert_eq!(
        takes(t(json!("integer")), t(json!("number"))),
        Err("numbers that are not integers".to_owned())
    );
}

#[test]
fn option_as_any_of_with_null_and_as_a_type_pair_are_the_same() {
    let d = doc(json!({"Point": {"type": "object", "required": ["x"],
        "properties": {"x": {"type": "integer"}}}}));
    let any_of = json!({"anyOf": [{"$ref": "#/components/schemas/Point"}, {"type": "null"}]});
    let point = json!({"$ref": "#/components/schemas/Point"});
    assert_eq!(accepts_all(&any_of, &d, &point, &d), Ok(()));
    assert_eq!(
        accepts_all(&point, &d, &any_of, &d).map_err(|g| g.to_string()),
        Err("null".to_owned())
    );
    assert_eq!(
        takes(
            json!({"anyOf": [{"type": "integer"}, {"type": "null"}]}),
            json!({"type": ["integer", "null"]})
        ),
        Ok(())
    );
    assert_eq!(
        takes(
            json!({"type": ["integer", "null"]}),
            json!({"anyOf": [{"type": "integer"}, {"type": "null"}]})
        ),
        Ok(())
    );
}

#[test]
fn numeric_ranges_and_integer_formats() {
    assert_eq!(takes(int("int64"), int("int32")), Ok(()));
    assert_eq!(
        takes(int("int32"), int("int64")),
        Err("integers < -2147483648".to_owned())
    );
    assert_eq!(takes(int("uint64"), int("uint8")), Ok(()));
    assert_eq!(
        takes(int("uint8"), int("uint16")),
        Err("integers > 255".to_owned())
    );
    assert_eq!(
        takes(int("int64"), int("uint64")),
        Err("integers > 9223372036854775807".to_owned())
    );
    assert_eq!(
        takes(int("uint32"), int("int8")),
        Err("integers < 0".to_owned())
    );
    // Bounds written out, as `#[service]` writes them, agree with the format.
    let written = json!({"type": "integer", "format": "int32",
        "minimum": i32::MIN, "maximum": i32::MAX});
    assert_eq!(takes(int("int32"), written.clone()), Ok(()));
    assert_eq!(takes(written, int("int32")), Ok(()));
    assert_eq!(
        takes(
            json!({"type": "number", "maximum": 10}),
            json!({"type": "number"})
        ),
        Err("numbers > 10".to_owned())
    );
    assert_eq!(
        takes(
            json!({"type": "number", "exclusiveMaximum": 10}),
            json!({"type": "integer", "maximum": 10})
        ),
        Err("integers ≥ 10".to_owned())
    );
    assert_eq!(
        takes(
            json!({"type": "number", "minimum": 0.5}),
            json!({"type": "number", "exclusiveMinimum": 0.5})
        ),
        Ok(())
    );
    assert_eq!(
        takes(json!({"type": "number", "format": "double"}), int("uint8")),
        Ok(())
    );
}

#[test]
fn objects_properties_required_and_additional() {
    let obj = |props: Value, required: Value| json!({"type": "object", "properties": props, "required": required});
    let x = json!({"x": {"type": "integer"}});
    let xy = json!({"x": {"type": "integer"}, "y": {"type": "string"}});
    // A new optional property, others still allowed: compatible.
    assert_eq!(
        takes(obj(xy.clone(), json!(["x"])), obj(x.clone(), json!(["x"]))),
        Ok(())
    );
    // A new required property.
    assert_eq!(
        takes(
            obj(xy.clone(), json!(["x", "y"])),
            obj(x.clone(), json!(["x"]))
        ),
        Err("objects without `y`".to_owned())
    );
    // A property's type, inside.
    assert_eq!(
        takes(
            obj(json!({"x": {"type": "string"}}), json!(["x"])),
            obj(x.clone(), json!(["x"]))
        ),
        Err("integers at `.x`".to_owned())
    );
    // No more unknown properties.
    let mut closed = obj(x.clone(), json!(["x"]));
    closed["additionalProperties"] = json!(false);
    assert_eq!(
        takes(closed.clone(), obj(x.clone(), json!(["x"]))),
        Err("objects with other properties".to_owned())
    );
    assert_eq!(
        takes(closed.clone(), obj(xy, json!(["x"]))),
        Err("objects with `y`".to_owned())
    );
    assert_eq!(takes(obj(x.clone(), json!(["x"])), closed), Ok(()));
    // Map values (`HashMap<String, u8>` → `HashMap<String, u16>`).
    let map = |f: &str| json!({"type": "object", "additionalProperties": int(f)});
    assert_eq!(takes(map("uint16"), map("uint8")), Ok(()));
    assert_eq!(
        takes(map("uint8"), map("uint16")),
        Err("integers > 255 at `.*`".to_owned())
    );
}

#[test]
fn arrays_items_and_tuples() {
    let list = |f: &str| json!({"type": "array", "items": int(f)});
    assert_eq!(takes(list("int64"), list("int32")), Ok(()));
    assert_eq!(
        takes(list("int32"), list("int64")),
        Err("integers < -2147483648 at `[]`".to_owned())
    );
    let tuple = |a: Value, b: Value| json!({"type": "array", "items": [a, b], "minItems": 2, "maxItems": 2});
    let pair = tuple(int("int32"), json!({"type": "string"}));
    assert_eq!(takes(pair.clone(), pair.clone()), Ok(()));
    assert_eq!(
        takes(
            tuple(int("int32"), json!({"type": "integer"})),
            pair.clone()
        ),
        Err("strings at `[1]`".to_owned())
    );
    // A tuple inside a list of its items' union; a list is no tuple.
    assert_eq!(
        takes(
            json!({"type": "array", "items": {"type": ["integer", "string"]}}),
            pair.clone()
        ),
        Ok(())
    );
    assert_eq!(
        takes(pair.clone(), list("int32")),
        Err("arrays of fewer than 2 items".to_owned())
    );
    // `prefixItems`, as `#[service]` writes an inline tuple.
    let prefixed = json!({"type": "array", "prefixItems": [int("int32"), {"type": "string"}],
        "minItems": 2, "maxItems": 2});
    assert_eq!(takes(pair.clone(), prefixed.clone()), Ok(()));
    assert_eq!(takes(prefixed, pair), Ok(()));
}

#[test]
fn enums_and_consts_by_set_inclusion() {
    let e = |values: Value| json!({"type": "string", "enum": values});
    assert_eq!(
        takes(e(json!(["a", "b", "c"])), e(json!(["a", "b"]))),
        Ok(())
    );
    assert_eq!(
        takes(e(json!(["a"])), e(json!(["a", "b"]))),
        Err("\"b\"".to_owned())
    );
    assert_eq!(
        takes(json!({"type": "string"}), json!({"const": "x"})),
        Ok(())
    );
    assert_eq!(
        takes(json!({"const": "x"}), json!({"type": "string"})),
        Err("values other than \"x\"".to_owned())
    );
    assert_eq!(
        takes(
            e(json!(["a", "b"])),
            json!({"type": "string", "maxLength": 1})
        ),
        Err("values other than \"a\", \"b\"".to_owned())
    );
    assert_eq!(
        takes(json!({"type": "boolean"}), json!({"enum": [true, false]})),
        Ok(())
    );
    assert_eq!(
        takes(
            json!({"enum": [null, true, false]}),
            json!({"type": ["null", "boolean"]})
        ),
        Ok(())
    );
}

#[test]
fn rust_enums_as_one_of() {
    // schemars' externally tagged enum: a string for unit variants,
    // an object with one key for the others.
    let shape = |with_triangle: bool| {
        let mut units = vec![json!("Empty")];
        if with_triangle {
            units.push(json!("Triangle"));
        }
        json!({"oneOf": [
            {"type": "string", "enum": units},
            {"type": "object", "additionalProperties": false, "required": ["Circle"],
             "properties": {"Circle": {"type": "number"}}},
            {"type": "object", "additionalProperties": false, "required": ["Square"],
             "properties": {"Square": int("uint32")}},
        ]})
    };
    assert_eq!(takes(shape(true), shape(false)), Ok(()));
    assert_eq!(
        takes(shape(false), shape(true)),
        Err("\"Triangle\"".to_owned())
    );
    // Internally tagged: a `const` tag tells the variants apart.
    let tagged = |y: &str| {
        json!({"oneOf": [
            {"type": "object", "required": ["kind", "x"], "properties": {
                "kind": {"type": "string", "const": "A"}, "x": int("int32")}},
            {"type": "object", "required": ["kind", "y"], "properties": {
                "kind": {"type": "string", "const": "B"}, "y": {"type": y}}},
        ]})
    };
    assert_eq!(takes(tagged("string"), tagged("string")), Ok(()));
    let widened = tagged("number");
    assert_eq!(takes(widened.clone(), tagged("integer")), Ok(()));
    assert_eq!(
        takes(tagged("integer"), widened),
        Err("numbers that are not integers at `.y`".to_owned())
    );
    // Two alternatives that may overlap: `oneOf` refuses a value both take.
    let overlapping = json!({"oneOf": [{"type": "integer"}, {"type": "number"}]});
    let gap = takes(overlapping, json!({"type": "integer"})).expect_err("unproven");
    assert!(gap.starts_with("cannot prove compatible"), "{gap}");
}

#[test]
fn refs_are_followed_in_each_document_and_recursion_ends() {
    let tree = |leaf: &str| {
        doc(
            json!({"Tree": {"type": "object", "required": ["kids"], "properties": {
            "leaf": {"type": leaf},
            "kids": {"type": "array", "items": {"$ref": "#/components/schemas/Tree"}}}}}),
        )
    };
    let r = json!({"$ref": "#/components/schemas/Tree"});
    let (narrow, wide) = (tree("integer"), tree("number"));
    assert_eq!(accepts_all(&r, &wide, &r, &narrow), Ok(()));
    assert_eq!(
        accepts_all(&r, &narrow, &r, &wide).map_err(|g| g.to_string()),
        Err("numbers that are not integers at `.leaf`".to_owned())
    );
    assert!(same(&r, &narrow, &r, &narrow));
    assert!(!same(&r, &narrow, &r, &wide));
    // The same `$ref` text naming a changed definition is no proof.
    let (a, b) = (
        doc(json!({"T": {"type": "integer"}})),
        doc(json!({"T": {"type": "string"}})),
    );
    let t = json!({"$ref": "#/components/schemas/T"});
    assert!(accepts_all(&t, &a, &t, &b).is_err());
    let dangling = json!({"$ref": "#/components/schemas/Gone"});
    let gap = accepts_all(&dangling, &a, &t, &a)
        .expect_err("dangling")
        .to_string();
    assert!(gap.starts_with("cannot prove compatible: `$ref`"), "{gap}");
}

#[test]
fn unread_constraints_must_stand_unchanged() {
    let s = |extra: Value| {
        let mut schema = json!({"type": "string"});
        if let (Some(o), Value::Object(e)) = (schema.as_object_mut(), extra) {
            o.extend(e);
        }
        schema
    };
    let pattern = s(json!({"pattern": "^a"}));
    assert_eq!(takes(pattern.clone(), pattern.clone()), Ok(()));
    // Only narrows where the old side had it.
    assert_eq!(takes(s(json!({})), pattern.clone()), Ok(()));
    assert_eq!(
        takes(pattern.clone(), s(json!({}))),
        Err("cannot prove compatible: `pattern` added".to_owned())
    );
    assert_eq!(
        takes(s(json!({"pattern": "^b"})), pattern),
        Err("cannot prove compatible: `pattern` changed".to_owned())
    );
    // A string-only keyword says nothing of integers.
    assert_eq!(
        takes(
            json!({"type": ["integer", "string"], "pattern": "^a"}),
            json!({"type": "integer"})
        ),
        Ok(())
    );
    // A new string format (`String` → `Uuid`).
    assert_eq!(
        takes(s(json!({"format": "uuid"})), s(json!({}))),
        Err("strings that are not `uuid`".to_owned())
    );
    assert_eq!(
        takes(s(json!({"maxLength": 8})), s(json!({"maxLength": 9}))),
        Err("strings of more than 8 characters".to_owned())
    );
}

#[test]
fn an_enum_into_a_format_is_not_proven_by_trying_its_values() {
    // `Day` becoming a `NaiveDate`: "Today" is no date, whatever the
    // format-blind checker says.
    let day = json!({"type": "string", "enum": ["Today", "Tomorrow"]});
    let date = json!({"type": "string", "format": "date"});
    let gap = takes(date, day).expect_err("not proven");
    assert!(gap.contains("`date` format"), "{gap}");
    // An integer format's range is read, not tried.
    assert_eq!(takes(int("int64"), json!({"enum": [1, 2]})), Ok(()));
}

#[test]
fn a_schema_shared_at_every_level_is_too_large_to_compare_not_a_stall() {
    // S_i = {a: S_{i+1}, b: S_{i+1}}: 2^40 paths to the leaf.
    let mut components = serde_json::Map::new();
    for i in 0..40 {
        let next = json!({ "$ref": format!("#/components/schemas/S{}", i + 1) });
        components.insert(
            format!("S{i}"),
            json!({"type": "object", "properties": {"a": next, "b": next}}),
        );
    }
    let mut old = components.clone();
    old.insert("S40".into(), json!({"type": "integer"}));
    let mut new = components;
    new.insert("S40".into(), json!({"type": "number"}));
    let (old, new) = (doc(Value::Object(old)), doc(Value::Object(new)));
    let root = json!({ "$ref": "#/components/schemas/S0" });
    let gap = accepts_all(&root, &new, &root, &old).expect_err("not proven");
    assert!(gap.to_string().contains("too large to compare"), "{gap}");
}
