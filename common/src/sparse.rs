//! Packed encoding of sparse parameter slices.
//!
//! Indices are strictly increasing and stored as unsigned LEB128 varints: the
//! first index itself, then each difference to the previous one. Values are
//! little-endian f32, four bytes each. A 10% slice of a 10^5-parameter model
//! costs about 1.2 bytes per index instead of 4, and decoding is a tight loop
//! over two byte buffers rather than two repeated protobuf fields.
//!
//! The decoder never trusts a declared length for allocation: it only grows
//! its output as it reads bytes that are actually present.

use thiserror::Error;

/// Largest number of bytes a varint for a `u64` occupies.
const MAX_VARINT_BYTES: usize = 10;

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
    /// The value payload length is not a multiple of four.
    #[error("value payload of {bytes} bytes is not a whole number of 4-byte f32 values")]
    RaggedValues {
        /// Length of the value payload.
        bytes: usize,
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
    let mut out = Vec::with_capacity(values.len() * 4);
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
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

/// Decodes little-endian f32 values.
pub fn decode_values(bytes: &[u8]) -> Result<Vec<f32>, SparseError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(SparseError::RaggedValues { bytes: bytes.len() });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect())
}

impl SparseSlice {
    /// Encodes the slice into its index and value payloads.
    pub fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        (encode_indices(&self.indices), encode_values(&self.values))
    }

    /// Decodes and validates a packed slice for a model of `parameter_count`
    /// parameters: indices in range and unique, counts equal, values finite.
    pub fn decode(
        index_bytes: &[u8],
        value_bytes: &[u8],
        parameter_count: u64,
    ) -> Result<Self, SparseError> {
        let values = decode_values(value_bytes)?;
        let indices = decode_indices(index_bytes, parameter_count)?;
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

    /// Decodes a dense slice: exactly `parameter_count` finite values.
    pub fn decode_dense(value_bytes: &[u8], parameter_count: u64) -> Result<Vec<f32>, SparseError> {
        let values = decode_values(value_bytes)?;
        if values.len() as u64 != parameter_count {
            return Err(SparseError::DenseLength {
                values: values.len(),
                parameter_count,
            });
        }
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
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
        let limit = gamma as f32;
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
            Err(SparseError::RaggedValues { bytes: 3 })
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

    #[test]
    fn small_deltas_take_one_byte() {
        let indices: Vec<u32> = (0..1000).map(|i| i * 10).collect();
        assert_eq!(encode_indices(&indices).len(), 1000);
    }
}
