//! Conversions between the payload codes of `dssgd-common` and their
//! numbers on the wire, which the server and the participant share.

use dssgd_common::sparse::{IndexEncoding, SliceEncoding, ValueEncoding};

use crate::v1;

impl From<IndexEncoding> for v1::IndexEncoding {
    fn from(encoding: IndexEncoding) -> Self {
        match encoding {
            IndexEncoding::DeltaVarint => Self::DeltaVarint,
            IndexEncoding::Rice => Self::Rice,
        }
    }
}

impl From<v1::IndexEncoding> for IndexEncoding {
    fn from(encoding: v1::IndexEncoding) -> Self {
        match encoding {
            v1::IndexEncoding::DeltaVarint => Self::DeltaVarint,
            v1::IndexEncoding::Rice => Self::Rice,
        }
    }
}

impl From<ValueEncoding> for v1::ValueEncoding {
    fn from(encoding: ValueEncoding) -> Self {
        match encoding {
            ValueEncoding::F32 => Self::F32,
            ValueEncoding::F16 => Self::F16,
        }
    }
}

impl From<v1::ValueEncoding> for ValueEncoding {
    fn from(encoding: v1::ValueEncoding) -> Self {
        match encoding {
            v1::ValueEncoding::F32 => Self::F32,
            v1::ValueEncoding::F16 => Self::F16,
        }
    }
}

impl v1::SparseSlice {
    /// Builds a sparse slice from its encoded index and value payloads and
    /// the codes they were encoded with.
    pub fn from_payloads(indices: Vec<u8>, values: Vec<u8>, encoding: SliceEncoding) -> Self {
        Self {
            indices: indices.into(),
            values: values.into(),
            dense: false,
            index_encoding: v1::IndexEncoding::from(encoding.indices) as i32,
            value_encoding: v1::ValueEncoding::from(encoding.values) as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_codes_round_trip() {
        for encoding in [IndexEncoding::DeltaVarint, IndexEncoding::Rice] {
            let wire = v1::IndexEncoding::from(encoding);
            assert_eq!(IndexEncoding::from(wire), encoding);
        }
        assert_eq!(v1::IndexEncoding::from(IndexEncoding::Rice) as i32, 1);
    }

    #[test]
    fn value_codes_round_trip() {
        for encoding in [ValueEncoding::F32, ValueEncoding::F16] {
            let wire = v1::ValueEncoding::from(encoding);
            assert_eq!(ValueEncoding::from(wire), encoding);
        }
        assert_eq!(v1::ValueEncoding::from(ValueEncoding::F16) as i32, 1);
    }

    #[test]
    fn payload_slice_records_codes() {
        let encoding = SliceEncoding {
            indices: IndexEncoding::Rice,
            values: ValueEncoding::F16,
        };
        let slice = v1::SparseSlice::from_payloads(vec![1, 2], vec![3, 4, 5, 6], encoding);
        assert!(!slice.dense);
        assert_eq!(slice.indices.as_ref(), &[1, 2]);
        assert_eq!(slice.values.as_ref(), &[3, 4, 5, 6]);
        assert_eq!(slice.index_encoding, v1::IndexEncoding::Rice as i32);
        assert_eq!(slice.value_encoding, v1::ValueEncoding::F16 as i32);
    }
}
