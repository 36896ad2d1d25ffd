//! Packed encoding of sparse parameter slices.
//!
//! Indices are strictly increasing and stored in one of two codes:
//!
//! - [`IndexEncoding::DeltaVarint`]: unsigned LEB128 varints, the first index
//!   itself, then each difference to the previous one. A 10% slice of a
//!   10^5-parameter model costs about 1.2 bytes per index instead of 4.
//! - [`IndexEncoding::Rice`]: Golomb-Rice codes of the gaps between indices,
//!   with the Rice parameter chosen per slice. A uniformly random selection
//!   of density p costs about `log2(1/p) + 1.6` bits per index, within about
//!   0.1 bit of the entropy of such a selection: 1.5 bytes at 0.1% density
//!   against 2 for varints, 0.6 bytes at 10% against 1.
//!
//! Values are little-endian IEEE 754 binary32 ([`ValueEncoding::F32`]) or
//! binary16 ([`ValueEncoding::F16`], half the bytes, about three significant
//! decimal digits).
//!
//! The decoders never trust a declared length for allocation: they only
//! grow their output as they read bytes that are actually present.

use thiserror::Error;

/// Largest number of bytes a varint for a `u64` occupies.
const MAX_VARINT_BYTES: usize = 10;

/// Largest Rice parameter. The remainder of a gap then has 31 bits, more
/// than any gap between two `u32` indices needs once the quotient is added.
pub const MAX_RICE_PARAMETER: u8 = 31;

/// Code of the index payload of a packed slice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IndexEncoding {
    /// Delta-encoded unsigned LEB128 varints.
    #[default]
    DeltaVarint,
    /// Golomb-Rice codes of the gaps between indices; see
    /// [`encode_indices_rice`].
    Rice,
}

/// Code of the value payload of a packed slice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ValueEncoding {
    /// Little-endian IEEE 754 binary32, four bytes a value.
    #[default]
    F32,
    /// Little-endian IEEE 754 binary16, two bytes a value. Values are
    /// rounded to the nearest binary16; magnitudes above 65504 become
    /// infinite and are rejected by the decoder.
    F16,
}

impl ValueEncoding {
    /// Bytes of one encoded value.
    pub fn bytes_per_value(self) -> usize {
        match self {
            ValueEncoding::F32 => 4,
            ValueEncoding::F16 => 2,
        }
    }

    /// Lowercase name, as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            ValueEncoding::F32 => "f32",
            ValueEncoding::F16 => "f16",
        }
    }

    /// Largest magnitude that a value clipped to `[-gamma, gamma]` in f32 can
    /// have once encoded. Rounding to the nearest binary16 is monotone, so
    /// it never takes a clipped value above the rounded gamma.
    pub fn encoded_bound(self, gamma: f64) -> f32 {
        let limit = gamma as f32;
        match self {
            ValueEncoding::F32 => limit,
            ValueEncoding::F16 => half::f16::from_f32(limit).to_f32(),
        }
    }
}

/// A sparse slice: parallel arrays of strictly increasing indices and values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseSlice {
    /// Parameter indices, strictly increasing.
    pub indices: Vec<u32>,
    /// One value per index.
    pub values: Vec<f32>,
}

/// Reasons a packed slice is rejected.
#[derive(Debug, Error, PartialEq)]
pub enum SparseError {
    /// The index bytes end in the middle of a varint.
    #[error("truncated varint at byte {offset} of the index payload")]
    TruncatedVarint {
        /// Byte offset where the varint started.
        offset: usize,
    },
    /// A varint is longer than ten bytes or does not fit in 64 bits.
    #[error("malformed varint at byte {offset} of the index payload")]
    MalformedVarint {
        /// Byte offset where the varint started.
        offset: usize,
    },
    /// A difference of zero after the first index repeats an index.
    #[error("duplicate index {index} in the slice")]
    DuplicateIndex {
        /// The repeated index.
        index: u64,
    },
    /// An index is at or beyond the number of parameters.
    #[error("index {index} is out of range: the model has {parameter_count} parameters")]
    IndexOutOfRange {
        /// The offending index.
        index: u64,
        /// Number of parameters of the model.
        parameter_count: u64,
    },
    /// The value payload length is not a multiple of the value width.
    #[error("value payload of {bytes} bytes is not a whole number of {width}-byte values")]
    RaggedValues {
        /// Length of the value payload.
        bytes: usize,
        /// Bytes of one value in the payload's encoding.
        width: usize,
    },
    /// A Rice-coded index payload names a parameter above
    /// [`MAX_RICE_PARAMETER`].
    #[error("invalid Rice parameter {parameter}: expected at most 31")]
    InvalidRiceParameter {
        /// The first byte of the payload.
        parameter: u8,
    },
    /// A Rice-coded index payload ends before the entry the values call for.
    #[error(
        "the Rice-coded index payload ends within entry {entry}, but the values call for {count} entries"
    )]
    TruncatedRice {
        /// Position of the entry that is cut off.
        entry: usize,
        /// Number of entries the value payload holds.
        count: usize,
    },
    /// A Rice-coded index payload goes on after its last entry.
    #[error(
        "the Rice-coded index payload has {bits} bits after the {count} entries that the values call for; expected only padding of one bits to the byte"
    )]
    TrailingBits {
        /// Bits left after the last entry.
        bits: usize,
        /// Number of entries the value payload holds.
        count: usize,
    },
    /// The index and value payloads describe different numbers of entries.
    #[error("index and value counts differ: {indices} indices, {values} values")]
    CountMismatch {
        /// Number of decoded indices.
        indices: usize,
        /// Number of decoded values.
        values: usize,
    },
    /// A value is NaN or infinite.
    #[error("value {value} at index {index} is not finite")]
    NonFiniteValue {
        /// The parameter index carrying the value.
        index: u64,
        /// The value itself.
        value: f32,
    },
    /// A value lies outside the declared bound.
    #[error("value {value} at index {index} is outside the declared bound [-{gamma}, {gamma}]")]
    OutOfBound {
        /// The parameter index carrying the value.
        index: u64,
        /// The value itself.
        value: f32,
        /// The declared bound.
        gamma: f64,
    },
    /// A dense slice carries the wrong number of values.
    #[error("dense slice has {values} values but the model has {parameter_count} parameters")]
    DenseLength {
        /// Number of values sent.
        values: usize,
        /// Number of parameters of the model.
        parameter_count: u64,
    },
}

/// Appends `value` to `out` as an unsigned LEB128 varint.
pub fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads one varint from `bytes` at `*pos`, advancing `*pos` past it.
pub fn read_varint(bytes: &[u8], pos: &mut usize) -> Result<u64, SparseError> {
    let start = *pos;
    let mut value: u64 = 0;
    for shift_index in 0..MAX_VARINT_BYTES {
        let Some(&byte) = bytes.get(*pos) else {
            return Err(SparseError::TruncatedVarint { offset: start });
        };
        *pos += 1;
        let payload = u64::from(byte & 0x7f);
        let shift = 7 * shift_index as u32;
        // The tenth byte may only contribute the single top bit of a u64.
        if shift_index == MAX_VARINT_BYTES - 1 && payload > 1 {
            return Err(SparseError::MalformedVarint { offset: start });
        }
        value |= payload << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(SparseError::MalformedVarint { offset: start })
}

/// Encodes strictly increasing indices as delta varints.
///
/// # Panics
///
/// Panics if the indices are not strictly increasing: callers produce them
/// sorted, so a violation is a bug in the caller, not bad input.
pub fn encode_indices(indices: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(indices.len() * 2);
    let mut previous: Option<u32> = None;
    for &index in indices {
        let delta = match previous {
            None => index,
            Some(p) => {
                assert!(
                    index > p,
                    "indices must be strictly increasing: {index} after {p}"
                );
                index - p
            }
        };
        write_varint(&mut out, u64::from(delta));
        previous = Some(index);
    }
    out
}

/// Encodes values as little-endian f32.
pub fn encode_values(values: &[f32]) -> Vec<u8> {
    encode_values_with(values, ValueEncoding::F32)
}

/// Encodes values in `encoding`. For [`ValueEncoding::F16`], magnitudes
/// above 65504 become infinite, which the decoder rejects: bound the values
/// first.
pub fn encode_values_with(values: &[f32], encoding: ValueEncoding) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * encoding.bytes_per_value()];
    fill_values(&mut out, values.iter().copied(), encoding);
    out
}

/// Encodes the f64 `values` as f32 into a new payload in one pass, without
/// an intermediate f32 vector: the server's dense download.
pub fn encode_f64_as_f32(values: &[f64]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 4];
    fill_values(
        &mut out,
        values.iter().map(|&v| v as f32),
        ValueEncoding::F32,
    );
    out
}

/// Writes `values` into `out`, which has room for exactly one encoded value
/// each.
fn fill_values(out: &mut [u8], values: impl Iterator<Item = f32>, encoding: ValueEncoding) {
    match encoding {
        ValueEncoding::F32 => {
            for (chunk, value) in out.chunks_exact_mut(4).zip(values) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
        }
        ValueEncoding::F16 => {
            for (chunk, value) in out.chunks_exact_mut(2).zip(values) {
                chunk.copy_from_slice(&half::f16::from_f32(value).to_le_bytes());
            }
        }
    }
}

/// Encodes strictly increasing indices in `encoding`.
///
/// # Panics
///
/// Panics if the indices are not strictly increasing, as
/// [`encode_indices`] does.
pub fn encode_indices_with(indices: &[u32], encoding: IndexEncoding) -> Vec<u8> {
    match encoding {
        IndexEncoding::DeltaVarint => encode_indices(indices),
        IndexEncoding::Rice => encode_indices_rice(indices),
    }
}

/// Gaps between strictly increasing indices: the first index itself, then
/// each difference to the previous index minus one.
fn gaps(indices: &[u32]) -> impl Iterator<Item = u32> + '_ {
    let mut previous: Option<u32> = None;
    indices.iter().map(move |&index| {
        let gap = match previous {
            None => index,
            Some(p) => {
                assert!(
                    index > p,
                    "indices must be strictly increasing: {index} after {p}"
                );
                index - p - 1
            }
        };
        previous = Some(index);
        gap
    })
}

/// Returns the Rice parameter that codes the gaps of `indices` in the
/// fewest bits. A gap `g` costs `(g >> k) + 1 + k` bits, so the total is
/// computed exactly for the parameter nearest `log2` of the mean gap and
/// its two neighbours, which contain the optimum for geometric gaps.
fn rice_parameter(indices: &[u32]) -> u8 {
    let count = indices.len() as u64;
    let last = u64::from(*indices.last().expect("a non-empty slice"));
    let mean = (last + 1 - count) / count;
    let centre = if mean == 0 { 0 } else { mean.ilog2() as u8 };
    let low = centre.saturating_sub(1);
    let high = (centre + 1).min(MAX_RICE_PARAMETER);
    (low..=high)
        .min_by_key(|&parameter| {
            let quotients: u64 = gaps(indices).map(|gap| u64::from(gap >> parameter)).sum();
            quotients + count * (u64::from(parameter) + 1)
        })
        .expect("the range of candidate parameters is not empty")
}

/// Appends bits to a byte vector, least significant bit first.
struct BitWriter {
    out: Vec<u8>,
    /// Bits not yet written to `out`, in the low `filled` bits.
    pending: u64,
    filled: u32,
}

impl BitWriter {
    /// Appends the low `count` bits of `bits`; `count` is at most 32.
    fn write(&mut self, bits: u64, count: u32) {
        debug_assert!(count <= 32 && (count == 64 || bits >> count == 0));
        self.pending |= bits << self.filled;
        self.filled += count;
        if self.filled >= 32 {
            self.out
                .extend_from_slice(&(self.pending as u32).to_le_bytes());
            self.pending >>= 32;
            self.filled -= 32;
        }
    }

    /// Appends `count` one bits.
    fn write_ones(&mut self, mut count: u64) {
        while count >= 32 {
            self.write(u64::from(u32::MAX), 32);
            count -= 32;
        }
        self.write((1u64 << count) - 1, count as u32);
    }

    /// Pads the last byte with one bits and returns the bytes.
    fn finish(mut self) -> Vec<u8> {
        let bytes = self.filled.div_ceil(8);
        let padding = bytes * 8 - self.filled;
        self.pending |= ((1u64 << padding) - 1) << self.filled;
        self.out
            .extend_from_slice(&self.pending.to_le_bytes()[..bytes as usize]);
        self.out
    }
}

/// Encodes strictly increasing indices as Golomb-Rice codes of their gaps.
///
/// The payload is empty for no indices. Otherwise its first byte is the
/// Rice parameter `k` (at most 31), and a bit stream follows, least
/// significant bit of each byte first. For each gap `g` (the first index
/// itself, then each difference to the previous index minus one) it has
/// `g >> k` one bits, a zero bit, and the low `k` bits of `g`, lowest
/// first. The last byte is padded with one bits, which cannot end a code,
/// so a decoder that reads one entry more than the payload contains finds it
/// cut off instead of reading padding as gaps of zero. The number of
/// entries is not stored: it is the number of values.
///
/// # Panics
///
/// Panics if the indices are not strictly increasing.
pub fn encode_indices_rice(indices: &[u32]) -> Vec<u8> {
    if indices.is_empty() {
        return Vec::new();
    }
    let parameter = rice_parameter(indices);
    let mask = (1u64 << parameter) - 1;
    let mut writer = BitWriter {
        out: Vec::with_capacity(1 + indices.len() * (usize::from(parameter) + 2) / 8 + 8),
        pending: 0,
        filled: 0,
    };
    writer.out.push(parameter);
    for gap in gaps(indices) {
        let gap = u64::from(gap);
        writer.write_ones(gap >> parameter);
        writer.write(0, 1);
        writer.write(gap & mask, u32::from(parameter));
    }
    writer.finish()
}

/// Decodes delta-varint indices, rejecting duplicates and any index at or
/// beyond `parameter_count`.
pub fn decode_indices(bytes: &[u8], parameter_count: u64) -> Result<Vec<u32>, SparseError> {
    // Each index needs at least one byte, so this bound never over-allocates
    // beyond the payload actually received.
    let mut indices = Vec::with_capacity(bytes.len().min(parameter_count as usize));
    let mut pos = 0;
    let mut current: u64 = 0;
    while pos < bytes.len() {
        let delta = read_varint(bytes, &mut pos)?;
        if indices.is_empty() {
            current = delta;
        } else if delta == 0 {
            return Err(SparseError::DuplicateIndex { index: current });
        } else {
            current = current.saturating_add(delta);
        }
        if current >= parameter_count {
            return Err(SparseError::IndexOutOfRange {
                index: current,
                parameter_count,
            });
        }
        indices.push(current as u32);
    }
    Ok(indices)
}

/// Reads bits of a byte slice, least significant bit first, through a
/// 64-bit buffer that is refilled four bytes at a time.
struct BitReader<'a> {
    bytes: &'a [u8],
    /// Next byte to load into the buffer.
    next_byte: usize,
    /// Loaded bits not yet read, the next one lowest.
    buffer: u64,
    /// Number of valid bits in `buffer`.
    buffered: u32,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            next_byte: 0,
            buffer: 0,
            buffered: 0,
        }
    }

    /// Loads bytes until the buffer has more than 32 valid bits or the
    /// slice ends.
    fn refill(&mut self) {
        if self.buffered <= 32
            && let Some(word) = self.bytes.get(self.next_byte..self.next_byte + 4)
        {
            let word = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            self.buffer |= u64::from(word) << self.buffered;
            self.buffered += 32;
            self.next_byte += 4;
        }
        while self.buffered <= 56 && self.next_byte < self.bytes.len() {
            self.buffer |= u64::from(self.bytes[self.next_byte]) << self.buffered;
            self.buffered += 8;
            self.next_byte += 1;
        }
    }

    /// Bits of the stream not yet read.
    fn remaining(&self) -> usize {
        (self.bytes.len() - self.next_byte) * 8 + self.buffered as usize
    }

    /// Reads a run of one bits and the zero bit that ends it; returns the
    /// run's length, or `None` if the stream ends first.
    fn read_unary(&mut self) -> Option<u64> {
        let mut ones = 0u64;
        loop {
            if self.buffered == 0 {
                self.refill();
                if self.buffered == 0 {
                    return None;
                }
            }
            // Bits above `buffered` are zero, so the run stops there at the
            // latest.
            let run = self.buffer.trailing_ones().min(self.buffered);
            if run < self.buffered {
                // A run of 63 ones ends at the top bit, so the shift can be
                // the whole width.
                self.buffer = self.buffer.checked_shr(run + 1).unwrap_or(0);
                self.buffered -= run + 1;
                return Some(ones + u64::from(run));
            }
            ones += u64::from(run);
            self.buffer = 0;
            self.buffered = 0;
        }
    }

    /// Reads `count` bits, at most 32; `None` if the stream ends first.
    fn read(&mut self, count: u32) -> Option<u64> {
        if self.buffered < count {
            self.refill();
            if self.buffered < count {
                return None;
            }
        }
        let bits = self.buffer & ((1u64 << count) - 1);
        self.buffer = self.buffer.checked_shr(count).unwrap_or(0);
        self.buffered -= count;
        Some(bits)
    }

    /// Reads a whole Rice code with parameter `parameter` when it lies in
    /// the buffer, as nearly all do; `None` leaves the stream unchanged for
    /// the bit-by-bit path.
    fn read_short_code(&mut self, parameter: u8) -> Option<(u64, u64)> {
        if self.buffered < 40 {
            self.refill();
        }
        let run = self.buffer.trailing_ones();
        let length = run + 1 + u32::from(parameter);
        if length > self.buffered {
            return None;
        }
        let remainder = self.buffer.checked_shr(run + 1).unwrap_or(0) & ((1u64 << parameter) - 1);
        self.buffer = self.buffer.checked_shr(length).unwrap_or(0);
        self.buffered -= length;
        Some((u64::from(run), remainder))
    }

    /// The bits not yet read, which must be fewer than 8.
    fn rest(&mut self) -> u64 {
        self.refill();
        self.buffer
    }
}

/// Decodes `count` Golomb-Rice coded indices (see [`encode_indices_rice`]),
/// rejecting any index at or beyond `parameter_count` and a payload that
/// contains more than `count` entries and the padding of one bits.
pub fn decode_indices_rice(
    bytes: &[u8],
    count: usize,
    parameter_count: u64,
) -> Result<Vec<u32>, SparseError> {
    let Some((&parameter, stream)) = bytes.split_first() else {
        if count == 0 {
            return Ok(Vec::new());
        }
        return Err(SparseError::TruncatedRice { entry: 0, count });
    };
    if parameter > MAX_RICE_PARAMETER {
        return Err(SparseError::InvalidRiceParameter { parameter });
    }
    // Each entry takes at least one bit, so this never allocates beyond
    // what the payload can hold.
    let mut indices = Vec::with_capacity(count.min(stream.len() * 8));
    let mut reader = BitReader::new(stream);
    let mut next: u64 = 0;
    for entry in 0..count {
        let truncated = || SparseError::TruncatedRice { entry, count };
        let (quotient, remainder) = match reader.read_short_code(parameter) {
            Some(code) => code,
            None => {
                let quotient = reader.read_unary().ok_or_else(truncated)?;
                let remainder = reader.read(u32::from(parameter)).ok_or_else(truncated)?;
                (quotient, remainder)
            }
        };
        let gap = quotient
            .checked_mul(1 << parameter)
            .map_or(u64::MAX, |high| high | remainder);
        let index = next.saturating_add(gap);
        if index >= parameter_count {
            return Err(SparseError::IndexOutOfRange {
                index,
                parameter_count,
            });
        }
        indices.push(index as u32);
        next = index + 1;
    }
    let left = reader.remaining();
    if left >= 8 || reader.rest() != (1u64 << left) - 1 {
        return Err(SparseError::TrailingBits { bits: left, count });
    }
    Ok(indices)
}

/// Decodes indices in `encoding`; `count`, the number of values, is used
/// only by [`IndexEncoding::Rice`], which does not store it.
pub fn decode_indices_with(
    bytes: &[u8],
    count: usize,
    parameter_count: u64,
    encoding: IndexEncoding,
) -> Result<Vec<u32>, SparseError> {
    match encoding {
        IndexEncoding::DeltaVarint => decode_indices(bytes, parameter_count),
        IndexEncoding::Rice => decode_indices_rice(bytes, count, parameter_count),
    }
}

/// Decodes little-endian f32 values.
pub fn decode_values(bytes: &[u8]) -> Result<Vec<f32>, SparseError> {
    decode_values_with(bytes, ValueEncoding::F32)
}

/// Decodes values in `encoding` into f32.
pub fn decode_values_with(bytes: &[u8], encoding: ValueEncoding) -> Result<Vec<f32>, SparseError> {
    let mut values = Vec::new();
    decode_values_into(bytes, encoding, &mut values)?;
    Ok(values)
}

/// Decodes values in `encoding` into `values`, replacing its contents and
/// keeping its allocation when it is large enough.
pub fn decode_values_into(
    bytes: &[u8],
    encoding: ValueEncoding,
    values: &mut Vec<f32>,
) -> Result<(), SparseError> {
    let width = encoding.bytes_per_value();
    if !bytes.len().is_multiple_of(width) {
        return Err(SparseError::RaggedValues {
            bytes: bytes.len(),
            width,
        });
    }
    values.clear();
    match encoding {
        ValueEncoding::F32 => values.extend(
            bytes
                .chunks_exact(4)
                .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])),
        ),
        ValueEncoding::F16 => values.extend(
            bytes
                .chunks_exact(2)
                .map(|chunk| half::f16::from_le_bytes([chunk[0], chunk[1]]).to_f32()),
        ),
    }
    Ok(())
}

/// The codes of a packed slice's two payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SliceEncoding {
    /// Code of the index payload.
    pub indices: IndexEncoding,
    /// Code of the value payload.
    pub values: ValueEncoding,
}

impl SparseSlice {
    /// Encodes the slice into its index and value payloads, as delta
    /// varints and f32.
    pub fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        self.encode_with(SliceEncoding::default())
    }

    /// Encodes the slice into its index and value payloads in `encoding`.
    pub fn encode_with(&self, encoding: SliceEncoding) -> (Vec<u8>, Vec<u8>) {
        (
            encode_indices_with(&self.indices, encoding.indices),
            encode_values_with(&self.values, encoding.values),
        )
    }

    /// Decodes and validates a packed slice of delta varints and f32 for a
    /// model of `parameter_count` parameters: indices in range and unique,
    /// counts equal, values finite.
    pub fn decode(
        index_bytes: &[u8],
        value_bytes: &[u8],
        parameter_count: u64,
    ) -> Result<Self, SparseError> {
        Self::decode_with(
            index_bytes,
            value_bytes,
            parameter_count,
            SliceEncoding::default(),
        )
    }

    /// Decodes and validates a packed slice in `encoding`, as
    /// [`SparseSlice::decode`] does.
    pub fn decode_with(
        index_bytes: &[u8],
        value_bytes: &[u8],
        parameter_count: u64,
        encoding: SliceEncoding,
    ) -> Result<Self, SparseError> {
        let values = decode_values_with(value_bytes, encoding.values)?;
        let indices =
            decode_indices_with(index_bytes, values.len(), parameter_count, encoding.indices)?;
        if indices.len() != values.len() {
            return Err(SparseError::CountMismatch {
                indices: indices.len(),
                values: values.len(),
            });
        }
        let slice = SparseSlice { indices, values };
        slice.check_finite()?;
        Ok(slice)
    }

    /// Decodes a dense slice of f32: exactly `parameter_count` finite values.
    pub fn decode_dense(value_bytes: &[u8], parameter_count: u64) -> Result<Vec<f32>, SparseError> {
        Self::decode_dense_with(value_bytes, parameter_count, ValueEncoding::F32)
    }

    /// Decodes a dense slice in `encoding`: exactly `parameter_count` finite
    /// values.
    pub fn decode_dense_with(
        value_bytes: &[u8],
        parameter_count: u64,
        encoding: ValueEncoding,
    ) -> Result<Vec<f32>, SparseError> {
        let values = decode_values_with(value_bytes, encoding)?;
        if values.len() as u64 != parameter_count {
            return Err(SparseError::DenseLength {
                values: values.len(),
                parameter_count,
            });
        }
        // A pass without early exit vectorises; the position is searched
        // for only when some value is not finite.
        let all_finite = values.iter().fold(true, |all, v| all & v.is_finite());
        if !all_finite
            && let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite())
        {
            return Err(SparseError::NonFiniteValue {
                index: index as u64,
                value,
            });
        }
        Ok(values)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the slice has no entries.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Rejects the first NaN or infinite value.
    pub fn check_finite(&self) -> Result<(), SparseError> {
        // A pass without early exit vectorises; the position is searched
        // for only when some value is not finite.
        if self.values.iter().fold(true, |all, v| all & v.is_finite()) {
            return Ok(());
        }
        for (&index, &value) in self.indices.iter().zip(&self.values) {
            if !value.is_finite() {
                return Err(SparseError::NonFiniteValue {
                    index: u64::from(index),
                    value,
                });
            }
        }
        Ok(())
    }

    /// Rejects the first value outside `[-gamma, gamma]`. The comparison is
    /// in f32, the precision of the values, so a value clipped to gamma by
    /// the sender (which rounds gamma to f32) passes.
    pub fn check_bound(&self, gamma: f64) -> Result<(), SparseError> {
        self.check_bound_with(gamma, ValueEncoding::F32)
    }

    /// Rejects the first value outside `[-gamma, gamma]` as `encoding`
    /// rounds that bound ([`ValueEncoding::encoded_bound`]), so a value
    /// clipped to gamma by the sender and then encoded passes.
    pub fn check_bound_with(&self, gamma: f64, encoding: ValueEncoding) -> Result<(), SparseError> {
        let limit = encoding.encoded_bound(gamma);
        // As in check_finite, a vectorised pass first. The values are
        // finite here, so the largest magnitude decides.
        let largest = self
            .values
            .iter()
            .fold(0f32, |largest, v| largest.max(v.abs()));
        if largest <= limit {
            return Ok(());
        }
        for (&index, &value) in self.indices.iter().zip(&self.values) {
            if value.abs() > limit {
                return Err(SparseError::OutOfBound {
                    index: u64::from(index),
                    value,
                    gamma,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sorted_unique(mut indices: Vec<u32>) -> Vec<u32> {
        indices.sort_unstable();
        indices.dedup();
        indices
    }

    proptest! {
        #[test]
        fn slice_round_trips(raw in proptest::collection::vec(0u32..2_000_000, 0..500),
                             seed in any::<u32>()) {
            let indices = sorted_unique(raw);
            let values: Vec<f32> = indices
                .iter()
                .map(|&i| ((i ^ seed) as f32 / 1e6) - 1.0)
                .collect();
            let slice = SparseSlice { indices, values };
            let (index_bytes, value_bytes) = slice.encode();
            let decoded = SparseSlice::decode(&index_bytes, &value_bytes, 2_000_000).unwrap();
            prop_assert_eq!(decoded, slice);
        }

        #[test]
        fn rice_slice_round_trips(raw in proptest::collection::vec(0u32..2_000_000, 0..500),
                                  f16 in any::<bool>()) {
            let indices = sorted_unique(raw);
            let values: Vec<f32> = indices.iter().map(|&i| (i % 1000) as f32 / 1024.0).collect();
            let slice = SparseSlice { indices, values };
            let encoding = SliceEncoding {
                indices: IndexEncoding::Rice,
                values: if f16 { ValueEncoding::F16 } else { ValueEncoding::F32 },
            };
            let (index_bytes, value_bytes) = slice.encode_with(encoding);
            let decoded =
                SparseSlice::decode_with(&index_bytes, &value_bytes, 2_000_000, encoding).unwrap();
            // Multiples of 1/1024 below 1 are exact in binary16 too.
            prop_assert_eq!(decoded, slice);
        }

        #[test]
        fn rice_round_trips_extreme_gaps(raw in proptest::collection::vec(any::<u32>(), 1..50)) {
            let indices = sorted_unique(raw);
            let bytes = encode_indices_rice(&indices);
            let decoded = decode_indices_rice(&bytes, indices.len(), 1 << 32).unwrap();
            prop_assert_eq!(decoded, indices);
        }

        #[test]
        fn rice_decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                                count in 0usize..200,
                                                parameter_count in 1u64..1_000_000) {
            if let Ok(indices) = decode_indices_rice(&bytes, count, parameter_count) {
                prop_assert_eq!(indices.len(), count);
                prop_assert!(indices.windows(2).all(|pair| pair[0] < pair[1]));
                prop_assert!(indices.iter().all(|&index| u64::from(index) < parameter_count));
            }
        }

        #[test]
        fn f16_bound_holds_after_rounding(value in -10.0f32..10.0, gamma in 1e-6f64..100.0) {
            let slice = SparseSlice {
                indices: vec![0],
                values: vec![bound_value(value, gamma)],
            };
            let bytes = encode_values_with(&slice.values, ValueEncoding::F16);
            let decoded = SparseSlice {
                indices: vec![0],
                values: decode_values_with(&bytes, ValueEncoding::F16).unwrap(),
            };
            prop_assert!(decoded.check_bound_with(gamma, ValueEncoding::F16).is_ok());
        }

        #[test]
        fn varint_round_trips(value in any::<u64>()) {
            let mut bytes = Vec::new();
            write_varint(&mut bytes, value);
            let mut pos = 0;
            prop_assert_eq!(read_varint(&bytes, &mut pos).unwrap(), value);
            prop_assert_eq!(pos, bytes.len());
        }

        #[test]
        fn decoder_never_panics_on_garbage(indices in proptest::collection::vec(any::<u8>(), 0..64),
                                           values in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = SparseSlice::decode(&indices, &values, 1000);
        }
    }

    #[test]
    fn duplicate_index_is_rejected() {
        let mut bytes = Vec::new();
        write_varint(&mut bytes, 17);
        write_varint(&mut bytes, 0);
        let values = encode_values(&[0.1, 0.2]);
        assert_eq!(
            SparseSlice::decode(&bytes, &values, 100),
            Err(SparseError::DuplicateIndex { index: 17 })
        );
    }

    #[test]
    fn index_out_of_range_is_rejected() {
        let bytes = encode_indices(&[3, 100]);
        let values = encode_values(&[0.1, 0.2]);
        assert_eq!(
            SparseSlice::decode(&bytes, &values, 100),
            Err(SparseError::IndexOutOfRange {
                index: 100,
                parameter_count: 100
            })
        );
    }

    #[test]
    fn huge_delta_saturates_and_is_out_of_range() {
        let mut bytes = Vec::new();
        write_varint(&mut bytes, 5);
        write_varint(&mut bytes, u64::MAX);
        let values = encode_values(&[0.1, 0.2]);
        let error = SparseSlice::decode(&bytes, &values, 100).unwrap_err();
        assert!(
            matches!(error, SparseError::IndexOutOfRange { .. }),
            "{error}"
        );
    }

    #[test]
    fn count_mismatch_is_rejected() {
        let bytes = encode_indices(&[1, 2, 3]);
        let values = encode_values(&[0.1, 0.2]);
        assert_eq!(
            SparseSlice::decode(&bytes, &values, 100),
            Err(SparseError::CountMismatch {
                indices: 3,
                values: 2
            })
        );
    }

    #[test]
    fn ragged_values_are_rejected() {
        let bytes = encode_indices(&[1]);
        assert_eq!(
            SparseSlice::decode(&bytes, &[0, 0, 0], 100),
            Err(SparseError::RaggedValues { bytes: 3, width: 4 })
        );
    }

    #[test]
    fn non_finite_values_are_rejected() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let bytes = encode_indices(&[4, 9]);
            let values = encode_values(&[0.5, bad]);
            let error = SparseSlice::decode(&bytes, &values, 100).unwrap_err();
            assert!(
                matches!(error, SparseError::NonFiniteValue { index: 9, .. }),
                "{error}"
            );
        }
    }

    #[test]
    fn truncated_and_overlong_varints_are_rejected() {
        let values = encode_values(&[0.5]);
        assert_eq!(
            SparseSlice::decode(&[0x80], &values, 100),
            Err(SparseError::TruncatedVarint { offset: 0 })
        );
        let overlong = [0xff; 11];
        assert_eq!(
            SparseSlice::decode(&overlong, &values, 100),
            Err(SparseError::MalformedVarint { offset: 0 })
        );
    }

    #[test]
    fn bound_check_names_the_value() {
        let slice = SparseSlice {
            indices: vec![2, 5],
            values: vec![0.01, -0.5],
        };
        assert!(slice.check_bound(0.5).is_ok());
        let error = slice.check_bound(0.1).unwrap_err();
        assert_eq!(
            error,
            SparseError::OutOfBound {
                index: 5,
                value: -0.5,
                gamma: 0.1
            }
        );
        assert!(error.to_string().contains("-0.5"));
    }

    #[test]
    fn value_clipped_in_f32_passes_the_bound() {
        let gamma = 0.05f64;
        let slice = SparseSlice {
            indices: vec![0],
            values: vec![0.5f32.clamp(-0.05, 0.05)],
        };
        assert!(slice.check_bound(gamma).is_ok());
    }

    #[test]
    fn dense_length_must_match() {
        let values = encode_values(&[1.0, 2.0]);
        assert_eq!(
            SparseSlice::decode_dense(&values, 2).unwrap(),
            vec![1.0, 2.0]
        );
        assert_eq!(
            SparseSlice::decode_dense(&values, 3),
            Err(SparseError::DenseLength {
                values: 2,
                parameter_count: 3
            })
        );
    }

    fn bound_value(value: f32, gamma: f64) -> f32 {
        value.clamp(-(gamma as f32), gamma as f32)
    }

    /// `count` distinct indices below `n` drawn uniformly, sorted.
    fn uniform_selection(n: u32, count: usize, seed: u64) -> Vec<u32> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let drawn = rand::seq::index::sample(&mut rng, n as usize, count);
        sorted_unique(drawn.into_iter().map(|i| i as u32).collect())
    }

    #[test]
    fn rice_costs_near_the_entropy_of_a_selection() {
        // Choosing k of n uniformly carries log2(n choose k) bits; per index
        // that is about log2(n / k) + 1.44. Rice codes stay within 0.25 bit.
        let n = 109_386u32;
        for (count, max_bits) in [(110, 11.7), (1_094, 8.4), (10_939, 5.1)] {
            let indices = uniform_selection(n, count, count as u64);
            let bits = encode_indices_rice(&indices).len() as f64 * 8.0 / count as f64;
            let varint_bits = encode_indices(&indices).len() as f64 * 8.0 / count as f64;
            assert!(bits <= max_bits, "{count} of {n}: {bits:.2} bits per index");
            assert!(
                bits < varint_bits,
                "{count} of {n}: Rice {bits:.2} bits, varint {varint_bits:.2}"
            );
        }
    }

    #[test]
    fn rice_of_consecutive_indices_takes_one_bit_each() {
        let indices: Vec<u32> = (0..800).collect();
        let bytes = encode_indices_rice(&indices);
        assert_eq!(bytes[0], 0, "the Rice parameter of gaps of zero");
        assert_eq!(bytes.len(), 1 + 100);
        assert_eq!(decode_indices_rice(&bytes, 800, 800).unwrap(), indices);
    }

    #[test]
    fn rice_of_no_indices_is_empty() {
        assert!(encode_indices_rice(&[]).is_empty());
        assert_eq!(decode_indices_rice(&[], 0, 10).unwrap(), Vec::<u32>::new());
        assert_eq!(
            decode_indices_rice(&[], 2, 10),
            Err(SparseError::TruncatedRice { entry: 0, count: 2 })
        );
    }

    #[test]
    fn rice_rejects_a_parameter_above_31() {
        assert_eq!(
            decode_indices_rice(&[32, 0], 1, 10),
            Err(SparseError::InvalidRiceParameter { parameter: 32 })
        );
    }

    #[test]
    fn rice_rejects_fewer_entries_than_values() {
        let bytes = encode_indices_rice(&[3, 90, 1000]);
        let error = decode_indices_rice(&bytes, 4, 2000).unwrap_err();
        assert!(
            matches!(error, SparseError::TruncatedRice { count: 4, .. }),
            "{error}"
        );
    }

    #[test]
    fn rice_rejects_more_entries_than_values() {
        let bytes = encode_indices_rice(&[3, 90, 1000, 1500, 1900]);
        let error = decode_indices_rice(&bytes, 2, 2000).unwrap_err();
        assert!(
            matches!(error, SparseError::TrailingBits { count: 2, .. }),
            "{error}"
        );
    }

    #[test]
    fn rice_rejects_cleared_padding_bits() {
        // Parameter 0 and one gap of 0 is the single bit 0, then seven one
        // bits of padding. A cleared bit among them is not padding.
        assert_eq!(encode_indices_rice(&[0]), vec![0, 0b1111_1110]);
        assert_eq!(
            decode_indices_rice(&[0, 0b1111_1110], 1, 10).unwrap(),
            vec![0]
        );
        assert_eq!(
            decode_indices_rice(&[0, 0b1110_1110], 1, 10),
            Err(SparseError::TrailingBits { bits: 7, count: 1 })
        );
    }

    #[test]
    fn rice_run_ending_at_the_buffer_top_decodes() {
        // Consecutive indices after a start of 127 give parameter 0 and a
        // first code of 127 ones, so some run of ones ends exactly at the
        // top bit of the 64-bit read buffer.
        let indices: Vec<u32> = (127..=327).collect();
        let bytes = encode_indices_rice(&indices);
        assert_eq!(
            decode_indices_rice(&bytes, indices.len(), 109_386).unwrap(),
            indices
        );
        for start in 0..200u32 {
            let indices: Vec<u32> = (start..start + 150).map(|i| i * 2).collect();
            let bytes = encode_indices_rice(&indices);
            assert_eq!(
                decode_indices_rice(&bytes, indices.len(), 1_000).unwrap(),
                indices,
                "start {start}"
            );
        }
    }

    #[test]
    fn rice_padding_is_never_read_as_entries() {
        // With parameter 0 a zero bit is a whole gap of zero, so padding of
        // zero bits would decode as extra consecutive indices.
        let bytes = encode_indices_rice(&[1, 2]);
        assert_eq!(bytes[0], 0, "the Rice parameter of gaps of 1 and 0");
        let error = decode_indices_rice(&bytes, 3, 100).unwrap_err();
        assert_eq!(error, SparseError::TruncatedRice { entry: 2, count: 3 });
    }

    #[test]
    fn rice_rejects_an_index_out_of_range() {
        let bytes = encode_indices_rice(&[5, 99]);
        assert_eq!(
            decode_indices_rice(&bytes, 2, 99),
            Err(SparseError::IndexOutOfRange {
                index: 99,
                parameter_count: 99
            })
        );
        // A run of 512 one bits is a quotient of 512, far beyond 100.
        let mut long_run = vec![0u8];
        long_run.extend([0xff; 64]);
        long_run.push(0);
        assert_eq!(
            decode_indices_rice(&long_run, 1, 100),
            Err(SparseError::IndexOutOfRange {
                index: 512,
                parameter_count: 100
            })
        );
    }

    #[test]
    fn f16_halves_the_value_bytes() {
        let values = [0.001f32, -0.0005, 0.0];
        let bytes = encode_values_with(&values, ValueEncoding::F16);
        assert_eq!(bytes.len(), 6);
        let decoded = decode_values_with(&bytes, ValueEncoding::F16).unwrap();
        for (value, decoded) in values.iter().zip(&decoded) {
            assert!(
                (value - decoded).abs() <= value.abs() / 1024.0,
                "{value} decoded as {decoded}"
            );
        }
        assert_eq!(
            decode_values_with(&[0, 0, 0], ValueEncoding::F16),
            Err(SparseError::RaggedValues { bytes: 3, width: 2 })
        );
    }

    #[test]
    fn f16_overflow_is_rejected_as_not_finite() {
        let bytes = encode_indices(&[7]);
        let values = encode_values_with(&[70_000.0], ValueEncoding::F16);
        let encoding = SliceEncoding {
            indices: IndexEncoding::DeltaVarint,
            values: ValueEncoding::F16,
        };
        let error = SparseSlice::decode_with(&bytes, &values, 10, encoding).unwrap_err();
        assert!(
            matches!(error, SparseError::NonFiniteValue { index: 7, .. }),
            "{error}"
        );
    }

    #[test]
    fn f64_payload_matches_f32_payload() {
        let values = [1.5f64, -2.25, 1e-9, 3.0e38];
        let narrowed: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        assert_eq!(encode_f64_as_f32(&values), encode_values(&narrowed));
    }

    #[test]
    fn small_deltas_take_one_byte() {
        let indices: Vec<u32> = (0..1000).map(|i| i * 10).collect();
        assert_eq!(encode_indices(&indices).len(), 1000);
    }
}
