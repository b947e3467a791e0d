//! docker-compose.yml cannot run here (no Docker engine), so it is checked by parsing: the
//! topics it creates are the configured ones, telemetry and state are co-partitioned, and the
//! compacted topics are compacted.

use std::collections::BTreeMap;
use std::path::Path;

use segloop::config::Config;

fn compose() -> serde_yaml_ng::Value {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml"))
            .unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

/// topic name → (partitions, compacted) from the kafka-init script.
fn created_topics() -> BTreeMap<String, (u32, bool)> {
    let c = compose();
    let script = c["services"]["kafka-init"]["command"][0].as_str().unwrap();
    let mut topics = BTreeMap::new();
    for line in script.lines().filter(|l| l.contains("--topic")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = |flag: &str| words.iter().position(|w| *w == flag).map(|i| words[i + 1]);
        topics.insert(
            at("--topic").unwrap().to_string(),
            (
                at("--partitions").unwrap().parse().unwrap(),
                line.contains("cleanup.policy=compact"),
            ),
        );
    }
    topics
}

#[test]
fn compose_creates_every_configured_topic() {
    let config = Config::default();
    let topics = created_topics();
    let t = &config.topics;
    for name in [
        &t.telemetry.name,
        &t.actions.name,
        &t.outcomes.name,
        &t.dlq.name,
        &t.decisions.name,
        &t.control.name,
        &t.state.name,
    ] {
        assert!(topics.contains_key(name), "compose does not create {name}");
    }
    assert_eq!(topics.len(), 7);
}

#[test]
fn telemetry_and_state_are_co_partitioned_and_compaction_is_set() {
    let config = Config::default();
    let topics = created_topics();
    let telemetry = topics[&config.topics.telemetry.name];
    let state = topics[&config.topics.state.name];
    assert_eq!(
        telemetry.0, state.0,
        "telemetry and state must be co-partitioned"
    );
    assert_eq!(telemetry.0 as i32, config.kafka.partitions);
    assert!(state.1 && topics[&config.topics.control.name].1);
    assert!(!telemetry.1);
}

#[test]
fn kafka_is_published_on_the_default_bootstrap_port() {
    let c = compose();
    let ports: Vec<&str> = c["services"]["kafka"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let default_port = Config::default()
        .kafka
        .bootstrap_servers
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert!(ports.contains(&format!("{default_port}:{default_port}").as_str()));
}
