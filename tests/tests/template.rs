//! `examples/plugin-template`: what a new author copies is a plugin the
//! host loads and serves, and the README shows its real `Cargo.toml`.

use commissaire_e2e::{template_library, workspace_root, RoutingBus};
use commissaire_host::plugin::PluginLibrary;
use serde_json::json;

#[test]
fn the_template_builds_into_a_plugin_the_host_serves() {
    let plugin = PluginLibrary::load(&template_library()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plugin.service_name, "hello");
    assert_eq!(
        plugin.api_version,
        commissaire_plugin_api::host::API_VERSION
    );
    let greet = plugin
        .methods
        .iter()
        .find(|m| m.name == "greet")
        .expect("greet");
    assert_eq!(greet.signature(), "greet(person: Person) -> String");
    let everyone = plugin
        .methods
        .iter()
        .find(|m| m.name == "greet_everyone")
        .expect("greet_everyone");
    assert_eq!(
        everyone.signature(),
        "async greet_everyone() -> Vec<String>"
    );
    let bus = RoutingBus::from_libraries(&[plugin]);
    assert_eq!(
        bus.call("hello.greet", json!([{"name": "Ada"}]))["result"],
        "Hello, Ada!"
    );
}

#[test]
fn the_readme_shows_the_templates_cargo_toml_verbatim() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let manifest = std::fs::read_to_string(root.join("examples/plugin-template/Cargo.toml"))
        .expect("the template's Cargo.toml");
    let section = readme
        .split("## Writing a plugin")
        .nth(1)
        .expect("a `Writing a plugin` section");
    let excerpt = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a toml block in `Writing a plugin`");
    assert_eq!(excerpt, manifest);
}
