//! The topics a backtest reads and writes besides telemetry: the sandbox for would-be
//! commands, recorded outcomes, and the live commands it is compared with.

use super::*;

/// The would-be commands' topic.
pub(super) struct Sandbox {
    pub(super) producer:
        rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    pub(super) codec: Box<dyn crate::codec::Codec<RemediationCommand>>,
    pub(super) topic: String,
}

impl Sandbox {
    pub(super) fn new(config: &Config, topic: &str) -> anyhow::Result<Sandbox> {
        let a = &config.topics.actions;
        Ok(Sandbox {
            producer: crate::kafka::producer_config(
                config,
                &[
                    ("enable.idempotence", "true"),
                    ("partitioner", "murmur2_random"),
                ],
            )
            .create()
            .context("cannot create the sandbox producer")?,
            codec: build_codec::<RemediationCommand>(
                a.codec,
                &crate::registry::writer_settings(
                    config,
                    crate::registry::Registry::from_config(&config.schema_registry)
                        .map_err(anyhow::Error::msg)?
                        .as_ref(),
                    a,
                    topic,
                    crate::schema::SchemaKind::Command,
                )?,
            )
            .map_err(anyhow::Error::msg)?,
            topic: topic.to_string(),
        })
    }

    pub(super) fn send(&self, cmd: &RemediationCommand) {
        use rdkafka::producer::BaseRecord;
        let mut bytes = Vec::with_capacity(256);
        if self.codec.encode(cmd, &mut bytes).is_err() {
            return;
        }
        let rec = BaseRecord::<[u8], [u8]>::to(&self.topic)
            .key(cmd.segment.as_bytes())
            .payload(&bytes);
        if let Err(e) = crate::kafka::send_waiting(&self.producer, rec) {
            tracing::error!(error = %e, command_id = %cmd.command_id, "cannot queue a command for the sandbox topic");
        }
    }

    pub(super) fn flush(&self) -> anyhow::Result<()> {
        use rdkafka::producer::Producer as _;
        self.producer
            .flush(std::time::Duration::from_secs(30))
            .context("the sandbox topic did not take every command")
    }
}

/// Every record of a topic (committed records only) that decodes, oldest first by (`time`,
/// partition, offset).
pub(super) fn read_topic<T: crate::codec::Record>(
    config: &Config,
    topic: &crate::config::TopicConfig,
    fetch_max_bytes: Option<usize>,
    time: fn(&T) -> i64,
) -> anyhow::Result<Vec<T>> {
    let settings = config.schema_settings(topic);
    let build = || build_codec::<T>(topic.codec, &settings).map_err(anyhow::Error::msg);
    let (mut merge_codec, mut codec) = (build()?, build()?);
    let resolver = crate::registry::blocking_resolver(config)?;
    let (mut merge_source, mut source) = (resolver.clone(), resolver);
    let unanswered = Unanswered::default();
    let merge_unanswered = unanswered.clone();
    // Decodes a value, its schema learned from the registry first when it is new.
    pub(super) fn decode<T>(
        codec: &mut Box<dyn crate::codec::Codec<T>>,
        source: Option<&mut crate::registry::Resolver>,
        value: Option<&[u8]>,
        unanswered: &Unanswered,
    ) -> Option<T> {
        let value = value?;
        if let Some(source) = source {
            if let Err(e) = crate::codec::learn_schema(codec.as_mut(), source, value) {
                unanswered.note(e);
                return None;
            }
        }
        codec.decode(value).ok()
    }
    let range = source::resolve_range(config, &topic.name, None, 0)?;
    let mut out = Vec::new();
    source::read_merged(
        config,
        &range,
        fetch_max_bytes,
        move |_, v| {
            decode(
                &mut merge_codec,
                merge_source.as_mut(),
                v,
                &merge_unanswered,
            )
            .map(|r| time(&r))
        },
        |r| {
            if let Some(record) = decode(&mut codec, source.as_mut(), r.value, &unanswered) {
                out.push(record);
            }
        },
    )?;
    if let Some((id, reason)) = unanswered.take() {
        anyhow::bail!(
            "{}: the schema registry did not answer for schema id {id}: {reason}",
            topic.name
        );
    }
    Ok(out)
}

/// The outcomes topic's whole history, oldest first.
pub(super) fn read_outcomes(
    config: &Config,
    opts: &Options,
) -> anyhow::Result<Vec<RemediationOutcome>> {
    read_topic(
        config,
        &config.topics.outcomes,
        opts.fetch_max_bytes,
        |o: &RemediationOutcome| o.ts_ms,
    )
}

/// Commands the live loop issued (the actions topic), for `--against-live`.
///
/// # Errors
/// The actions topic cannot be read.
pub fn read_live_commands(
    config: &Config,
    fetch_max_bytes: Option<usize>,
) -> anyhow::Result<Vec<RemediationCommand>> {
    read_topic(
        config,
        &config.topics.actions,
        fetch_max_bytes,
        |c: &RemediationCommand| c.issued_at_ms,
    )
}
