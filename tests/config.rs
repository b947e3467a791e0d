//! Config layering, errors that name key/file/line, cross-field checks, path resolution.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use segloop::config::{Config, ConfigError, Sources};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn load(file: Option<&Path>, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let overrides: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::load(&Sources {
        file,
        env: &env,
        overrides: &overrides,
    })
}

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let p = dir.path().join("c.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn shipped_configs_are_valid() {
    let c = load(Some(&repo("config/segloop.toml")), &[], &[]).unwrap();
    // The documented file states every default, and names the example policies.
    assert_eq!(
        c.policies.as_deref(),
        Some(repo("config/policies.toml").as_path())
    );
    assert_eq!(
        Config {
            policies: None,
            ..c
        },
        Config::default()
    );
    let demo = load(Some(&repo("config/demo.toml")), &[], &[]).unwrap();
    assert_eq!(demo.windows.size, Duration::from_secs(1));
}

#[test]
fn precedence_is_defaults_file_env_cli() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "[windows]\nsize = \"20s\"\ngrace = \"3s\"\n");
    let c = load(Some(&f), &[], &[]).unwrap();
    assert_eq!(c.windows.size, Duration::from_secs(20));
    assert_eq!(c.windows.out_of_orderness, Duration::from_secs(2)); // default
    let c = load(Some(&f), &[("SEGLOOP__WINDOWS__SIZE", "30s")], &[]).unwrap();
    assert_eq!(c.windows.size, Duration::from_secs(30));
    assert_eq!(c.windows.grace, Duration::from_secs(3));
    let c = load(
        Some(&f),
        &[("SEGLOOP__WINDOWS__SIZE", "30s")],
        &["windows.size=40s"],
    )
    .unwrap();
    assert_eq!(c.windows.size, Duration::from_secs(40));
    // Unrelated environment is ignored; numeric-looking strings still set string fields.
    let c = load(
        None,
        &[("PATH", "/bin"), ("SEGLOOP__KAFKA__GROUP_ID", "123")],
        &[],
    )
    .unwrap();
    assert_eq!(c.kafka.group_id, "123");
}

#[test]
fn unknown_key_names_key_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "[kafka]\ngroup_id = \"g\"\n\n[windows]\nsize = \"10s\"\nsizee = \"5s\"\n",
    );
    let e = load(Some(&f), &[], &[]).unwrap_err().to_string();
    assert!(e.contains("c.toml:6:1"), "{e}");
    assert!(e.contains("unknown field `sizee`"), "{e}");
}

#[test]
fn bad_value_names_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "[kafka]\npartitions = \"six\"\n");
    let e = load(Some(&f), &[], &[]).unwrap_err().to_string();
    assert!(e.contains("c.toml:2:14"), "{e}");
}

#[test]
fn bad_env_override_names_the_variable() {
    let e = load(None, &[("SEGLOOP__WINDOWS__SIZE", "soon")], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("SEGLOOP__WINDOWS__SIZE"), "{e}");
    let e = load(None, &[], &["windows.nope=1"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--set windows.nope=1") && e.contains("nope"),
        "{e}"
    );
    let e = load(None, &[], &["windows.size"]).unwrap_err().to_string();
    assert!(e.contains("key.path=value"), "{e}");
}

#[test]
fn cross_field_checks_say_what_to_change() {
    let e = load(None, &[], &["windows.size=10s", "windows.hop=3s"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("windows.hop") && e.contains("does not divide"),
        "{e}"
    );
    let e = load(None, &[], &["windows.relative_accuracy=0.05"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("windows.relative_accuracy"), "{e}");
    let e = load(None, &[], &["topics.actions.codec=json"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("topics.actions.codec"), "{e}");
    let e = load(None, &[], &["windows.segment_ttl=1s"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("windows.segment_ttl"), "{e}");
    assert!(load(None, &[], &["windows.size=10s", "windows.hop=5s"]).is_ok());
}

#[test]
fn paths_resolve_relative_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "policies = \"p.toml\"\n[topics.telemetry]\nname = \"t\"\nwriter_schemas = [\"s/v3.avsc\"]\n",
    );
    let c = load(Some(&f), &[], &[]).unwrap();
    assert_eq!(c.policies.unwrap(), dir.path().join("p.toml"));
    assert_eq!(
        c.topics.telemetry.writer_schemas,
        vec![dir.path().join("s/v3.avsc")]
    );
}

#[test]
fn librdkafka_properties_pass_through_as_strings() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"fetch.max.bytes\" = 1048576\n\"enable.idempotence\" = true\n",
    );
    let p = load(Some(&f), &[], &[])
        .unwrap()
        .kafka
        .librdkafka_properties();
    assert_eq!(p["security.protocol"], "SASL_SSL");
    assert_eq!(p["fetch.max.bytes"], "1048576");
    assert_eq!(p["enable.idempotence"], "true");
}

#[test]
fn window_groups_are_checked_and_policies_must_name_one_that_exists() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        &dir,
        "[windows.groups.slow]\nsize = \"10s\"\nhop = \"3s\"\n",
    );
    let e = load(Some(&bad), &[], &[]).unwrap_err().to_string();
    assert!(
        e.contains("windows.groups.slow.hop") && e.contains("does not divide"),
        "{e}"
    );
    let good = write(
        &dir,
        "[windows.groups.slow]\nsize = \"1m\"\nhop = \"10s\"\n",
    );
    let config = load(Some(&good), &[], &[]).unwrap();
    let policies = dir.path().join("p.toml");
    std::fs::write(
        &policies,
        "[[policies]]\nname = \"x\"\nwhen = \"mean(error) > 0.5\"\naction = \"rollback\"\nwindow = \"fast\"\n",
    )
    .unwrap();
    let e = segloop::policy::PolicySet::load_for(&policies, &config.windows)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("policy `x`: window") && e.contains("[windows.groups.fast]"),
        "{e}"
    );
    std::fs::write(
        &policies,
        "[[policies]]\nname = \"x\"\nwhen = \"mean(error) > 0.5\"\naction = \"rollback\"\nwindow = \"slow\"\n",
    )
    .unwrap();
    let set = segloop::policy::PolicySet::load_for(&policies, &config.windows).unwrap();
    assert_eq!(set.policies[0].window.as_deref(), Some("slow"));
}

#[test]
fn secrets_come_from_the_environment_or_a_file_and_print_redacted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "from-file-s3cret\n").unwrap();
    let p = write(
        &dir,
        r#"
[kafka.properties]
"sasl.username" = "alice"
"sasl.password" = { env = "KAFKA_PW" }
"ssl.key.password" = { file = "pw" }
"sasl.oauthbearer.client.secret" = "inline-s3cret"
"#,
    );
    let c = load(Some(&p), &[("KAFKA_PW", "env-s3cret")], &[]).unwrap();
    let props = c.kafka.librdkafka_properties();
    assert_eq!(props["sasl.password"], "env-s3cret");
    assert_eq!(props["ssl.key.password"], "from-file-s3cret");
    assert_eq!(props["sasl.oauthbearer.client.secret"], "inline-s3cret");
    for shown in [c.to_toml(), format!("{c:?}"), format!("{:?}", c.kafka)] {
        for secret in ["env-s3cret", "from-file-s3cret", "inline-s3cret"] {
            assert!(!shown.contains(secret), "{secret} printed in {shown}");
        }
        assert!(shown.contains("alice"), "non-secrets still print: {shown}");
    }
    assert!(
        c.to_toml().contains("KAFKA_PW"),
        "references print as themselves"
    );
    assert_eq!(
        c.kafka.shown("sasl.password").as_deref(),
        Some("[redacted]")
    );

    // A reference that cannot be read names the key and the fix.
    let e = load(Some(&p), &[], &[]).unwrap_err().to_string();
    assert!(
        e.contains("kafka.properties.sasl.password") && e.contains("KAFKA_PW is not set"),
        "{e}"
    );
    // A secret given on the command line is not echoed in errors either.
    let e = load(
        None,
        &[],
        &[
            "kafka.properties.\"sasl.password\"=cli-s3cret",
            "kafka.partitions=0",
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains("cli-s3cret"), "{e}");
}

#[test]
fn kafka_connection_settings_are_checked() {
    let e = load(
        None,
        &[],
        &[
            "kafka.compression=brotli",
            "kafka.topic_compression=fast",
            "kafka.connect_timeout=10ms",
        ],
    )
    .unwrap_err()
    .to_string();
    for field in [
        "kafka.compression",
        "kafka.topic_compression",
        "kafka.connect_timeout",
    ] {
        assert!(e.contains(field), "{field} not named in {e}");
    }
    let c = load(
        None,
        &[],
        &["kafka.compression=zstd", "kafka.topic_compression=producer"],
    )
    .unwrap();
    assert_eq!(c.kafka.compression, "zstd");
    assert_eq!(c.kafka.connect_timeout, Duration::from_secs(30));
}

/// This build reads every codec and speaks TLS and SCRAM; what it lacks is named.
#[test]
fn the_build_knows_what_it_supports() {
    let features = segloop::kafka::builtin_features();
    for f in [
        "gzip",
        "snappy",
        "lz4",
        "zstd",
        "ssl",
        "sasl_scram",
        "sasl_plain",
    ] {
        assert!(features.iter().any(|x| x == f), "{f} missing: {features:?}");
    }
    let ok = load(
        None,
        &[],
        &[
            "kafka.properties.\"security.protocol\"=SASL_SSL",
            "kafka.properties.\"sasl.mechanism\"=SCRAM-SHA-512",
            "kafka.compression=zstd",
        ],
    )
    .unwrap();
    assert_eq!(segloop::kafka::build_problems(&ok), Vec::<String>::new());
    let bad = load(
        None,
        &[],
        &[
            "kafka.properties.\"security.protocol\"=SASL_SSL",
            "kafka.properties.\"sasl.mechanism\"=GSSAPI",
            "kafka.properties.\"no.such.property\"=1",
        ],
    )
    .unwrap();
    let problems = segloop::kafka::build_problems(&bad).join("\n");
    assert!(problems.contains("GSSAPI"), "{problems}");
    assert!(problems.contains("no.such.property"), "{problems}");
}

/// A secret read from a file is bounded like config and policy files (found by the fuzz
/// corpus: `{ file = "/dev/zero" }` read until the memory ran out).
#[test]
fn a_secret_file_is_read_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "[kafka.properties]\n\"ssl.key.pem\" = { file = \"/dev/zero\" }\n",
    );
    let err = load(Some(&path), &[], &[]).unwrap_err().to_string();
    assert!(err.contains("larger than 1048576 bytes"), "{err}");
    let path = write(&dir, "[admin]\ntoken_file = \"/dev/zero\"\n");
    let err = load(Some(&path), &[], &[]).unwrap_err().to_string();
    assert!(err.contains("larger than 1048576 bytes"), "{err}");
}

/// Every block of the README's policy cookbook is a valid policy (issue #27): what users copy
/// must load.
#[test]
fn the_readme_policy_cookbook_parses() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let start = readme
        .find("## Policy cookbook")
        .expect("a cookbook section");
    let end = start + readme[start..].find("\n## ").unwrap();
    let section = &readme[start..end];
    let blocks: Vec<&str> = section
        .split("```toml\n")
        .skip(1)
        .map(|b| &b[..b.find("```").unwrap()])
        .collect();
    assert!(blocks.len() >= 6, "{}", blocks.len());
    for block in &blocks {
        segloop::policy::PolicySet::parse(block, "README cookbook")
            .unwrap_or_else(|e| panic!("{e}\n{block}"));
    }
    // All together, against windows that have the quantile and the `slow` group.
    let mut cfg = Config::default();
    cfg.windows.groups.insert(
        "slow".into(),
        segloop::config::WindowGroup {
            size: Duration::from_secs(300),
            hop: None,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cookbook.toml");
    std::fs::write(&path, blocks.concat()).unwrap();
    segloop::policy::PolicySet::load_for(&path, &cfg.windows).unwrap_or_else(|e| panic!("{e}"));
}

/// One field of a topic set in a file, the environment or the command line keeps the role's
/// default topic name (a table without `name` used to fail: "missing field `name`").
#[test]
fn one_topic_field_can_be_overridden_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "[topics.telemetry]\ncodec = \"avro-confluent\"\n");
    let c = load(Some(&path), &[], &[]).unwrap();
    assert_eq!(c.topics.telemetry.name, "segloop.telemetry");
    assert_eq!(
        c.topics.telemetry.codec,
        segloop::codec::CodecKind::AvroConfluent
    );
    let path = write(&dir, "[topics.telemetry]\nname = \"\"\n");
    assert!(
        load(Some(&path), &[], &[]).is_err(),
        "an empty name is still refused"
    );
    let c = load(
        None,
        &[("SEGLOOP__TOPICS__TELEMETRY__CODEC", "avro-confluent")],
        &["topics.outcomes.codec=avro-confluent"],
    )
    .unwrap();
    let defaults = segloop::config::TopicsConfig::default();
    assert_eq!(c.topics.telemetry.name, defaults.telemetry.name);
    assert_eq!(c.topics.outcomes.name, defaults.outcomes.name);
    assert_eq!(
        c.topics.telemetry.codec,
        segloop::codec::CodecKind::AvroConfluent
    );
}

/// `[schema_registry]`: each wrong combination names the field and the fix; the password is
/// read from its reference and never printed.
#[test]
fn schema_registry_settings_are_checked_and_the_password_never_printed() {
    let err = |sets: &[&str]| match load(None, &[], sets) {
        Err(ConfigError::Invalid(errors)) => errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        other => panic!("expected field errors, got {other:?}"),
    };
    assert!(err(&["schema_registry.url=registry:8081"]).contains("schema_registry.url"));
    assert!(err(&["schema_registry.username=u"]).contains("schema_registry.url is not"));
    let e = err(&[
        "schema_registry.url=https://r:8081",
        "schema_registry.certificate_location=/etc/hostname",
    ]);
    assert!(e.contains("schema_registry.key_location"), "{e}");
    let e = err(&[
        "schema_registry.url=http://r:8081",
        "schema_registry.ca_location=/etc/hostname",
    ]);
    assert!(e.contains("not https://"), "{e}");
    let e = err(&[
        "schema_registry.url=http://r:8081",
        "schema_registry.max_wait=1s",
    ]);
    assert!(e.contains("schema_registry.max_wait"), "{e}");
    let e = err(&[
        "schema_registry.url=http://r:8081",
        "schema_registry.username=u",
        "schema_registry.password.env=NOT_SET_ANYWHERE",
    ]);
    assert!(
        e.contains("schema_registry.password") && e.contains("NOT_SET_ANYWHERE"),
        "{e}"
    );

    let c = load(
        None,
        &[("REGISTRY_SECRET", "hunter2")],
        &[
            "schema_registry.url=http://r:8081",
            "schema_registry.username=u",
            "schema_registry.password.env=REGISTRY_SECRET",
        ],
    )
    .unwrap();
    assert_eq!(c.schema_registry.password().unwrap().expose(), "hunter2");
    let c = load(
        None,
        &[],
        &[
            "schema_registry.url=http://r:8081",
            "schema_registry.username=u",
            "schema_registry.password=hunter2",
        ],
    )
    .unwrap();
    assert_eq!(c.schema_registry.password().unwrap().expose(), "hunter2");
    for shown in [c.to_toml(), format!("{c:?}")] {
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}

/// A registry makes `schema_id` unused, and a registry without an avro-confluent topic is
/// unused itself: both are said, never silently ignored.
#[test]
fn unused_registry_settings_are_warned_about() {
    let c = load(None, &[], &["schema_registry.url=http://r:8081"]).unwrap();
    let w = c.registry_warnings();
    assert!(
        w.len() == 1 && w[0].contains("no topic uses the avro-confluent codec"),
        "{w:?}"
    );
    let c = load(
        None,
        &[],
        &[
            "schema_registry.url=http://r:8081",
            "topics.telemetry.codec=avro-confluent",
            "topics.telemetry.schema_id=7",
        ],
    )
    .unwrap();
    let w = c.registry_warnings();
    assert!(
        w.len() == 1 && w[0].contains("topics.telemetry.schema_id = 7"),
        "{w:?}"
    );
    assert!(load(None, &[], &[]).unwrap().registry_warnings().is_empty());
}
