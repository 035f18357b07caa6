//! TensorBoard event files written from Rust, with no Python, TensorFlow or protobuf crate involved.
//!
//! An event file is a sequence of TFRecord-framed, protobuf-encoded `tensorboard.Event` messages. This module
//! hand-encodes the handful of messages TensorBoard needs for scalars, text, histograms and the
//! `SessionLog.START` restart marker, and contains a strict reader so tests can check what was written.
//!
//! Record framing (all integers little-endian):
//!
//! ```text
//! u64 length | u32 masked_crc32c(length bytes) | data[length] | u32 masked_crc32c(data)
//! ```
//!
//! Field numbers follow TensorBoard's `tensorboard/compat/proto/*.proto`. Note that `Event.session_log` is
//! field 7; field 6 is the deprecated `log_message`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Version string TensorBoard expects in the first record of every event file.
const FILE_VERSION: &str = "brain.Event:2";

/// Number of equal-width buckets used by [`Histogram::from_values`].
pub const HISTOGRAM_BUCKETS: usize = 30;

// Event fields. `file_version`, `summary` and `session_log` are members of the `what` oneof.
const EVENT_WALL_TIME: u32 = 1;
const EVENT_STEP: u32 = 2;
const EVENT_FILE_VERSION: u32 = 3;
const EVENT_SUMMARY: u32 = 5;
const EVENT_SESSION_LOG: u32 = 7;

const SESSION_LOG_STATUS: u32 = 1;
const SESSION_STATUS_START: u64 = 1;

const SUMMARY_VALUE: u32 = 1;

// Summary.Value fields; `simple_value`, `histo` and `tensor` are members of the `value` oneof.
const VALUE_TAG: u32 = 1;
const VALUE_SIMPLE_VALUE: u32 = 2;
const VALUE_HISTO: u32 = 5;
const VALUE_TENSOR: u32 = 8;
const VALUE_METADATA: u32 = 9;

const METADATA_PLUGIN_DATA: u32 = 1;
const PLUGIN_DATA_PLUGIN_NAME: u32 = 1;
const TEXT_PLUGIN_NAME: &str = "text";

const TENSOR_DTYPE: u32 = 1;
const TENSOR_SHAPE: u32 = 2;
const TENSOR_STRING_VAL: u32 = 8;
const DT_STRING: u64 = 7;

const HISTO_MIN: u32 = 1;
const HISTO_MAX: u32 = 2;
const HISTO_NUM: u32 = 3;
const HISTO_SUM: u32 = 4;
const HISTO_SUM_SQUARES: u32 = 5;
const HISTO_BUCKET_LIMIT: u32 = 6;
const HISTO_BUCKET: u32 = 7;

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

// ---------------------------------------------------------------------------------------------------------------
// CRC32C (Castagnoli) and TFRecord framing
// ---------------------------------------------------------------------------------------------------------------

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(byte)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord stores a rotated-and-offset CRC so that a CRC computed over data that itself contains CRCs does
/// not degenerate. `rotate_right(15)` is the spec's `(crc >> 15) | (crc << 17)`.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Protobuf encoding
// ---------------------------------------------------------------------------------------------------------------

/// Just enough of the protobuf wire format to build the messages below; fields are emitted in call order,
/// which callers keep ascending to match what the reference implementation produces.
#[derive(Default)]
struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    fn raw_varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.buf.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.buf.push(value as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.raw_varint((u64::from(field) << 3) | u64::from(wire));
    }

    fn varint(&mut self, field: u32, value: u64) -> &mut Self {
        self.key(field, WIRE_VARINT);
        self.raw_varint(value);
        self
    }

    fn double(&mut self, field: u32, value: f64) -> &mut Self {
        self.key(field, WIRE_FIXED64);
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    fn float(&mut self, field: u32, value: f32) -> &mut Self {
        self.key(field, WIRE_FIXED32);
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Strings, bytes and embedded messages all share the length-delimited encoding.
    fn bytes(&mut self, field: u32, value: &[u8]) -> &mut Self {
        self.key(field, WIRE_LEN);
        self.raw_varint(value.len() as u64);
        self.buf.extend_from_slice(value);
        self
    }

    fn packed_doubles(&mut self, field: u32, values: &[f64]) -> &mut Self {
        // proto3 omits empty repeated fields; an empty packed field would also be legal but is never produced
        // by the reference encoder.
        if values.is_empty() {
            return self;
        }
        self.key(field, WIRE_LEN);
        self.raw_varint((values.len() * 8) as u64);
        for value in values {
            self.buf.extend_from_slice(&value.to_le_bytes());
        }
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Encodes an `Event` whose `what` oneof member `what_field` is length-delimited (all the ones used here are).
fn encode_event(wall_time: f64, step: i64, what_field: u32, what: &[u8]) -> Vec<u8> {
    let mut event = Encoder::default();
    event.double(EVENT_WALL_TIME, wall_time);
    // proto3 leaves out zero-valued plain fields; matching that keeps the bytes identical to TensorBoard's own.
    if step != 0 {
        event.varint(EVENT_STEP, step as u64);
    }
    event.bytes(what_field, what).finish()
}

fn encode_summary(value: &[u8]) -> Vec<u8> {
    Encoder::default().bytes(SUMMARY_VALUE, value).finish()
}

fn encode_scalar_value(tag: &str, value: f32) -> Vec<u8> {
    // `simple_value` sits in a oneof, so it must be written even when 0.0 or TensorBoard sees no value at all.
    Encoder::default().bytes(VALUE_TAG, tag.as_bytes()).float(VALUE_SIMPLE_VALUE, value).finish()
}

fn encode_text_value(tag: &str, text: &str) -> Vec<u8> {
    // An empty TensorShapeProto means a scalar (rank-0) tensor holding one string.
    let tensor = Encoder::default()
        .varint(TENSOR_DTYPE, DT_STRING)
        .bytes(TENSOR_SHAPE, &[])
        .bytes(TENSOR_STRING_VAL, text.as_bytes())
        .finish();
    let plugin_data = Encoder::default().bytes(PLUGIN_DATA_PLUGIN_NAME, TEXT_PLUGIN_NAME.as_bytes()).finish();
    let metadata = Encoder::default().bytes(METADATA_PLUGIN_DATA, &plugin_data).finish();
    Encoder::default()
        .bytes(VALUE_TAG, tag.as_bytes())
        .bytes(VALUE_TENSOR, &tensor)
        .bytes(VALUE_METADATA, &metadata)
        .finish()
}

fn encode_histogram(histogram: &Histogram) -> Vec<u8> {
    Encoder::default()
        .double(HISTO_MIN, histogram.min)
        .double(HISTO_MAX, histogram.max)
        .double(HISTO_NUM, histogram.num)
        .double(HISTO_SUM, histogram.sum)
        .double(HISTO_SUM_SQUARES, histogram.sum_squares)
        .packed_doubles(HISTO_BUCKET_LIMIT, &histogram.bucket_limit)
        .packed_doubles(HISTO_BUCKET, &histogram.bucket)
        .finish()
}

fn encode_histogram_value(tag: &str, histogram: &Histogram) -> Vec<u8> {
    Encoder::default().bytes(VALUE_TAG, tag.as_bytes()).bytes(VALUE_HISTO, &encode_histogram(histogram)).finish()
}

fn encode_session_start() -> Vec<u8> {
    Encoder::default().varint(SESSION_LOG_STATUS, SESSION_STATUS_START).finish()
}

// ---------------------------------------------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------------------------------------------

/// Contents of a `HistogramProto`. `bucket[i]` counts values in `[bucket_limit[i - 1], bucket_limit[i])`;
/// the first bucket starts at `min` and the last one ends at (and includes) `max`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    pub num: f64,
    pub sum: f64,
    pub sum_squares: f64,
    pub bucket_limit: Vec<f64>,
    pub bucket: Vec<f64>,
}

impl Histogram {
    /// Builds a histogram with [`HISTOGRAM_BUCKETS`] equal-width buckets spanning the finite values.
    ///
    /// NaN and infinities are left out entirely (including from `num`): they cannot be placed in an
    /// equal-width bucket and would poison `sum`. With no finite values the result is all zeros with no
    /// buckets; when all values are equal there is a single bucket whose limit is that value.
    pub fn from_values(values: &[f32]) -> Histogram {
        let finite = || values.iter().filter(|v| v.is_finite()).map(|&v| f64::from(v));
        let mut histogram = Histogram::default();
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in finite() {
            min = min.min(v);
            max = max.max(v);
            histogram.num += 1.0;
            histogram.sum += v;
            histogram.sum_squares += v * v;
        }
        if histogram.num == 0.0 {
            return histogram;
        }
        histogram.min = min;
        histogram.max = max;
        if min == max {
            histogram.bucket_limit = vec![max];
            histogram.bucket = vec![histogram.num];
            return histogram;
        }
        let width = (max - min) / HISTOGRAM_BUCKETS as f64;
        histogram.bucket_limit = (1..=HISTOGRAM_BUCKETS)
            .map(|i| if i == HISTOGRAM_BUCKETS { max } else { min + width * i as f64 })
            .collect();
        histogram.bucket = vec![0.0; HISTOGRAM_BUCKETS];
        for v in finite() {
            // `max` itself would land one past the end; it belongs to the last (closed) bucket.
            let index = (((v - min) / width) as usize).min(HISTOGRAM_BUCKETS - 1);
            histogram.bucket[index] += 1.0;
        }
        histogram
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------------------------

/// Distinguishes writers opened by one process within the same second, which would otherwise share a name.
static FILE_SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn now_secs_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Best-effort host name without libc: it only makes file names more informative, so any failure falls back
/// to a fixed string.
fn host_name() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    // Keep the name safe for a file name and free of the separators used by other tools' parsers.
    let cleaned: String =
        raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
    if cleaned.is_empty() {
        "taper".to_string()
    } else {
        cleaned
    }
}

/// Appends TensorBoard events to a new `events.out.tfevents.*` file.
///
/// Every event is flushed as soon as it is written, so a crashed or killed run loses nothing already logged
/// and TensorBoard can follow the file live.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, named
    /// `events.out.tfevents.<unix secs>.<host>.<pid>.<seq>` (the seconds past any earlier file's),
    /// starting with the file-version record.
    pub fn create(dir: &Path) -> io::Result<EventWriter> {
        fs::create_dir_all(dir)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        // TensorBoard reads a directory's files in name order: a later session's file must sort
        // after every earlier one, even within the same second (a quick resume).
        let latest = event_files(dir)?
            .iter()
            .filter_map(|p| {
                p.file_name()?.to_str()?.strip_prefix("events.out.tfevents.")?.split('.').next()?.parse().ok()
            })
            .max();
        let secs = latest.map_or(now, |l: u64| now.max(l + 1));
        let seq = FILE_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let name = format!("events.out.tfevents.{secs}.{}.{}.{seq}", host_name(), std::process::id());
        let path = dir.join(name);
        // `create_new` so that a name collision (say, another process reusing our pid) fails loudly instead of
        // truncating someone else's log.
        let file = OpenOptions::new().write(true).create_new(true).open(&path)?;
        let mut writer = EventWriter { path, out: BufWriter::new(file) };
        writer.write_event(0, EVENT_FILE_VERSION, FILE_VERSION.as_bytes())?;
        Ok(writer)
    }

    /// Path of the event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs a scalar. TensorBoard's `simple_value` is an f32, so the value is narrowed.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> io::Result<()> {
        self.write_summary(step, &encode_scalar_value(tag, value as f32))
    }

    /// Logs a text entry (rendered as Markdown by TensorBoard's text plugin).
    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> io::Result<()> {
        self.write_summary(step, &encode_text_value(tag, text))
    }

    /// Logs a histogram of `values` built by [`Histogram::from_values`].
    pub fn histogram(&mut self, tag: &str, step: u64, values: &[f32]) -> io::Result<()> {
        self.write_summary(step, &encode_histogram_value(tag, &Histogram::from_values(values)))
    }

    /// Writes a `SessionLog.START` marker at `step`: call it once at the beginning of every training session,
    /// with step 0 for a fresh run and the checkpoint's step for a resumed one.
    ///
    /// TensorBoard's Python loader (`plugin_event_accumulator`, used by the server with `--load_fast=false`)
    /// ignores the first START it sees in a run directory and, on each later one, discards every point already
    /// read with a step `>= step`, so a resumed run does not show the abandoned tail of the previous attempt.
    /// That is why a fresh run must write its START too. The Rust data server (`--load_fast=true`) ignores
    /// `SessionLog` and instead drops a series' points at or after any step that goes backwards.
    pub fn session_start(&mut self, step: u64) -> io::Result<()> {
        self.write_event(step_to_i64(step), EVENT_SESSION_LOG, &encode_session_start())
    }

    /// Flushes buffered bytes to the file. Events are already flushed as they are written; this exists for
    /// callers that want an explicit point at which errors surface.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn write_summary(&mut self, step: u64, value: &[u8]) -> io::Result<()> {
        self.write_event(step_to_i64(step), EVENT_SUMMARY, &encode_summary(value))
    }

    fn write_event(&mut self, step: i64, what_field: u32, what: &[u8]) -> io::Result<()> {
        let event = encode_event(now_secs_f64(), step, what_field, what);
        self.out.write_all(&frame_record(&event))?;
        self.out.flush()
    }
}

/// Steps are int64 on the wire; anything beyond that is nonsensical, so it saturates rather than wraps negative.
fn step_to_i64(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------------------------

/// One decoded event, limited to what [`EventWriter`] produces. Summary values of other kinds (images, audio,
/// other plugins' tensors) are skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// True when the event carries `SessionLog{status: START}`.
    pub session_start: bool,
    pub scalars: Vec<(String, f32)>,
    pub texts: Vec<(String, String)>,
    pub histograms: Vec<(String, Histogram)>,
}

/// Lists the `events.out.tfevents.*` files directly inside `dir`, sorted by file name (the order in which
/// TensorBoard itself reads them).
pub fn event_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let is_event_file = entry.file_name().to_str().is_some_and(|name| name.starts_with("events.out.tfevents."));
        if is_event_file && entry.file_type()?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every record of an event file, verifying both CRCs of each one. Errors name the zero-based index of
/// the offending record; a truncated trailing record is an error too, since a test reader should not guess.
pub fn read_events(path: &Path) -> io::Result<Vec<Event>> {
    let bytes = fs::read(path)?;
    let mut events = Vec::new();
    let mut rest = bytes.as_slice();
    let mut index = 0usize;
    while !rest.is_empty() {
        let record_error = |what: String| invalid(format!("{}: record {index}: {what}", path.display()));
        if rest.len() < 12 {
            return Err(record_error(format!("truncated header ({} bytes)", rest.len())));
        }
        let (len_bytes, crc_bytes) = (&rest[..8], &rest[8..12]);
        if masked_crc32c(len_bytes) != u32_le(crc_bytes) {
            return Err(record_error("length CRC mismatch".to_string()));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("slice of 8"));
        let available = (rest.len() - 12).saturating_sub(4) as u64;
        if len > available {
            return Err(record_error(format!("truncated data (length {len}, {available} bytes available)")));
        }
        let len = len as usize;
        let data = &rest[12..12 + len];
        if masked_crc32c(data) != u32_le(&rest[12 + len..16 + len]) {
            return Err(record_error("data CRC mismatch".to_string()));
        }
        events.push(decode_event(data).map_err(|e| record_error(e.to_string()))?);
        rest = &rest[16 + len..];
        index += 1;
    }
    Ok(events)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn u32_le(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("slice of 4"))
}

/// A field value as it appears on the wire; interpretation is up to the message decoder.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(&'a [u8]),
}

/// Iterates over the `(field number, value)` pairs of one encoded message.
struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields { buf }
    }

    fn varint(&mut self) -> io::Result<u64> {
        let mut value = 0u64;
        for (i, &byte) in self.buf.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(invalid("truncated or overlong varint".to_string()))
    }

    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(invalid(format!("field needs {n} bytes, {} left", self.buf.len())));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn next_field(&mut self) -> io::Result<(u32, Wire<'a>)> {
        let key = self.varint()?;
        let field = u32::try_from(key >> 3).map_err(|_| invalid(format!("field number too large in key {key}")))?;
        let value = match (key & 7) as u8 {
            WIRE_VARINT => Wire::Varint(self.varint()?),
            WIRE_FIXED64 => Wire::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().expect("slice of 8"))),
            WIRE_LEN => {
                let len = self.varint()?;
                let len = usize::try_from(len).map_err(|_| invalid(format!("length {len} too large")))?;
                Wire::Len(self.take(len)?)
            }
            WIRE_FIXED32 => Wire::Fixed32(u32_le(self.take(4)?)),
            // Groups (3/4) are deprecated and never appear in these messages.
            other => return Err(invalid(format!("unsupported wire type {other} for field {field}"))),
        };
        Ok((field, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = io::Result<(u32, Wire<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            None
        } else {
            let item = self.next_field();
            if item.is_err() {
                // Stop after the first error: the position inside a corrupt message is meaningless.
                self.buf = &[];
            }
            Some(item)
        }
    }
}

fn wrong_wire(message: &str, field: u32) -> io::Error {
    invalid(format!("{message} field {field} has an unexpected wire type"))
}

fn as_f64(wire: Wire, message: &str, field: u32) -> io::Result<f64> {
    match wire {
        Wire::Fixed64(bits) => Ok(f64::from_bits(bits)),
        _ => Err(wrong_wire(message, field)),
    }
}

fn as_bytes<'a>(wire: Wire<'a>, message: &str, field: u32) -> io::Result<&'a [u8]> {
    match wire {
        Wire::Len(bytes) => Ok(bytes),
        _ => Err(wrong_wire(message, field)),
    }
}

fn as_string(wire: Wire, message: &str, field: u32) -> io::Result<String> {
    let bytes = as_bytes(wire, message, field)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid(format!("{message} field {field} is not UTF-8")))
}

fn decode_event(data: &[u8]) -> io::Result<Event> {
    let mut event = Event::default();
    for item in Fields::new(data) {
        let (field, wire) = item?;
        match field {
            EVENT_WALL_TIME => event.wall_time = as_f64(wire, "Event", field)?,
            EVENT_STEP => match wire {
                Wire::Varint(v) => event.step = v as i64,
                _ => return Err(wrong_wire("Event", field)),
            },
            EVENT_FILE_VERSION => event.file_version = Some(as_string(wire, "Event", field)?),
            EVENT_SUMMARY => decode_summary(as_bytes(wire, "Event", field)?, &mut event)?,
            EVENT_SESSION_LOG => {
                for item in Fields::new(as_bytes(wire, "Event", field)?) {
                    if let (SESSION_LOG_STATUS, Wire::Varint(status)) = item? {
                        event.session_start = status == SESSION_STATUS_START;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(event)
}

fn decode_summary(data: &[u8], event: &mut Event) -> io::Result<()> {
    for item in Fields::new(data) {
        let (field, wire) = item?;
        if field == SUMMARY_VALUE {
            decode_summary_value(as_bytes(wire, "Summary", field)?, event)?;
        }
    }
    Ok(())
}

fn decode_summary_value(data: &[u8], event: &mut Event) -> io::Result<()> {
    const MSG: &str = "Summary.Value";
    let mut tag = String::new();
    let mut simple_value = None;
    let mut histogram = None;
    let mut string_val = None;
    let mut plugin_name = None;
    for item in Fields::new(data) {
        let (field, wire) = item?;
        match field {
            VALUE_TAG => tag = as_string(wire, MSG, field)?,
            VALUE_SIMPLE_VALUE => match wire {
                Wire::Fixed32(bits) => simple_value = Some(f32::from_bits(bits)),
                _ => return Err(wrong_wire(MSG, field)),
            },
            VALUE_HISTO => histogram = Some(decode_histogram(as_bytes(wire, MSG, field)?)?),
            VALUE_TENSOR => string_val = decode_string_tensor(as_bytes(wire, MSG, field)?)?,
            VALUE_METADATA => plugin_name = decode_plugin_name(as_bytes(wire, MSG, field)?)?,
            _ => {}
        }
    }
    if let Some(histogram) = histogram {
        event.histograms.push((tag, histogram));
    } else if let (Some(text), Some(TEXT_PLUGIN_NAME)) = (string_val, plugin_name.as_deref()) {
        event.texts.push((tag, text));
    } else if let Some(value) = simple_value {
        event.scalars.push((tag, value));
    }
    Ok(())
}

/// Returns the first `string_val` of a DT_STRING tensor, or `None` for any other tensor.
fn decode_string_tensor(data: &[u8]) -> io::Result<Option<String>> {
    let mut dtype = 0;
    let mut first = None;
    for item in Fields::new(data) {
        match item? {
            (TENSOR_DTYPE, Wire::Varint(v)) => dtype = v,
            (TENSOR_STRING_VAL, wire) if first.is_none() => {
                first = Some(as_string(wire, "TensorProto", TENSOR_STRING_VAL)?)
            }
            _ => {}
        }
    }
    Ok(if dtype == DT_STRING { first } else { None })
}

fn decode_plugin_name(metadata: &[u8]) -> io::Result<Option<String>> {
    let mut name = None;
    for item in Fields::new(metadata) {
        if let (METADATA_PLUGIN_DATA, wire) = item? {
            for inner in Fields::new(as_bytes(wire, "SummaryMetadata", METADATA_PLUGIN_DATA)?) {
                if let (PLUGIN_DATA_PLUGIN_NAME, wire) = inner? {
                    name = Some(as_string(wire, "PluginData", PLUGIN_DATA_PLUGIN_NAME)?);
                }
            }
        }
    }
    Ok(name)
}

/// Repeated doubles may legally arrive packed or one per field, so both are accepted.
fn push_doubles(out: &mut Vec<f64>, wire: Wire, field: u32) -> io::Result<()> {
    match wire {
        Wire::Fixed64(bits) => out.push(f64::from_bits(bits)),
        Wire::Len(bytes) if bytes.len() % 8 == 0 => {
            out.extend(bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8"))))
        }
        _ => return Err(wrong_wire("HistogramProto", field)),
    }
    Ok(())
}

fn decode_histogram(data: &[u8]) -> io::Result<Histogram> {
    const MSG: &str = "HistogramProto";
    let mut h = Histogram::default();
    for item in Fields::new(data) {
        let (field, wire) = item?;
        match field {
            HISTO_MIN => h.min = as_f64(wire, MSG, field)?,
            HISTO_MAX => h.max = as_f64(wire, MSG, field)?,
            HISTO_NUM => h.num = as_f64(wire, MSG, field)?,
            HISTO_SUM => h.sum = as_f64(wire, MSG, field)?,
            HISTO_SUM_SQUARES => h.sum_squares = as_f64(wire, MSG, field)?,
            HISTO_BUCKET_LIMIT => push_doubles(&mut h.bucket_limit, wire, field)?,
            HISTO_BUCKET => push_doubles(&mut h.bucket, wire, field)?,
            _ => {}
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("taper-tb-{name}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn crc32c_known_answers() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn file_version_record_matches_hand_encoding() {
        let wall_time = 1234.5f64;
        // Event{wall_time: 1234.5, file_version: "brain.Event:2"}; step 0 is omitted as proto3 does.
        let mut payload = vec![(1 << 3) | 1]; // field 1, fixed64
        payload.extend_from_slice(&wall_time.to_le_bytes());
        payload.push((3 << 3) | 2); // field 3, length-delimited
        payload.push(13); // varint length of "brain.Event:2"
        payload.extend_from_slice(b"brain.Event:2");
        assert_eq!(payload.len(), 24);

        // The spec's (crc >> 15) | (crc << 17), written as clippy prefers.
        let mask = |crc: u32| crc.rotate_right(15).wrapping_add(0xA282_EAD8);
        let mut expected = 24u64.to_le_bytes().to_vec();
        expected.extend_from_slice(&mask(crc32c(&24u64.to_le_bytes())).to_le_bytes());
        expected.extend_from_slice(&payload);
        expected.extend_from_slice(&mask(crc32c(&payload)).to_le_bytes());

        let record = frame_record(&encode_event(wall_time, 0, EVENT_FILE_VERSION, FILE_VERSION.as_bytes()));
        assert_eq!(record, expected);
        // Bytes produced by TensorBoard's own Python RecordWriter for the same Event, pinning the CRC masking.
        assert_eq!(record, unhex("1800000000000000a37f4b220900000000004a93401a0d627261696e2e4576656e743a3265b8d3fb"));
    }

    #[test]
    fn session_start_record_matches_reference() {
        // Event{wall_time: 1234.5, step: 7, session_log: {status: START}} from TensorBoard's Python writer; this
        // pins session_log to field 7.
        let record = frame_record(&encode_event(1234.5, 7, EVENT_SESSION_LOG, &encode_session_start()));
        assert_eq!(record, unhex("0f000000000000006d532b090900000000004a934010073a020801b743e2dd"));
    }

    #[test]
    fn varints_encode_multi_byte_and_negative_values() {
        let mut e = Encoder::default();
        e.varint(2, 300);
        assert_eq!(e.finish(), [0x10, 0xAC, 0x02]);
        e.varint(2, -1i64 as u64);
        let bytes = e.finish();
        assert_eq!(bytes.len(), 11);
        let (field, wire) = Fields::new(&bytes).next().unwrap().unwrap();
        assert!(field == 2 && matches!(wire, Wire::Varint(v) if v as i64 == -1));
    }

    #[test]
    fn round_trip_through_writer_and_reader() {
        let dir = TempDir::new("roundtrip");
        let mut writer = EventWriter::create(&dir.0.join("nested/run")).unwrap();
        writer.scalar("loss", 0, 2.5).unwrap();
        writer.scalar("loss", 1, 0.0).unwrap();
        writer.text("note", 1, "hello *world* ünïcode").unwrap();
        let values: Vec<f32> = (0..100).map(|i| i as f32 / 10.0).collect();
        writer.histogram("weights", 2, &values).unwrap();
        writer.session_start(1).unwrap();
        writer.scalar("loss", 1, 1.25).unwrap();
        writer.flush().unwrap();
        let path = writer.path().to_path_buf();
        drop(writer);

        assert_eq!(event_files(&dir.0.join("nested/run")).unwrap(), vec![path.clone()]);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 7);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(events.iter().all(|e| e.wall_time > 1.0e9));
        assert_eq!((events[1].step, events[1].scalars.clone()), (0, vec![("loss".to_string(), 2.5)]));
        // A zero scalar must still be present (it lives in a oneof).
        assert_eq!((events[2].step, events[2].scalars.clone()), (1, vec![("loss".to_string(), 0.0)]));
        assert_eq!(events[3].texts, vec![("note".to_string(), "hello *world* ünïcode".to_string())]);
        assert!(events[3].scalars.is_empty());
        let (tag, histogram) = &events[4].histograms[0];
        assert_eq!((tag.as_str(), events[4].step), ("weights", 2));
        assert_eq!(*histogram, Histogram::from_values(&values));
        assert_eq!((histogram.num, histogram.min, histogram.max as f32), (100.0, 0.0, 9.9));
        assert!(events[5].session_start && events[5].step == 1);
        assert!(events[5].scalars.is_empty() && !events[1].session_start);
        assert_eq!(events[6].scalars, vec![("loss".to_string(), 1.25)]);
    }

    #[test]
    fn corrupted_byte_is_reported_with_record_index() {
        let dir = TempDir::new("corrupt");
        let mut writer = EventWriter::create(&dir.0).unwrap();
        writer.scalar("a", 1, 1.0).unwrap();
        writer.scalar("b", 2, 2.0).unwrap();
        let path = writer.path().to_path_buf();
        drop(writer);
        let good = fs::read(&path).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 3);

        // Offsets of record 2: skip records 0 and 1 by their declared lengths.
        let record_len = |at: usize| 16 + u64::from_le_bytes(good[at..at + 8].try_into().unwrap()) as usize;
        let start2 = record_len(0) + record_len(record_len(0));
        for (offset, expect) in [(start2 + 14, "data CRC"), (start2 + 1, "length CRC"), (good.len() - 1, "data CRC")] {
            let mut bad = good.clone();
            bad[offset] ^= 0x01;
            fs::write(&path, &bad).unwrap();
            let err = read_events(&path).unwrap_err().to_string();
            assert!(err.contains("record 2") && err.contains(expect), "offset {offset}: {err}");
        }

        fs::write(&path, &good[..good.len() - 3]).unwrap();
        let err = read_events(&path).unwrap_err().to_string();
        assert!(err.contains("record 2") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn reader_skips_unknown_fields_of_every_wire_type() {
        let summary = encode_summary(&encode_scalar_value("x", 3.0));
        let mut e = Encoder::default();
        e.double(EVENT_WALL_TIME, 5.0)
            .varint(EVENT_STEP, 9)
            .varint(100, 12345)
            .double(101, 1.5)
            .float(102, 2.5)
            .bytes(103, b"opaque")
            .bytes(6, b"\x08\x14") // deprecated log_message
            .bytes(EVENT_SUMMARY, &summary);
        let event = decode_event(&e.finish()).unwrap();
        assert_eq!((event.wall_time, event.step), (5.0, 9));
        assert_eq!(event.scalars, vec![("x".to_string(), 3.0)]);
        assert!(!event.session_start);

        let mut e = Encoder::default();
        e.key(4, 3); // start-group: not supported, must error rather than loop or panic
        assert!(decode_event(&e.finish()).is_err());
        assert!(decode_event(&[0x1A, 0x05, b'a']).is_err());
    }

    #[test]
    fn histogram_buckets() {
        let h = Histogram::from_values(&[0.0, 1.0, 2.0, 3.0, f32::NAN, f32::INFINITY]);
        assert_eq!((h.min, h.max, h.num, h.sum, h.sum_squares), (0.0, 3.0, 4.0, 6.0, 14.0));
        assert_eq!((h.bucket.len(), h.bucket_limit.len()), (HISTOGRAM_BUCKETS, HISTOGRAM_BUCKETS));
        assert_eq!(*h.bucket_limit.last().unwrap(), 3.0);
        assert!((h.bucket_limit[0] - 0.1).abs() < 1e-12);
        assert!(h.bucket_limit.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);
        assert_eq!((h.bucket[0], h.bucket[10], h.bucket[20], h.bucket[29]), (1.0, 1.0, 1.0, 1.0));

        let same = Histogram::from_values(&[2.0; 5]);
        assert_eq!((same.min, same.max, same.num), (2.0, 2.0, 5.0));
        assert_eq!((same.bucket_limit, same.bucket), (vec![2.0], vec![5.0]));

        assert_eq!(Histogram::from_values(&[]), Histogram::default());
        assert_eq!(Histogram::from_values(&[f32::NAN]), Histogram::default());

        // An empty histogram still round-trips (its repeated fields are simply absent).
        let encoded = encode_histogram(&Histogram::default());
        assert_eq!(decode_histogram(&encoded).unwrap(), Histogram::default());
    }

    #[test]
    fn writers_in_the_same_second_get_distinct_sorted_files() {
        let dir = TempDir::new("names");
        let a = EventWriter::create(&dir.0).unwrap();
        let b = EventWriter::create(&dir.0).unwrap();
        assert_ne!(a.path(), b.path());
        fs::write(dir.0.join("not-an-event-file"), b"x").unwrap();
        fs::create_dir(dir.0.join("events.out.tfevents.dir")).unwrap();
        let files = event_files(&dir.0).unwrap();
        assert_eq!(files.len(), 2);
        assert!(files.contains(&a.path().to_path_buf()) && files.contains(&b.path().to_path_buf()));
        assert!(files.windows(2).all(|w| w[0] < w[1]));
        let name = a.path().file_name().unwrap().to_str().unwrap();
        let parts: Vec<&str> = name.split('.').collect();
        assert!(name.starts_with("events.out.tfevents."));
        assert!(parts[3].parse::<u64>().is_ok());
        assert_eq!(parts[parts.len() - 2], std::process::id().to_string());
    }
}
