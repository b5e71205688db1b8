//! The `hello` service: a commissaire-host plugin to copy and rename.

use commissaire_plugin_api::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;

/// Greets people. (The doc comment of the `#[service]` impl is the
/// service's description in `commissaire-host plugins`.)
pub struct Hello {
    greeting: String,
}

/// The `config` table of the service's `[[service]]` entry. Unknown keys
/// are refused, so that a typo (`greting = "Hi"`) stops the host at start-up
/// with the entry's place in the file instead of being quietly ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    greeting: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            greeting: "Hello".to_owned(),
        }
    }
}

/// Someone to greet, as callers send it: `{"name": "Ada", "title": "Countess"}`.
/// (`JsonSchema`: its schema is in the service's contract, which callers
/// read with `commissaire-host describe hello`.)
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Person {
    name: String,
    title: Option<String>,
}

/// Greets people.
#[service(name = "hello")]
impl Hello {
    /// Builds the service once per worker from the `config` table of its
    /// `[[service]]` entry (`config = { greeting = "Hi" }`).
    fn init(config: Value) -> Result<Self, RpcError> {
        let Config { greeting } = serde_json::from_value(config)?;
        tracing::info!(%greeting, "hello starting");
        Ok(Self { greeting })
    }

    /// Greets `person`.
    ///
    /// Bus method `greet`: `[{"name": "Ada"}]` or `{"person": {"name": "Ada"}}`.
    /// An error the handler answers on purpose is declared for the
    /// contract, above it.
    #[rpc_error(-32010, "the name is empty")]
    fn on_greet(&self, person: Person) -> Result<String, RpcError> {
        if person.name.trim().is_empty() {
            return Err(RpcError::new(-32010, "the name is empty"));
        }
        Ok(match person.title {
            Some(title) => format!("{}, {title} {}!", self.greeting, person.name),
            None => format!("{}, {}!", self.greeting, person.name),
        })
    }

    /// Greets everyone `directory.list_people` knows.
    ///
    /// Takes the message, to use the bus; `async`, so that no thread waits
    /// for the directory's answer (`msg.bus().request(…)` is the blocking
    /// form, for a sync handler).
    async fn on_greet_everyone(&self, msg: &Message) -> Result<Vec<String>, RpcError> {
        tracing::debug!(reply_to = ?msg.reply_to(), "asking the directory");
        let people: Vec<Person> = msg
            .bus()
            .request_async("directory.list_people", json!([]))
            .await?;
        people.into_iter().map(|p| self.on_greet(p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commissaire_plugin_api::testing::TestService;

    #[test]
    fn greets_by_position_and_by_name() {
        let svc = TestService::<Hello>::new();
        assert_eq!(
            svc.call("greet", json!([{"name": "Ada"}])),
            Ok(json!("Hello, Ada!"))
        );
        assert_eq!(
            svc.call(
                "greet",
                json!({"person": {"name": "Ada", "title": "Countess"}})
            ),
            Ok(json!("Hello, Countess Ada!"))
        );
    }

    #[test]
    fn a_person_without_a_name_is_invalid_params() {
        let svc = TestService::<Hello>::new();
        let err = svc.call("greet", json!([{"title": "Dr"}])).unwrap_err();
        assert_eq!(err.code, RpcError::INVALID_PARAMS);
        assert!(
            err.message.contains("missing field `name`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn an_empty_name_is_the_declared_error() {
        let svc = TestService::<Hello>::new();
        let err = svc.call("greet", json!([{"name": " "}])).unwrap_err();
        assert_eq!(err.code, -32010);
    }

    #[test]
    fn the_contract_describes_greet() {
        let contract = TestService::<Hello>::contract();
        let greet = &contract["methods"][0];
        assert_eq!(greet["name"], "greet");
        assert_eq!(greet["params"][0]["name"], "person");
        assert_eq!(greet["errors"][0]["code"], -32010);
        let person = &contract["components"]["schemas"]["Person"];
        assert_eq!(person["required"], json!(["name"]));
    }

    #[test]
    fn the_config_sets_the_greeting() {
        let svc = TestService::<Hello>::with_config(json!({"greeting": "Hi"})).unwrap();
        assert_eq!(
            svc.call("greet", json!([{"name": "Bob"}])),
            Ok(json!("Hi, Bob!"))
        );
        let err = TestService::<Hello>::with_config(json!({"greeting": 3})).unwrap_err();
        assert_eq!(err.code, RpcError::INTERNAL_ERROR);
        let err = TestService::<Hello>::with_config(json!({"greting": "Hi"})).unwrap_err();
        assert!(
            err.message.contains("unknown field `greting`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn greets_everyone_the_directory_knows() {
        let svc = TestService::<Hello>::new().with_route("directory.*", |method, _params| {
            assert_eq!(method, "list_people");
            Ok(json!([{"name": "Ada"}, {"name": "Alan"}]))
        });
        assert_eq!(
            svc.call("greet_everyone", json!([])),
            Ok(json!(["Hello, Ada!", "Hello, Alan!"]))
        );
    }
}
