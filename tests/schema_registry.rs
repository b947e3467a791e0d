//! The Schema Registry client against a scripted registry (an HTTP server in the test): what
//! each answer means, that an id is asked until answered and then never again, basic auth,
//! and the compatibility refusal at registration. The real registry (Apicurio) and the whole
//! run are in `tests/real_kafka.rs` (`registry` tests).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segloop::codec::{SchemaLookup, SchemaSource};
use segloop::config::{Config, Sources};
use segloop::registry::{Fetched, Registry, RegistryError, Resolver};

/// One scripted answer: status and body.
type Answer = (u16, String);

/// A request seen: method, path, Authorization header.
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A registry that answers from a script per path (the last answer repeats), noting every
/// request (method, path, Authorization header).
struct Scripted {
    url: String,
    seen: Seen,
    _server: Arc<tiny_http::Server>,
}

fn scripted(script: Vec<(&str, Vec<Answer>)>) -> Scripted {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let url = format!("http://{}/apis/ccompat/v7", server.server_addr());
    let seen: Seen = Arc::default();
    let mut script: Vec<(String, VecDeque<Answer>)> = script
        .into_iter()
        .map(|(p, a)| (p.to_string(), a.into()))
        .collect();
    let (s, log) = (server.clone(), seen.clone());
    std::thread::spawn(move || {
        for mut req in s.incoming_requests() {
            let mut body = String::new();
            let _ = req.as_reader().read_to_string(&mut body);
            let path = req
                .url()
                .strip_prefix("/apis/ccompat/v7")
                .unwrap_or(req.url())
                .to_string();
            let auth = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.to_string());
            log.lock()
                .unwrap()
                .push((req.method().to_string(), path.clone(), auth));
            let (status, text) = match script.iter_mut().find(|(p, _)| *p == path) {
                Some((_, answers)) if answers.len() > 1 => answers.pop_front().unwrap(),
                Some((_, answers)) => answers[0].clone(),
                None => (
                    404,
                    r#"{"error_code":40403,"message":"Schema not found"}"#.into(),
                ),
            };
            let _ = req.respond(tiny_http::Response::from_string(text).with_status_code(status));
        }
    });
    Scripted {
        url,
        seen,
        _server: server,
    }
}

fn config(url: &str, sets: &[&str]) -> Config {
    let sets: Vec<String> = [
        format!("schema_registry.url={url}"),
        "schema_registry.timeout=1s".into(),
    ]
    .into_iter()
    .chain(sets.iter().map(|s| s.to_string()))
    .collect();
    Config::load(&Sources {
        file: None,
        env: &Default::default(),
        overrides: &sets,
    })
    .unwrap()
}

fn registry(url: &str, sets: &[&str]) -> Registry {
    Registry::from_config(&config(url, sets).schema_registry)
        .unwrap()
        .unwrap()
}

fn schema_json(text: &str) -> String {
    serde_json::json!({ "schema": text }).to_string()
}

#[test]
fn answers_mean_found_missing_or_unavailable_and_credentials_are_sent() {
    let current = segloop::schema::SchemaKind::Telemetry.source();
    let r = scripted(vec![
        ("/schemas/ids/7", vec![(200, schema_json(current))]),
        (
            "/schemas/ids/8",
            vec![(
                200,
                r#"{"schema":"syntax = \"proto3\";","schemaType":"PROTOBUF"}"#.into(),
            )],
        ),
        ("/schemas/ids/9", vec![(500, "boom".into())]),
        ("/schemas/ids/10", vec![(401, "{}".into())]),
        (
            "/schemas/ids/11",
            vec![(200, "<html>a proxy</html>".into())],
        ),
    ]);
    let client = registry(
        &r.url,
        &[
            "schema_registry.username=alice",
            "schema_registry.password=s3cret",
        ],
    );
    assert_eq!(client.schema(7).unwrap(), Fetched::Found(current.into()));
    assert!(matches!(client.schema(8).unwrap(), Fetched::Missing(m) if m.contains("PROTOBUF")));
    assert!(
        matches!(client.schema(404).unwrap(), Fetched::Missing(m) if m.contains("not in the registry"))
    );
    let unavailable = |id| match client.schema(id) {
        Err(RegistryError::Unavailable { reason, .. }) => reason,
        other => panic!("expected unavailable for {id}, got {other:?}"),
    };
    assert!(unavailable(9).contains("HTTP 500"));
    assert!(unavailable(10).contains("schema_registry.username"));
    assert!(unavailable(11).contains("base URL"));
    // Nothing listening: unavailable, not missing.
    let gone = registry("http://127.0.0.1:9", &[]);
    assert!(matches!(
        gone.schema(7),
        Err(RegistryError::Unavailable { .. })
    ));
    // alice:s3cret
    let seen = r.seen.lock().unwrap();
    assert!(seen
        .iter()
        .all(|(_, _, auth)| auth.as_deref() == Some("Basic YWxpY2U6czNjcmV0")));
}

#[test]
fn registration_gives_the_id_and_a_compatibility_refusal_names_the_subject() {
    let r = scripted(vec![
        (
            "/subjects/t.actions-value/versions",
            vec![(200, r#"{"id":17}"#.into())],
        ),
        (
            "/subjects/t.decisions-value/versions",
            vec![(
                409,
                r#"{"error_code":409,"message":"Incompatible artifact: t.decisions-value"}"#.into(),
            )],
        ),
    ]);
    let client = registry(&r.url, &[]);
    let command = segloop::schema::SchemaKind::Command;
    assert_eq!(
        client
            .register("command", "t.actions-value", command.source())
            .unwrap(),
        17
    );
    let e = client
        .register("decision", "t.decisions-value", command.source())
        .unwrap_err();
    assert!(matches!(e, RegistryError::Incompatible { .. }));
    let text = e.to_string();
    assert!(
        text.contains("t.decisions-value") && text.contains("compatibility rule"),
        "{text}"
    );
    // The settings segloop writes with: the registered id, for avro-confluent topics only.
    let cfg = config(
        &r.url,
        &[
            "topics.actions.name=t.actions",
            "topics.actions.codec=avro-confluent",
            "topics.decisions.name=t.decisions",
        ],
    );
    let s = segloop::registry::writer_settings(
        &cfg,
        Some(&client),
        &cfg.topics.actions,
        "t.actions",
        command,
    )
    .unwrap();
    assert_eq!(s.schema_id, Some(17));
    let s = segloop::registry::writer_settings(
        &cfg,
        Some(&client),
        &cfg.topics.decisions,
        "t.decisions",
        segloop::schema::SchemaKind::Decision,
    )
    .unwrap();
    assert_eq!(s.schema_id, None, "single-object: no registration, no id");
    let posted = r.seen.lock().unwrap();
    assert_eq!(posted.iter().filter(|(m, _, _)| m == "POST").count(), 3);
}

/// Live: a lookup never blocks; an id is fetched in the background, asked again while the
/// registry fails, and once answered it is never asked again.
#[test]
fn the_background_resolver_asks_until_answered_then_never_again() {
    let current = segloop::schema::SchemaKind::Telemetry.source();
    let r = scripted(vec![(
        "/schemas/ids/5",
        vec![
            (503, "down".into()),
            (503, "down".into()),
            (200, schema_json(current)),
        ],
    )]);
    let client = Arc::new(registry(&r.url, &[]));
    let mut resolver = Resolver::background(client);
    let started = Instant::now();
    assert!(matches!(resolver.lookup(5), SchemaLookup::Waiting(_)));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a lookup must not block"
    );
    while !resolver.answered(5) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never answered"
        );
        assert!(matches!(resolver.lookup(5), SchemaLookup::Waiting(_)));
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..100 {
        assert_eq!(resolver.lookup(5), SchemaLookup::Found(current.into()));
    }
    assert_eq!(resolver.requests(), 3);
    let gets = r.seen.lock().unwrap().len();
    assert_eq!(gets, 3, "two failures, one answer, then never again");

    // A replay's resolver asks once and reports an unavailable registry as waiting.
    let mut blocking = Resolver::blocking(Arc::new(registry("http://127.0.0.1:9", &[])));
    assert!(
        matches!(blocking.lookup(5), SchemaLookup::Waiting(reason) if reason.contains("127.0.0.1:9"))
    );
}
