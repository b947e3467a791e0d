//! docker-compose.yml cannot run here (no Docker engine), so it is checked by parsing: every
//! file it references exists, ports and addresses agree with the config the container runs,
//! the topics it creates are the configured ones (telemetry and state co-partitioned), and the
//! Grafana dashboard queries only documented metrics.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use segloop::config::{Config, Sources};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn compose() -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(repo("docker-compose.yml")).unwrap()).unwrap()
}

/// The environment compose gives a service, interpolated with `user` (the environment of
/// `docker compose up`).
fn service_env(service: &str, user: &HashMap<String, String>) -> HashMap<String, String> {
    let c = compose();
    c["services"][service]["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        interpolate(v.as_str().unwrap(), user).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The config the segloop and actuator containers run (`/etc/segloop` is `config/`), with the
/// admin token the README tells users to export.
fn container_config() -> Config {
    let user = HashMap::from([(
        "SEGLOOP_ADMIN_TOKEN".to_string(),
        "exported-token".to_string(),
    )]);
    for service in ["segloop", "actuator"] {
        let env = service_env(service, &user);
        let config = container_config_with(&env);
        assert_eq!(
            config.admin.token.as_ref().map(|t| t.expose()),
            Some("exported-token"),
            "{service} gets the admin token"
        );
    }
    // Without it the containers refuse to start, naming the variable.
    let e = load_container_config(&service_env("segloop", &HashMap::new())).unwrap_err();
    assert!(e.to_string().contains("SEGLOOP_ADMIN_TOKEN"), "{e}");
    container_config_with(&service_env("segloop", &user))
}

fn container_config_with(env: &HashMap<String, String>) -> Config {
    load_container_config(env).unwrap()
}

fn load_container_config(
    env: &HashMap<String, String>,
) -> Result<Config, segloop::config::ConfigError> {
    let c = compose();
    let cmd: Vec<&str> = c["services"]["segloop"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let at = cmd.iter().position(|a| *a == "--config").unwrap();
    let file = cmd[at + 1]
        .strip_prefix("/etc/segloop/")
        .expect("config from /etc/segloop");
    Config::load(&Sources {
        file: Some(&repo("config").join(file)),
        env,
        overrides: &[],
    })
}

/// Compose's own interpolation of a string from the file (as `docker compose` does before
/// any shell sees it): `$$` is a literal `$`; `$NAME`, `${NAME}`, `${NAME:-default}` and
/// `${NAME-default}` take the environment (empty when unset).
fn interpolate(s: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('$') => {
                chars.next();
                out.push('$');
            }
            Some('{') => {
                chars.next();
                let inner: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let (name, default) = match inner.split_once(":-").or_else(|| inner.split_once('-'))
                {
                    Some((n, d)) => (n.to_string(), Some(d.to_string())),
                    None => (inner.clone(), None),
                };
                let value = env.get(&name).filter(|v| !v.is_empty()).cloned();
                out.push_str(&value.or(default).unwrap_or_default());
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let mut name = String::new();
                while let Some(c) = chars
                    .peek()
                    .filter(|c| c.is_ascii_alphanumeric() || **c == '_')
                {
                    name.push(*c);
                    chars.next();
                }
                out.push_str(env.get(&name).map_or("", String::as_str));
            }
            _ => {
                return Err(format!(
                    "invalid interpolation format at {:?}",
                    &s[..s.len().min(40)]
                ))
            }
        }
    }
    Ok(out)
}

/// topic name → (partitions, compacted): the kafka-init script, interpolated as compose does
/// it, run through bash with a stand-in `kafka-topics.sh` that records its arguments.
fn created_topics() -> BTreeMap<String, (u32, bool)> {
    let c = compose();
    let service = &c["services"]["kafka-init"];
    let entrypoint: Vec<&str> = service["entrypoint"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(entrypoint, ["/bin/bash", "-c"]);
    let script = interpolate(service["command"][0].as_str().unwrap(), &HashMap::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    let fake = dir.path().join("kafka-topics.sh");
    std::fs::write(
        &fake,
        format!("#!/bin/bash\nprintf '%s\\n' \"$*\" >> {}\n", log.display()),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&fake)
        .status()
        .unwrap();
    // The one change: the image's tool directory is the stand-in's.
    let script = script.replace("/opt/kafka/bin/", &format!("{}/", dir.path().display()));
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the init script fails: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let mut topics = BTreeMap::new();
    for line in calls.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = |flag: &str| words.iter().position(|w| *w == flag).map(|i| words[i + 1]);
        assert_eq!(at("--bootstrap-server"), Some("kafka:19092"), "{line}");
        assert!(
            words.contains(&"--create") && words.contains(&"--if-not-exists"),
            "{line}"
        );
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
fn compose_interpolation_is_modelled() {
    let env = HashMap::from([("A".to_string(), "1".to_string())]);
    assert_eq!(
        interpolate("$$t $A ${A} ${B:-x} $B.", &env).unwrap(),
        "$t 1 1 x ."
    );
    // The mistake this test exists for: a shell variable written for compose loses itself.
    assert_eq!(interpolate("$t --topic", &env).unwrap(), " --topic");
}

#[test]
fn compose_creates_every_configured_topic_co_partitioned() {
    let config = container_config();
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
    let telemetry = topics[&t.telemetry.name];
    let state = topics[&t.state.name];
    assert_eq!(
        telemetry.0, state.0,
        "telemetry and state must be co-partitioned"
    );
    assert_eq!(telemetry.0 as i32, config.kafka.partitions);
    assert!(state.1 && topics[&t.control.name].1 && !telemetry.1);
}

#[test]
fn the_container_config_and_its_policies_are_valid() {
    let config = container_config();
    segloop::policy::PolicySet::for_config(&config).unwrap();
    // The brokers named in the config are the kafka service's internal listener.
    let c = compose();
    let listeners = c["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        .as_str()
        .unwrap();
    assert!(
        listeners.contains(&format!("PLAINTEXT://{}", config.kafka.bootstrap_servers)),
        "{listeners} vs {}",
        config.kafka.bootstrap_servers
    );
    // The actuator container runs the same config, and every action of the example policies
    // (and their escalations) has a shell handler.
    let set = segloop::policy::PolicySet::for_config(&config).unwrap();
    for p in &set.policies {
        for action in std::iter::once(&p.action).chain(p.escalate.iter()) {
            assert!(
                config.actuator.shell.contains_key(action),
                "no handler for {action}"
            );
        }
    }
}

#[test]
fn ports_agree_between_compose_config_and_prometheus() {
    let config = container_config();
    let admin_port = config.admin.listen.rsplit(':').next().unwrap().to_string();
    let c = compose();
    let ports: Vec<&str> = c["services"]["segloop"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        ports.iter().any(|p| p.ends_with(&format!(":{admin_port}"))),
        "segloop publishes {ports:?}, admin listens on {admin_port}"
    );
    let prom: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo("deploy/prometheus/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap();
    assert_eq!(target, format!("segloop:{admin_port}"));
}

#[test]
fn every_referenced_file_exists() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    for (name, svc) in services {
        if let Some(build) = svc.get("build") {
            let ctx = repo(build["context"].as_str().unwrap());
            assert!(
                ctx.join(build["dockerfile"].as_str().unwrap()).is_file(),
                "{name:?}: Dockerfile"
            );
        }
        for v in svc
            .get("volumes")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
        {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            assert!(repo(src).exists(), "{name:?}: {src} is missing");
        }
    }
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo(src).exists(), "Dockerfile copies missing {src}");
        }
    }
}

#[test]
fn the_dashboard_queries_only_documented_metrics() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/dashboards/segloop.json")).unwrap(),
    )
    .unwrap();
    let mut used = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("segloop_").map(|_| word) {
                    let base = name.trim_end_matches("_bucket");
                    assert!(
                        segloop::metrics::ALL.contains(&base),
                        "undocumented metric {name}"
                    );
                    used += 1;
                }
            }
        }
    }
    assert!(used >= 10);
}

/// The dashboard is importable anywhere (issue #27): the datasource is an input and a
/// datasource variable (no hard-coded uid), and instance and policy are template variables
/// every query uses; escalations, suppressions, DLQ and lag have panels.
#[test]
fn the_dashboard_is_importable_with_template_variables() {
    let text = std::fs::read_to_string(repo("deploy/grafana/dashboards/segloop.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["DS_PROMETHEUS", "instance", "policy"]);
    for panel in dash["panels"].as_array().unwrap() {
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{}",
            panel["title"]
        );
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("instance=~\"$instance\""), "{expr}");
        }
    }
    let titles: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    for want in ["escalations", "suppressed", "dlq", "lag"] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no {want} panel: {titles:?}"
        );
    }
}

/// The image (issue #27): dependencies build in a layer of their own (before the sources are
/// copied), the binary is stripped, the commit is passed for `segloop_build_info`, and the
/// build context leaves out build output and history.
#[test]
fn the_dockerfile_caches_dependencies_and_strips_the_binary() {
    let df = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let at = |needle: &str| {
        df.find(needle)
            .unwrap_or_else(|| panic!("the Dockerfile lacks {needle:?}"))
    };
    let deps = at("COPY Cargo.toml Cargo.lock");
    let first_build = at("cargo build --release --locked");
    let sources = at("COPY src ./src");
    assert!(
        deps < first_build && first_build < sources,
        "dependencies build before the sources are copied"
    );
    assert!(df[sources..].contains("cargo build --release --locked"));
    assert!(df.contains("strip "), "a stripped binary");
    assert!(df.contains("ARG SEGLOOP_COMMIT") && df.contains("SEGLOOP_COMMIT="));
    let ignore = std::fs::read_to_string(repo(".dockerignore")).unwrap();
    for path in ["target", ".git", "fuzz"] {
        assert!(
            ignore
                .lines()
                .any(|l| l.trim_start_matches('/').trim_end_matches('/') == path),
            ".dockerignore lacks {path}"
        );
    }
}

/// The Kubernetes manifests (issue #27; their schema is checked offline by kubernetes-validate
/// in .ci/run): the config in the ConfigMap is one `segloop check-config` accepts, each pod
/// gets its own transactional.id from its name, the probes are /healthz and /readyz on the
/// admin port, and a disruption budget keeps rollouts one pod at a time.
#[test]
fn the_kubernetes_manifests_hold_a_valid_config_and_per_pod_identity() {
    let text = std::fs::read_to_string(repo("deploy/kubernetes/segloop.yaml")).unwrap();
    let docs: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let data = &kind("ConfigMap")["data"];
    let dir = tempfile::tempdir().unwrap();
    let at = format!("{}/", dir.path().display());
    std::fs::write(
        dir.path().join("segloop.toml"),
        data["segloop.toml"]
            .as_str()
            .unwrap()
            .replace("/etc/segloop/", &at),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policies.toml"),
        data["policies.toml"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    std::fs::write(dir.path().join("tls/ca.pem"), "x").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(["check-config"])
        .arg(dir.path().join("segloop.toml"))
        .env("KAFKA_PASSWORD", "x")
        .env("SEGLOOP_ADMIN_TOKEN", "y")
        .env("SEGLOOP__DELIVERY__TRANSACTIONAL_ID", "segloop-segloop-0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pod = &kind("StatefulSet")["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<(&str, String)> = pod["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                serde_yaml_ng::to_string(e).unwrap(),
            )
        })
        .collect();
    let find = |n: &str| {
        env.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert!(find("POD_NAME").contains("metadata.name"));
    assert!(find("SEGLOOP__DELIVERY__TRANSACTIONAL_ID").contains("$(POD_NAME)"));
    assert_eq!(pod["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(pod["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(kind("PodDisruptionBudget")["spec"]["maxUnavailable"].as_u64() == Some(1));
    assert!(kind("Secret")["stringData"]["admin-token"].is_string());
    assert_eq!(
        kind("Service")["spec"]["ports"][0]["port"].as_u64(),
        Some(9464)
    );
}
