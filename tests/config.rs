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
