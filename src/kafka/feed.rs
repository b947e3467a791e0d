//! A consumer's records taken in batches: the [`Feed`].
//!
//! rust-rdkafka 0.39 hands out one message per `poll`, and each poll reads the clock several
//! times and takes the queue's lock (15-20% of the loop thread at a million records a
//! second). librdkafka has a batch call, `rd_kafka_consume_batch_queue`, but on the consumer's
//! own queue it would also serve rebalances without the application's callback (librdkafka
//! would then assign and revoke on its own). So the partitions' fetch queues are forwarded to a
//! queue of their own, the feed, which holds nothing but records and fetch errors: the feed is
//! consumed in batches, the consumer's queue is polled as before for rebalances, errors and
//! statistics. A partition is routed to the feed before librdkafka starts fetching it (in the
//! rebalance callback, before the assignment), so none of its records goes to the consumer's
//! queue; one that did anyway is still returned by `poll`.
//!
//! Lifetimes: librdkafka must see the feed destroyed, and every message taken from it
//! destroyed, before the consumer is. A [`Fed`] message borrows the [`Feed`]; the feed's
//! owner drops it before the consumer (the runtime's guard does).

use std::ffi::CStr;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// The queue a consumer's partitions deliver their records to (see the module's text).
pub struct Feed {
    queue: NonNull<rd::rd_kafka_queue_t>,
    client: NonNull<rd::rd_kafka_t>,
}

// SAFETY: librdkafka's queues and client handles are thread-safe (every operation on them
// takes the queue's or the client's lock); the feed only passes the pointers to librdkafka.
unsafe impl Send for Feed {}
// SAFETY: as for Send: every call made through `&Feed` is one of librdkafka's thread-safe
// queue operations.
unsafe impl Sync for Feed {}

/// Where the rebalance callback routes newly assigned partitions: the feed's queue, valid
/// while the [`Feed`] lives (its owner clears the router before dropping the feed).
#[derive(Clone, Copy)]
pub struct Router {
    queue: NonNull<rd::rd_kafka_queue_t>,
    client: NonNull<rd::rd_kafka_t>,
}

// SAFETY: see `Feed`: the pointers are only passed to librdkafka's thread-safe calls.
unsafe impl Send for Router {}
// SAFETY: as for Send.
unsafe impl Sync for Router {}

impl Feed {
    /// A feed for the consumer whose client is `client` (`consumer.client().native_ptr()`).
    ///
    /// # Safety
    /// `client` is a live consumer handle, and the feed is dropped before it is destroyed.
    pub unsafe fn new(client: *mut rd::rd_kafka_t) -> Option<Feed> {
        let client = NonNull::new(client)?;
        // SAFETY: the caller guarantees a live handle; the new queue is owned by the feed
        // and destroyed in its Drop, before the client (the caller's promise).
        let queue = NonNull::new(unsafe { rd::rd_kafka_queue_new(client.as_ptr()) })?;
        Some(Feed { queue, client })
    }

    /// What the rebalance callback routes partitions with.
    pub fn router(&self) -> Router {
        Router {
            queue: self.queue,
            client: self.client,
        }
    }

    /// Takes up to `max` records into `out`: what the feed holds now, or, when it holds
    /// nothing, the first record to arrive within `wait` and what is there with it. Fetch
    /// errors and partition ends are not records: they go to `errors`, in order.
    pub fn take<'f>(
        &'f self,
        max: usize,
        wait: Duration,
        out: &mut Vec<Fed<'f>>,
        errors: &mut Vec<KafkaError>,
    ) {
        let before = out.len();
        self.batch(max, 0, out);
        if out.len() == before && !wait.is_zero() {
            // librdkafka waits for a whole batch: wait for one, then take the rest at once.
            let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
            self.batch(1, ms, out);
            if out.len() > before {
                self.batch(max - 1, 0, out);
            }
        }
        // Earlier records were filtered by earlier calls: only this call's can be errors.
        out.retain(|m| match m.error() {
            Some(e) => {
                errors.push(e);
                false
            }
            None => true,
        });
    }

    /// One `rd_kafka_consume_batch_queue` call, its messages appended to `out`.
    fn batch<'f>(&'f self, max: usize, timeout_ms: i32, out: &mut Vec<Fed<'f>>) {
        if max == 0 {
            return;
        }
        out.reserve(max);
        let len = out.len();
        let spare = out.spare_capacity_mut();
        // SAFETY: `Fed` is `repr(transparent)` over a non-null message pointer, so the spare
        // capacity is room for `spare.len()` (≥ max) message pointers; librdkafka writes at
        // most `max` of them, each a message the caller now owns (`Fed` destroys it).
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                timeout_ms,
                spare.as_mut_ptr().cast::<*mut rd::rd_kafka_message_t>(),
                max,
            )
        };
        if n > 0 {
            // SAFETY: librdkafka initialised the first `n` slots with non-null messages.
            unsafe { out.set_len(len + n as usize) };
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        // SAFETY: the queue was created by `rd_kafka_queue_new` and is destroyed once; the
        // client is still alive (the owner's promise). Partitions still forwarded to it drop
        // what they would deliver (a destroyed queue refuses new operations).
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) }
    }
}

impl Router {
    /// Sends the records of `topic`'s `partition` to the feed. Call it before the partition
    /// is assigned, so that librdkafka's fetcher never forwards it to the consumer's queue
    /// (an application's forwarding stays across assignments).
    ///
    /// # Safety
    /// The [`Feed`] this router came from is alive.
    pub unsafe fn route(&self, topic: &CStr, partition: i32) -> bool {
        // SAFETY: the client and the feed's queue are alive (the caller's promise); the
        // partition's queue handle is ours and destroyed right after forwarding (the
        // forwarding belongs to the partition's fetch queue, not to the handle).
        unsafe {
            let q =
                rd::rd_kafka_queue_get_partition(self.client.as_ptr(), topic.as_ptr(), partition);
            if q.is_null() {
                return false;
            }
            rd::rd_kafka_queue_forward(q, self.queue.as_ptr());
            rd::rd_kafka_queue_destroy(q);
        }
        true
    }
}

/// A consumed record's coordinates and bytes, whichever way it was consumed: from a
/// [`Feed`] ([`Fed::taken`]) or through rust-rdkafka ([`Taken::of`]).
#[derive(Debug, Clone, Copy)]
pub struct Taken<'m> {
    pub partition: i32,
    pub offset: i64,
    /// Create or log-append time, milliseconds.
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'m [u8]>,
    pub payload: Option<&'m [u8]>,
}

impl<'m> Taken<'m> {
    pub fn of(m: &'m impl rdkafka::Message) -> Taken<'m> {
        Taken {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key(),
            payload: m.payload(),
        }
    }
}

/// A record taken from a [`Feed`]: librdkafka's message, destroyed on drop.
#[repr(transparent)]
pub struct Fed<'f> {
    ptr: NonNull<rd::rd_kafka_message_t>,
    _feed: PhantomData<&'f Feed>,
}

// SAFETY: a consumed message is immutable and may be read and destroyed on any thread.
unsafe impl Send for Fed<'_> {}

impl Fed<'_> {
    fn raw(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: the pointer came from librdkafka and lives until our Drop.
        unsafe { self.ptr.as_ref() }
    }

    fn error(&self) -> Option<KafkaError> {
        let m = self.raw();
        if m.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        Some(
            if m.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF {
                KafkaError::PartitionEOF(m.partition)
            } else {
                KafkaError::MessageConsumption(RDKafkaErrorCode::from(m.err))
            },
        )
    }

    pub fn partition(&self) -> i32 {
        self.raw().partition
    }

    pub fn offset(&self) -> i64 {
        self.raw().offset
    }

    pub fn key(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: librdkafka's key pointer and length describe bytes owned by the message.
        (!m.key.is_null()).then(|| unsafe {
            std::slice::from_raw_parts(m.key.cast::<u8>().cast_const(), m.key_len)
        })
    }

    pub fn payload(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: as for the key.
        (!m.payload.is_null()).then(|| unsafe {
            std::slice::from_raw_parts(m.payload.cast::<u8>().cast_const(), m.len)
        })
    }

    pub fn topic(&self) -> &str {
        let rkt = self.raw().rkt;
        if rkt.is_null() {
            return "";
        }
        // SAFETY: the message holds a reference on its topic; the name is a C string that
        // lives as long as the topic.
        unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(rkt)) }
            .to_str()
            .unwrap_or("")
    }

    /// The record's timestamp in milliseconds (create or log-append time), if it has one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message; librdkafka writes the timestamp's type into `kind`.
        let ts = unsafe { rd::rd_kafka_message_timestamp(self.ptr.as_ptr(), &mut kind) };
        (ts != -1 && kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE)
            .then_some(ts)
    }

    /// Its coordinates and bytes.
    pub fn taken(&self) -> Taken<'_> {
        Taken {
            partition: self.partition(),
            offset: self.offset(),
            timestamp_ms: self.timestamp_ms(),
            key: self.key(),
            payload: self.payload(),
        }
    }

    /// The record's headers, copied, in order.
    pub fn headers(&self) -> Vec<(String, Option<Vec<u8>>)> {
        let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        // SAFETY: a live message; the headers it returns belong to it.
        let err = unsafe { rd::rd_kafka_message_headers(self.ptr.as_ptr(), &mut hdrs) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for idx in 0.. {
            let mut name = std::ptr::null();
            let mut value = std::ptr::null();
            let mut size = 0usize;
            // SAFETY: `hdrs` is the message's header list; librdkafka fills the out-pointers
            // with data owned by it, valid while the message lives.
            let err =
                unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            // SAFETY: as above: a C string and a byte range owned by the message.
            let (name, value) = unsafe {
                (
                    CStr::from_ptr(name).to_string_lossy().into_owned(),
                    (!value.is_null())
                        .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec()),
                )
            };
            out.push((name, value));
        }
        out
    }
}

impl Drop for Fed<'_> {
    fn drop(&mut self) {
        // SAFETY: the message came from `rd_kafka_consume_batch_queue` and is destroyed once.
        unsafe { rd::rd_kafka_message_destroy(self.ptr.as_ptr()) }
    }
}

impl std::fmt::Debug for Fed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fed({}@{})", self.partition(), self.offset())
    }
}
