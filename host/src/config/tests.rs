use super::*;
use crate::bus::QueueArgument;

fn load_text(text: &str, overrides: &Overrides, env: Option<&str>) -> Result<HostConfig, String> {
    let dir = std::env::temp_dir().join(format!("chcfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join("host.toml");
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    let bus_uri = |name: &str| env.filter(|_| name == BUS_URI_ENV).map(str::to_owned);
    let r = HostConfig::load(Some(&path), overrides, bus_uri).map_err(|e| {
        e.to_string()
            .replace(&path.display().to_string(), "host.toml")
    });
    let _ = std::fs::remove_dir_all(&dir);
    r
}

const EXAMPLE: &str = r#"
[bus]
uri = "memory://"
exchange = "commissaire"

[plugins]
dir = "plugins"

[http]
listen = "127.0.0.1:8080"

[[service]]
name = "simple"
queues = [{ name = "simple", routing_key = "simple.*" }]
concurrency = 16
config = { greeting = "hi" }
"#;

#[test]
fn the_ack_window_defaults_to_1_ms_and_is_bounded() {
    let ack_window = |toml: &str| load_text(toml, &Overrides::default(), None);
    assert_eq!(ack_window("").unwrap().ack_window, Duration::from_millis(1));
    assert_eq!(
        ack_window("[bus]\nack_window_us = 0\n").unwrap().ack_window,
        Duration::ZERO
    );
    for bad in ["-1", "100001"] {
        let e = ack_window(&format!("[bus]\nack_window_us = {bad}\n")).unwrap_err();
        assert!(
            e.to_string().contains("ack_window_us must be 0 to 100000"),
            "{e}"
        );
    }
}

#[test]
fn the_example_parses() {
    let c = load_text(EXAMPLE, &Overrides::default(), None).unwrap();
    assert_eq!(c.bus_uri, "memory://");
    assert_eq!(c.http_listen, Some("127.0.0.1:8080".parse().unwrap()));
    let s = c.service("simple");
    assert_eq!(s.concurrency, 16);
    assert_eq!(s.config, serde_json::json!({"greeting": "hi"}));
    assert!(c.plugins_dir.ends_with("plugins"));
    assert_eq!(c.reply_queue, crate::bus::ReplyQueueKind::Named);
    let direct = load_text(
        "[bus]\nreply_queue = \"direct\"\n",
        &Overrides::default(),
        None,
    );
    assert_eq!(
        direct.unwrap().reply_queue,
        crate::bus::ReplyQueueKind::Direct
    );
    let d = c.service("demo");
    assert_eq!(
        d.queues,
        vec![QueueConfig {
            name: "demo".into(),
            routing_key: "demo.*".into(),
            arguments: Default::default(),
        }]
    );
}

#[test]
fn queue_arguments_are_typed_and_uri_lists_join_as_kombu() {
    let c = load_text(
        r#"
[bus]
uri = ["amqp://h1", "amqp://u:p@h2/%2f"]
[[service]]
name = "simple"
queues = [{ name = "simple", routing_key = "simple.*", arguments = { "x-queue-type" = "quorum", "x-delivery-limit" = 5, "x-single-active-consumer" = false } }]
"#,
        &Overrides::default(),
        None,
    )
    .unwrap();
    assert_eq!(c.bus_uri, "amqp://h1;amqp://u:p@h2/%2f");
    let args = &c.service("simple").queues[0].arguments;
    assert_eq!(args["x-queue-type"], QueueArgument::Text("quorum".into()));
    assert_eq!(args["x-delivery-limit"], QueueArgument::Integer(5));
    assert_eq!(args["x-single-active-consumer"], QueueArgument::Bool(false));
    let err = load_text(
        "[bus]\nuri = \"amqp://h1;redis://h2\"\n",
        &Overrides::default(),
        None,
    )
    .unwrap_err();
    assert!(err.contains("a failover list takes amqp://"), "{err}");
    let err = load_text(
        "[[service]]\nname = \"s\"\nqueues = [{ name = \"s\", routing_key = \"s.*\", arguments = { x = [1] } }]\n",
        &Overrides::default(),
        None,
    )
    .unwrap_err();
    assert!(err.starts_with("host.toml:"), "{err}");
}

#[test]
fn a_redis_visibility_timeout_shorter_than_a_handler_s_time_is_refused() {
    let redis = |vt: &str| Overrides {
        bus_uri: Some(format!("redis://h/0?visibility_timeout={vt}")),
        ..Overrides::default()
    };
    let text = "[host]\nhandler_grace = 2\n\n[[service]]\nname = \"s\"\nhandler_timeout = 25\n";
    assert_eq!(
        load_text(text, &redis("20"), None).unwrap_err(),
        "host.toml:5:8: service `s`: handler_timeout (25 s) + [host] handler_grace (2 s) = 27 s \
         exceeds the Redis visibility_timeout (20 s): a request still running would be \
         delivered again; raise visibility_timeout in the bus URI or lower handler_timeout"
    );
    let c = load_text(text, &redis("27"), None).unwrap();
    assert_eq!(
        c.visibility_timeout,
        Some((Duration::from_secs(27), "--bus-uri".to_owned()))
    );
    assert!(c.check_services(&["s"]).is_ok());
    // A service without an entry runs with the default handler_timeout.
    let e = c.check_services(&["s", "other"]).unwrap_err().to_string();
    assert!(
        e.starts_with("--bus-uri: service `other`: handler_timeout (60 s, the default) + [host] handler_grace (2 s) = 62 s"),
        "{e}"
    );
    // kombu's default of one hour covers the defaults.
    let c = load_text(
        "[bus]\nuri = \"redis://h/0\"\n",
        &Overrides::default(),
        None,
    )
    .unwrap();
    assert_eq!(
        c.visibility_timeout.as_ref().map(|v| v.0),
        Some(Duration::from_secs(3600))
    );
    assert!(c.check_services(&["any"]).is_ok());
    assert_eq!(
        load_text("", &redis("soon"), None).unwrap_err(),
        "--bus-uri: bus URI redis://h/0?visibility_timeout=soon: \
         `visibility_timeout` must be a positive number of seconds, not `soon`"
    );
    assert_eq!(
        load_text("", &Overrides::default(), None)
            .unwrap()
            .visibility_timeout,
        None
    );
}

#[test]
fn flag_wins_over_env_which_wins_over_file() {
    let flag = Overrides {
        bus_uri: Some("amqp://flag".into()),
        ..Overrides::default()
    };
    let c = load_text(EXAMPLE, &flag, Some("amqp://env")).unwrap();
    assert_eq!(
        (c.bus_uri.as_str(), c.bus_uri_source.as_str()),
        ("amqp://flag", "--bus-uri")
    );
    assert_eq!(
        c.warnings,
        ["COMMISSAIRE_BUS_URI is set, but --bus-uri wins over it"]
    );
    let c = load_text(EXAMPLE, &Overrides::default(), Some("amqp://env")).unwrap();
    assert_eq!(
        (c.bus_uri.as_str(), c.bus_uri_source.as_str()),
        ("amqp://env", "COMMISSAIRE_BUS_URI")
    );
    assert_eq!(c.warnings.len(), 1);
    assert!(
        c.warnings[0].ends_with(
            "host.toml: [bus] uri is not used: COMMISSAIRE_BUS_URI is set and wins over it"
        ),
        "{:?}",
        c.warnings
    );
    let c = load_text(EXAMPLE, &Overrides::default(), None).unwrap();
    assert_eq!(c.bus_uri, "memory://");
    assert!(c.bus_uri_source.ends_with("host.toml: [bus] uri"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // A flag over a file is what flags are for: no warning.
    assert!(load_text(EXAMPLE, &flag, None).unwrap().warnings.is_empty());
    let c = load_text("", &Overrides::default(), Some("amqp://env")).unwrap();
    assert_eq!(c.bus_uri, "amqp://env");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // Set but empty, as `COMMISSAIRE_BUS_URI=` in an environment file
    // leaves it: not a URI, so the file's stands.
    assert_eq!(
        load_text(EXAMPLE, &Overrides::default(), Some(""))
            .unwrap()
            .bus_uri,
        "memory://"
    );
    let c = load_text("", &Overrides::default(), None).unwrap();
    assert_eq!(
        (c.bus_uri.as_str(), c.bus_uri_source.as_str()),
        (DEFAULT_BUS_URI, "the default")
    );
}

#[test]
fn queue_prefix_goes_before_every_service_queue() {
    let text = "[bus]\nqueue_prefix = \"staging.\"\n\n[[service]]\nname = \"simple\"\n\
                queues = [{ name = \"simple\", routing_key = \"simple.*\" }, \
                { name = \"extra\", routing_key = \"simple.extra\" }]\n";
    let c = load_text(text, &Overrides::default(), None).unwrap();
    let names = |s: ServiceSettings| s.queues.into_iter().map(|q| q.name).collect::<Vec<_>>();
    assert_eq!(
        names(c.service("simple")),
        ["staging.simple", "staging.extra"]
    );
    // A plugin without an entry: its default queue too.
    assert_eq!(names(c.service("demo")), ["staging.demo"]);
    // The default exchange would still hand every deployment a copy.
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("give each its own [bus] exchange too"));
    let separate = "[bus]\nqueue_prefix = \"staging.\"\nexchange = \"staging\"\n";
    assert!(load_text(separate, &Overrides::default(), None)
        .unwrap()
        .warnings
        .is_empty());
    // Routing keys are the callers' and stay as they are.
    assert_eq!(c.service("demo").queues[0].routing_key, "demo.*");
    assert_eq!(
        names(
            load_text("", &Overrides::default(), None)
                .unwrap()
                .service("demo")
        ),
        ["demo"]
    );
    for bad in ["a b", "st*", "x#", &"p".repeat(65)] {
        let e = load_text(
            &format!("[bus]\nqueue_prefix = \"{bad}\"\n"),
            &Overrides::default(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("host.toml:2:16: [bus] queue_prefix must be"),
            "{e}"
        );
    }
}

#[test]
fn errors_name_file_line_and_problem() {
    let cases = [
        ("[bus]\nurl = \"x\"\n", "host.toml:2:1: unknown field `url`"),
        (
            "[http]\nlisten = \"nope\"\n",
            "host.toml:2:10: invalid socket address syntax",
        ),
        (
            "[[service]]\nname = \"s\"\nconcurrency = 0\n",
            "host.toml:3:15:",
        ),
        ("[bus\n", "host.toml:1:5:"),
        (
            "[[service]]\nname = \"a\"\n[[service]]\nname = \"a\"\n",
            "host.toml:4:8: service `a` is configured twice",
        ),
        (
            "[[service]]\nname = \"s\"\nworkers = 2\n",
            "host.toml:3:11: service `s`: `workers` above 1 needs a shared bus \
             (amqp:// or redis://); memory:// is inside one process",
        ),
        (
            "[[service]]\nname = \"s\"\nhandler_timeout = -1\n",
            "host.toml:3:19: handler_timeout must be a positive number of seconds, not -1",
        ),
        (
            "[[service]]\nname = \"s\"\ninit_timeout = 0\n",
            "host.toml:3:16: init_timeout must be a positive number of seconds, not 0",
        ),
        (
            "[[service]]\nname = \"s\"\nmax_worker_rss = \"12 parsecs\"\n",
            "host.toml:3:18: service `s`: max_worker_rss: `12 parsecs`: unknown unit `parsecs`",
        ),
        (
            "[[service]]\nname = \"s\"\nmax_worker_rss = \"lots\"\n",
            "host.toml:3:18: service `s`: max_worker_rss: `lots` is not a size",
        ),
        (
            "[[service]]\nname = \"s\"\nmax_worker_rss = -5\n",
            "host.toml:3:18: service `s`: max_worker_rss: -5 is negative",
        ),
        (
            "[[service]]\nname = \"s\"\nmax_worker_rss = \"16 MiB\"\n",
            "host.toml:3:18: service `s`: max_worker_rss must be at least 32 MiB \
             (a worker needs about that to start), not 16777216 bytes",
        ),
        (
            "[bus]\nrequest_timeout = \"x\"\n",
            "host.toml:2:19: invalid type: string \"x\", expected f64",
        ),
        (
            "[bus]\nrequest_timeout = -3\n",
            "host.toml:2:19: [bus] request_timeout must be a positive number of seconds, not -3",
        ),
        (
            "[bus]\nreply_queue = \"pseudo\"\n",
            "host.toml:2:15: unknown variant `pseudo`, expected `named` or `direct`",
        ),
        (
            "[host]\nshutdown_timeout = 0\n",
            "host.toml:2:20: [host] shutdown_timeout must be a positive number of seconds, not 0",
        ),
    ];
    for (text, expected) in cases {
        let e = load_text(text, &Overrides::default(), None).unwrap_err();
        assert!(e.starts_with(expected), "{text:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn worker_settings_and_their_defaults() {
    let text = "[bus]\nuri = \"amqp://h\"\n[host]\nhandler_grace = 2.5\n\
                [[service]]\nname = \"s\"\nworkers = 3\nhandler_timeout = 5\ncrash_limit = 2\n";
    let c = load_text(text, &Overrides::default(), None).unwrap();
    let s = c.service("s");
    assert_eq!((s.workers, s.crash_limit), (3, 2));
    assert_eq!(s.handler_timeout, Duration::from_secs(5));
    assert_eq!(c.handler_grace, Duration::from_millis(2500));
    assert_eq!(c.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
    let d = c.service("other");
    assert_eq!((d.workers, d.crash_limit), (1, DEFAULT_CRASH_LIMIT));
    assert_eq!(d.handler_timeout, DEFAULT_HANDLER_TIMEOUT);
    assert_eq!(
        (d.init_timeout, d.max_worker_rss),
        (DEFAULT_INIT_TIMEOUT, None)
    );
    for (rss, bytes) in [
        ("536870912", 512 << 20),
        ("\"512 MiB\"", 512 << 20),
        ("\"512MB\"", 512_000_000),
        ("\"2 GiB\"", 2 << 30),
    ] {
        let text = format!(
            "[bus]\nuri = \"amqp://h\"\n[[service]]\nname = \"s\"\ninit_timeout = 2.5\nmax_worker_rss = {rss}\n"
        );
        let s = load_text(&text, &Overrides::default(), None)
            .unwrap()
            .service("s");
        assert_eq!(s.init_timeout, Duration::from_millis(2500));
        assert_eq!(s.max_worker_rss, Some(bytes), "{rss}");
    }
    // The bus given on the command line decides too.
    let memory = Overrides {
        bus_uri: Some("memory://".into()),
        ..Overrides::default()
    };
    let e = load_text(text, &memory, None).unwrap_err();
    assert!(
        e.starts_with("host.toml:7:11: service `s`: `workers` above 1"),
        "{e}"
    );
}

#[test]
fn http_settings_and_their_defaults() {
    let c = load_text(EXAMPLE, &Overrides::default(), None).unwrap();
    assert_eq!(c.http, HttpSettings::default());
    assert!(!c.http.validate, "off unless asked for");
    assert_eq!(c.http.max_in_flight, 1024);
    assert_eq!(c.http.max_buffered_bytes, 256 << 20);
    assert_eq!(c.http.header_timeout, Duration::from_secs(10));
    let text = "[http]\ntoken = \"s3cret\"\nallow = [\"simple.*\", \"demo.ping\"]\n\
                cors_origins = [\"https://Ops.example.com:8443\"]\n\
                max_in_flight = 8\nmax_connections = 16\nmax_buffered_bytes = 33554432\n\
                header_timeout = 2.5\nvalidate = true\n";
    let c = load_text(text, &Overrides::default(), None).unwrap();
    assert_eq!(c.http_listen, None);
    assert_eq!(
        c.http.token.as_ref().map(HttpToken::expose),
        Some(&b"s3cret"[..])
    );
    assert_eq!(
        c.http.allow,
        Some(vec!["simple.*".to_owned(), "demo.ping".to_owned()])
    );
    assert_eq!(c.http.cors_origins, ["https://ops.example.com:8443"]);
    assert_eq!((c.http.max_in_flight, c.http.max_connections), (8, 16));
    assert_eq!(c.http.max_buffered_bytes, 32 << 20);
    assert_eq!(c.http.header_timeout, Duration::from_millis(2500));
    assert!(c.http.validate);
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "the token is never printed"
    );
}

#[test]
fn the_environment_token_wins_over_the_file() {
    let dir = std::env::temp_dir().join(format!("chcfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("host.toml");
    std::fs::write(&path, "[http]\ntoken = \"from-file\"\n").unwrap();
    let env =
        |value: &'static str| move |name: &str| (name == HTTP_TOKEN_ENV).then(|| value.to_owned());
    let c = HostConfig::load(Some(&path), &Overrides::default(), env("from-env")).unwrap();
    assert_eq!(
        c.warnings,
        [format!(
            "{}: [http] token is not used: COMMISSAIRE_HTTP_TOKEN is set and wins over it",
            path.display()
        )]
    );
    assert_eq!(c.http.token.unwrap().expose(), b"from-env");
    let e = HostConfig::load(Some(&path), &Overrides::default(), env("")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "COMMISSAIRE_HTTP_TOKEN: the HTTP token is empty"
    );
    let e = HostConfig::load(Some(&path), &Overrides::default(), env("two words")).unwrap_err();
    assert!(!e.to_string().contains("two words"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_http_settings_name_the_line() {
    let cases = [
        (
            "[http]\ntoken = \"\"\n",
            "host.toml:2:9: [http] token is empty",
        ),
        (
            "[http]\ntoken = \"a b\"\n",
            "host.toml:2:9: [http] token must be visible ASCII characters without spaces",
        ),
        (
            "[http]\nallow = [\"\"]\n",
            "host.toml:2:10: [http] allow: `` is not",
        ),
        (
            "[http]\ncors_origins = [\"*\"]\n",
            "host.toml:2:17: [http] cors_origins: `*` is not an origin",
        ),
        (
            "[http]\ncors_origins = [\"https://a.example/path\"]\n",
            "host.toml:2:17: [http] cors_origins: `https://a.example/path` is not an origin",
        ),
        (
            "[http]\nmax_in_flight = 0\n",
            "host.toml:2:17: [http] max_in_flight must be at least 1, not 0",
        ),
        (
            "[http]\nmax_connections = -5\n",
            "host.toml:2:19: [http] max_connections must be at least 1, not -5",
        ),
        (
            "[http]\nmax_buffered_bytes = 0\n",
            "host.toml:2:22: [http] max_buffered_bytes must be at least 1, not 0",
        ),
        (
            "[http]\nheader_timeout = 0\n",
            "host.toml:2:18: [http] header_timeout must be a positive number of seconds",
        ),
        (
            "[http]\nlisten = \"127.0.0.1:0\"\nmax_buffered_bytes = 1048576\n",
            "host.toml:3:22: [http] max_buffered_bytes (1048576) must be at least \
             [bus] max_message_bytes (16777216)",
        ),
        (
            "[bus]\nmax_message_bytes = 300000000\n[http]\nlisten = \"127.0.0.1:0\"\n",
            "host.toml:2:21: [http] max_buffered_bytes (268435456) must be at least \
             [bus] max_message_bytes (300000000)",
        ),
        (
            "[http]\ntokens = \"x\"\n",
            "host.toml:2:1: unknown field `tokens`",
        ),
    ];
    for (text, expected) in cases {
        let e = load_text(text, &Overrides::default(), None).unwrap_err();
        assert!(e.starts_with(expected), "{text:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn the_buffered_bytes_are_checked_against_the_message_size_only_with_an_endpoint() {
    let text = "[bus]\nmax_message_bytes = 300000000\n";
    assert!(load_text(text, &Overrides::default(), None).is_ok());
    let listen = Overrides {
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Overrides::default()
    };
    let e = load_text(text, &listen, None).unwrap_err();
    assert!(e.contains("max_buffered_bytes"), "{e}");
    let text = "[bus]\nmax_message_bytes = 300000000\n[http]\nmax_buffered_bytes = 300000000\n";
    assert!(load_text(text, &listen, None).is_ok());
}

#[test]
fn line_and_column() {
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
    assert_eq!(line_col("ab", 0), (1, 1));
}

#[test]
fn breaking_upgrades_are_refused_unless_the_file_or_the_flag_allows_them() {
    let none = Overrides::default();
    assert!(!load_text("", &none, None).unwrap().allow_breaking_upgrades);
    let file = "[host]\nallow_breaking_upgrades = true\n";
    assert!(
        load_text(file, &none, None)
            .unwrap()
            .allow_breaking_upgrades
    );
    let flag = Overrides {
        allow_breaking_upgrades: true,
        ..Overrides::default()
    };
    assert!(load_text("", &flag, None).unwrap().allow_breaking_upgrades);
    let typo = "[host]\nallow_breaking_upgrade = true\n";
    let e = load_text(typo, &none, None).unwrap_err();
    assert!(e.contains("allow_breaking_upgrade"), "{e}");
}
