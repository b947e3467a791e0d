//! The state changelog: controller state per segment and a record per partition.

use super::*;

/// A state or control record written by a newer segloop: the run stops rather than misread it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct NewerRecord(pub(super) String);

/// The changelog key of a partition's own record (`closed_through`); segment ids are never
/// empty, so it cannot collide with one.
pub(super) const PARTITION_KEY: &[u8] = b"";

/// The partition record of the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(super) struct PartitionRecord {
    #[serde(default = "one")]
    pub(super) version: u32,
    pub(super) closed_through_ms: i64,
    /// The dead-letter mark: every failed record at or below this offset is in the DLQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) dead_lettered_through: Option<i64>,
}

/// What the changelog's partition record says of its partition.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartitionMarks {
    /// The end of the last window judged.
    pub closed_through_ms: Option<i64>,
    /// The dead-letter mark.
    pub dead_lettered_through: Option<i64>,
}

/// A partition's controller state as read from the changelog.
pub(super) type Restored = (Vec<crate::controller::SegmentState>, PartitionMarks);

/// The changelog's reader: restores the state of assigned partitions, within
/// `delivery.restore_timeout` for one assignment as a whole.
pub(super) struct Changelog {
    reader: BaseConsumer<kafka::QuietEof>,
    topic: String,
    timeout: Duration,
}

impl Changelog {
    pub(super) fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(Changelog {
            reader: state_reader(config)?,
            topic: config.topics.state.name.clone(),
            timeout: config.delivery.restore_timeout,
        })
    }

    /// Reads the state of `parts`, one after the other, all within the restore timeout; each
    /// with the seconds its read took. `progress` is told where the restore is, as a
    /// sentence, every 10,000 records.
    pub(super) fn restore(
        &self,
        parts: &[i32],
        progress: &mut dyn FnMut(String),
    ) -> Vec<(i32, anyhow::Result<Restored>, f64)> {
        let deadline = Instant::now() + self.timeout;
        parts
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let _span = tracing::info_span!("restore", partition = p).entered();
                let started = Instant::now();
                let read = read_state_partition(
                    &self.reader,
                    &self.topic,
                    p,
                    deadline,
                    &mut |read, total| {
                        progress(format!(
                            "restoring controller state: partition {p} ({} of {}), {read} of {total} changelog records",
                            i + 1,
                            parts.len()
                        ));
                    },
                );
                (p, read, started.elapsed().as_secs_f64())
            })
            .collect()
    }
}

pub(super) fn one() -> u32 {
    1
}

/// A reader of the state changelog (committed records only; it never joins the group).
///
/// # Errors
/// The client cannot be created.
pub fn state_reader(config: &Config) -> anyhow::Result<BaseConsumer<kafka::QuietEof>> {
    kafka::client_config(
        config,
        &[
            ("group.id", &format!("{}-state", config.kafka.group_id)),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
            ("isolation.level", "read_committed"),
            // A restore reads to the end as fast as it can: no waiting for full fetches.
            ("fetch.wait.max.ms", "10"),
            ("fetch.queue.backoff.ms", "5"),
        ],
    )
    .create_with_context(kafka::QuietEof)
    .context("cannot create the state changelog reader")
}

/// Reads partition `p` of the state changelog to its current end: the latest state of every
/// segment (tombstoned ones left out) and the partition's `closed_through`, if recorded.
///
/// `progress` is told the records read and the records to read, every 10,000 records and at
/// the end.
///
/// # Errors
/// The partition cannot be read by `deadline` (the restore's total bound,
/// `delivery.restore_timeout`), or holds a record of a newer format ([`NewerRecord`]).
pub fn read_state_partition(
    reader: &BaseConsumer<kafka::QuietEof>,
    topic: &str,
    p: i32,
    deadline: Instant,
    progress: &mut dyn FnMut(i64, i64),
) -> anyhow::Result<Restored> {
    anyhow::ensure!(
        Instant::now() < deadline,
        "restoring {topic}/{p} not started: delivery.restore_timeout was spent on the assignment's other partitions"
    );
    let (low, high) = kafka::watermarks(reader, topic, p)?;
    if high <= low {
        return Ok((Vec::new(), PartitionMarks::default()));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
    reader.assign(&tpl)?;
    let mut latest: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    let total = high - low;
    let mut read = 0i64;
    progress(0, total);
    let result = loop {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Some(k) = m.key() {
                    latest.insert(k.to_vec(), m.payload().map(<[u8]>::to_vec));
                }
                read = m.offset() + 1 - low;
                if read % 10_000 == 0 {
                    progress(read, total);
                }
                if m.offset() + 1 >= high {
                    break Ok(());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break Ok(()),
            Some(Err(e)) => tracing::warn!(error = %e, "state changelog reader"),
            None => {}
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!(
                "restoring {topic}/{p} did not finish within delivery.restore_timeout ({read} of {total} records read)"
            ));
        }
    };
    reader.unassign()?;
    result?;
    progress(total, total);
    let mut states = Vec::with_capacity(latest.len());
    let mut marks = PartitionMarks::default();
    for (key, value) in latest {
        let Some(bytes) = value else { continue };
        let version = crate::controller::record_version_of(&bytes);
        if let Err(e) = crate::controller::check_record_version(
            &format!(
                "the state record {:?} of {topic}/{p}",
                String::from_utf8_lossy(&key)
            ),
            version,
        ) {
            return Err(NewerRecord(e).into());
        }
        if key == PARTITION_KEY {
            match serde_json::from_slice::<PartitionRecord>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    crate::controller::check_record_version("a partition record", r.version)
                        .map(|()| r)
                }) {
                Ok(r) => {
                    marks = PartitionMarks {
                        closed_through_ms: Some(r.closed_through_ms).filter(|t| *t != i64::MIN),
                        dead_lettered_through: r.dead_lettered_through,
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable partition record ignored"),
            }
            continue;
        }
        match crate::controller::SegmentState::from_bytes(&bytes) {
            Ok(state) if state.partition == p => states.push(state),
            Ok(state) => tracing::warn!(
                segment = %state.segment,
                "state record of partition {} found in partition {p}; ignored",
                state.partition
            ),
            Err(e) => tracing::warn!(
                key = %String::from_utf8_lossy(&key),
                error = %e,
                "unreadable state record ignored"
            ),
        }
    }
    Ok((states, marks))
}
