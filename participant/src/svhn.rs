//! SVHN cropped digits: a reader for the MATLAB level-5 MAT-files
//! `train_32x32.mat` and `test_32x32.mat`, normalisation, and the download
//! checked against the published MD5.
//!
//! Each file contains two variables: `X`, the images as a 32x32x3xN uint8 array
//! in MATLAB's column-major order (`X(row, column, channel, image)`), and `y`,
//! the labels as an Nx1 double array of values 1 to 10, where 10 stands for
//! the digit 0.
//!
//! The reader follows the level-5 layout of MathWorks' "MAT-File Format"
//! document. A 128-byte header (descriptive text, subsystem offset, version
//! 0x0100 and the endian indicator) is followed by data elements. Each element
//! is an 8-byte tag (data type and byte count) and data padded to 8 bytes, or,
//! for up to 4 bytes of data, one 8-byte small element. A variable is an
//! `miMATRIX` element, stored directly or inside an `miCOMPRESSED` (zlib)
//! element. Only little-endian files are read.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::read::ZlibDecoder;
use tch::{Kind, Tensor};
use tracing::debug;

use crate::data::{
    Checksum, DataError, DataSource, Dataset, FileSpec, PixelStats, Splits, download_agent,
    ensure_files, read_file, require_files,
};

/// Height and width of an SVHN image, in pixels.
pub const IMAGE_SIDE: usize = 32;

/// Colour channels of an SVHN image (red, green, blue).
pub const CHANNELS: usize = 3;

/// Base URL of the SVHN cropped-digit files.
pub const SVHN_URL: &str = "http://ufldl.stanford.edu/housenumbers/";

const TRAIN_FILE: &str = "train_32x32.mat";
const TEST_FILE: &str = "test_32x32.mat";

/// The two SVHN files with their published MD5, the values that torchvision's
/// SVHN dataset class checks. The download limits leave room above the
/// published sizes of about 182 MB (training) and 64 MB (test).
const SVHN_FILES: [FileSpec<'static>; 2] = [
    FileSpec {
        name: TRAIN_FILE,
        checksum: Checksum::Md5("e26dedcc434d2e4c54c9b2d4a06d8373"),
        max_download_bytes: 200 << 20,
    },
    FileSpec {
        name: TEST_FILE,
        checksum: Checksum::Md5("eb5a983be6a315427106f1b164d9cef3"),
        max_download_bytes: 80 << 20,
    },
];

/// Source of the SVHN files: one server, files stored as published.
const SVHN_SOURCE: DataSource<'static> = DataSource {
    dataset: "SVHN",
    url: SVHN_URL,
    mirrors: &[SVHN_URL],
    files: &SVHN_FILES,
    gzip: false,
};

/// Time allowed to receive one file. At 200 KB/s the training file takes
/// about 15 minutes, so 30 minutes allows for a slow link.
const DOWNLOAD_BODY_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Loads and validates `train_32x32.mat` and `test_32x32.mat` in `dir`.
///
/// Pixels are scaled to [0, 1], then shifted and scaled by the mean and
/// population standard deviation of all training pixels (one pair for the
/// three channels, as for MNIST). The test split uses the same two values.
/// Images become `[N, 3, 32, 32]` f32 tensors, channel first, and labels 1
/// to 10 become class indices with 10 mapped to 0. Checksums are not checked,
/// so any valid MAT-files with the SVHN variables load.
pub fn load_svhn(dir: &Path) -> Result<Splits, DataError> {
    require_files(dir, &SVHN_SOURCE)?;
    let train = RawSplit::read(dir, TRAIN_FILE)?;
    let test = RawSplit::read(dir, TEST_FILE)?;
    if train.count == 0 {
        return Err(DataError::EmptyTrainingSet { path: train.path });
    }

    let stats = PixelStats::of(&train.pixels);
    debug!(
        mean = stats.mean,
        std = stats.std,
        "normalising SVHN with the training pixel statistics"
    );
    Ok(Splits {
        train: train.into_dataset(stats),
        test: test.into_dataset(stats),
    })
}

/// Makes sure both SVHN files are in `dir`, downloading the missing ones from
/// [`SVHN_URL`] when `download` is true.
///
/// Returns at once when both are present, whatever their contents. A
/// download checks the file's MD5 against the published value and writes it
/// through a temporary file and a rename. After the downloads both files are
/// checked, so a folder that mixes another local file with a downloaded one
/// is rejected.
pub fn ensure_svhn(dir: &Path, download: bool) -> Result<(), DataError> {
    let agent = download_agent(DOWNLOAD_BODY_TIMEOUT);
    ensure_files(dir, download, &SVHN_SOURCE, &agent)
}

/// One split's validated pixels and labels, before conversion to tensors.
struct RawSplit {
    path: PathBuf,
    /// `X` in column-major order: row, then column, then channel, then image.
    pixels: Vec<u8>,
    /// Class indices 0 to 9.
    labels: Vec<i64>,
    count: usize,
}

impl RawSplit {
    fn read(dir: &Path, name: &str) -> Result<RawSplit, DataError> {
        let (path, bytes) = read_file(dir, &SVHN_SOURCE, name)?;
        let parsed = parse_svhn(&bytes);
        drop(bytes);
        match parsed {
            Ok((pixels, labels)) => Ok(RawSplit {
                path,
                count: labels.len(),
                pixels,
                labels,
            }),
            Err(source) => Err(DataError::InvalidMat { path, source }),
        }
    }

    fn into_dataset(self, stats: PixelStats) -> Dataset {
        let side = IMAGE_SIDE as i64;
        let count = self.count as i64;
        // Column-major X(row, column, channel, image) read in row-major order
        // is [image][channel][column][row], so swapping the last two axes
        // gives [image][channel][row][column].
        let pixels = Tensor::from_slice(&self.pixels)
            .view([count, CHANNELS as i64, side, side])
            .transpose(2, 3)
            .contiguous();
        drop(self.pixels);
        let mut images = pixels.to_kind(Kind::Float);
        drop(pixels);
        // (x / 255 - mean) / std, in place to keep one float copy of the split.
        let _ = images.g_mul_scalar_(1.0 / (255.0 * stats.std));
        let _ = images.g_sub_scalar_(stats.mean / stats.std);
        Dataset {
            images,
            labels: Tensor::from_slice(&self.labels),
        }
    }
}

/// Errors in the contents of an SVHN MAT-file. Positions of values count
/// from 0 in MATLAB's column-major order.
#[derive(Debug, thiserror::Error)]
pub enum MatError {
    /// The file ends inside the 128-byte header.
    #[error(
        "the file is {len} bytes long, shorter than the 128-byte MAT-file header; the file is truncated or not a MAT-file: delete it and fetch it again with --download"
    )]
    HeaderTooShort {
        /// File length in bytes.
        len: usize,
    },

    /// The file is an HDF5 file, as MATLAB writes with `save -v7.3`.
    #[error(
        "the file is a MAT-file version 7.3 (HDF5), which is not supported; save it as version 7 in MATLAB (save(name, 'X', 'y', '-v7')) or use the published SVHN files"
    )]
    Hdf5,

    /// The endian indicator is "MI": the file was written big-endian.
    #[error(
        "the file is big-endian (endian indicator \"MI\"), which is not supported; save it again on a little-endian machine"
    )]
    BigEndian,

    /// Bytes 126 and 127 are neither "IM" nor "MI".
    #[error(
        "invalid endian indicator {found:?} at byte 126: expected \"IM\" (little-endian); the file is not a level-5 MAT-file"
    )]
    InvalidEndian {
        /// The two bytes, as text.
        found: String,
    },

    /// The header's version is not 0x0100.
    #[error(
        "unsupported MAT-file version 0x{version:04x}: expected 0x0100 (level 5, as MATLAB writes with -v6 or -v7)"
    )]
    UnsupportedVersion {
        /// Version read from bytes 124 and 125.
        version: u16,
    },

    /// The file or a zlib stream ends before the data that a tag declares.
    #[error(
        "the file is truncated: the {part} at {location} needs {needed} bytes but only {available} remain; delete the file and fetch it again with --download"
    )]
    Truncated {
        /// Part of the file being read, such as "data element".
        part: &'static str,
        /// Position of the part, such as "byte 128".
        location: String,
        /// Bytes the part needs.
        needed: u64,
        /// Bytes left.
        available: u64,
    },

    /// A compressed element is not a valid zlib stream.
    #[error(
        "failed to decompress the data at {location}: {source}; the file is corrupt: delete it and fetch it again with --download"
    )]
    Decompress {
        /// Position of the failing read.
        location: String,
        /// Decoder error.
        source: io::Error,
    },

    /// A data element is malformed.
    #[error(
        "invalid data element at {location}: {problem}; the file is corrupt or not a MAT-file: delete it and fetch it again with --download"
    )]
    InvalidElement {
        /// Position of the element.
        location: String,
        /// Description of the problem.
        problem: String,
    },

    /// `X` or `y` is not in the file.
    #[error(
        "variable {name} not found: an SVHN file holds X (the images) and y (the labels); use the cropped-digit files from {}",
        SVHN_URL
    )]
    MissingVariable {
        /// "X" or "y".
        name: &'static str,
    },

    /// `X` or `y` is stored twice.
    #[error("variable {name} is stored twice: an SVHN file holds it once")]
    DuplicateVariable {
        /// "X" or "y".
        name: &'static str,
    },

    /// A variable has an unexpected MATLAB class.
    #[error(
        "{name} has class {found}, expected {expected}; use the cropped-digit files from {}",
        SVHN_URL
    )]
    WrongClass {
        /// "X" or "y".
        name: &'static str,
        /// Class read from the array flags.
        found: String,
        /// Class or classes accepted.
        expected: &'static str,
    },

    /// A variable has an imaginary part.
    #[error("{name} is complex: expected real values")]
    Complex {
        /// "X" or "y".
        name: &'static str,
    },

    /// A variable has unexpected dimensions.
    #[error(
        "{name} has dimensions {found}, expected {expected}; use the cropped-digit files from {}",
        SVHN_URL
    )]
    WrongDimensions {
        /// "X" or "y".
        name: &'static str,
        /// Dimensions read, such as "32x32x1x7".
        found: String,
        /// Dimensions accepted.
        expected: &'static str,
    },

    /// `X` and `y` disagree on the number of images.
    #[error("X holds {images} images but y holds {labels} labels: the counts must be equal")]
    CountMismatch {
        /// Images in `X`.
        images: usize,
        /// Labels in `y`.
        labels: usize,
    },

    /// A label is not an integer from 1 to 10.
    #[error(
        "label {label} at position {index} is not in 1..10: SVHN labels are 1 to 10, where 10 stands for the digit 0"
    )]
    InvalidLabel {
        /// Position in `y`.
        index: usize,
        /// Value found.
        label: f64,
    },

    /// A pixel of `X`, stored in a wider type than uint8, does not fit uint8.
    #[error("pixel {value} at position {index} of X is not an integer in 0..255")]
    InvalidPixel {
        /// Position in `X`.
        index: usize,
        /// Value found.
        value: f64,
    },
}

const HEADER_LEN: usize = 128;
const TAG_LEN: usize = 8;
const HDF5_SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";
/// A MAT-file version 7.3 is an HDF5 file with a 512-byte user block, which
/// holds a MAT-style header.
const HDF5_USER_BLOCK_LEN: usize = 512;
const VERSION_5: u16 = 0x0100;
const VERSION_7_3: u16 = 0x0200;

// Data types of data elements.
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;

// Array classes in the array flags.
const MX_CHAR: u8 = 4;
const MX_DOUBLE: u8 = 6;
const MX_UINT8: u8 = 9;
const MX_UINT64: u8 = 15;

/// Bit of the array flags set for complex arrays.
const COMPLEX_FLAG: u32 = 0x0800;

/// Deflate encodes at most 1032 output bytes per input byte, so a zlib
/// stream of `n` bytes never inflates to more than `1032 * n` bytes.
const MAX_DEFLATE_RATIO: usize = 1032;

/// Returns the MATLAB name of an array class.
fn class_name(class: u8) -> String {
    let name = match class {
        1 => "cell",
        2 => "struct",
        3 => "object",
        MX_CHAR => "char",
        5 => "sparse",
        MX_DOUBLE => "double",
        7 => "single",
        8 => "int8",
        MX_UINT8 => "uint8",
        10 => "int16",
        11 => "uint16",
        12 => "int32",
        13 => "uint32",
        14 => "int64",
        MX_UINT64 => "uint64",
        other => return format!("unknown ({other})"),
    };
    name.to_string()
}

/// Numeric type in which a data element stores its values. It may differ
/// from the array's class: MATLAB stores a double array whose values fit in
/// uint8 as `miUINT8`, for example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoredType {
    Int8,
    UInt8,
    Int16,
    UInt16,
    Int32,
    UInt32,
    Single,
    Double,
    Int64,
    UInt64,
}

impl StoredType {
    fn from_data_type(data_type: u32) -> Option<StoredType> {
        let stored = match data_type {
            MI_INT8 => StoredType::Int8,
            MI_UINT8 => StoredType::UInt8,
            MI_INT16 => StoredType::Int16,
            MI_UINT16 => StoredType::UInt16,
            MI_INT32 => StoredType::Int32,
            MI_UINT32 => StoredType::UInt32,
            MI_SINGLE => StoredType::Single,
            MI_DOUBLE => StoredType::Double,
            MI_INT64 => StoredType::Int64,
            MI_UINT64 => StoredType::UInt64,
            _ => return None,
        };
        Some(stored)
    }

    /// Returns the size of one value in bytes.
    fn size(self) -> usize {
        match self {
            StoredType::Int8 | StoredType::UInt8 => 1,
            StoredType::Int16 | StoredType::UInt16 => 2,
            StoredType::Int32 | StoredType::UInt32 | StoredType::Single => 4,
            StoredType::Double | StoredType::Int64 | StoredType::UInt64 => 8,
        }
    }
}

/// The real part of a numeric array: little-endian values of one stored type.
#[derive(Debug)]
struct NumericData {
    stored: StoredType,
    bytes: Vec<u8>,
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes
        .try_into()
        .expect("slice length equals the value size")
}

impl NumericData {
    fn len(&self) -> usize {
        self.bytes.len() / self.stored.size()
    }

    /// Returns value `index` as f64. Integers beyond 2^53 lose precision,
    /// which no range check here depends on.
    fn value(&self, index: usize) -> f64 {
        let size = self.stored.size();
        let bytes = &self.bytes[index * size..(index + 1) * size];
        match self.stored {
            StoredType::Int8 => f64::from(i8::from_le_bytes(array(bytes))),
            StoredType::UInt8 => f64::from(bytes[0]),
            StoredType::Int16 => f64::from(i16::from_le_bytes(array(bytes))),
            StoredType::UInt16 => f64::from(u16::from_le_bytes(array(bytes))),
            StoredType::Int32 => f64::from(i32::from_le_bytes(array(bytes))),
            StoredType::UInt32 => f64::from(u32::from_le_bytes(array(bytes))),
            StoredType::Single => f64::from(f32::from_le_bytes(array(bytes))),
            StoredType::Double => f64::from_le_bytes(array(bytes)),
            StoredType::Int64 => i64::from_le_bytes(array(bytes)) as f64,
            StoredType::UInt64 => u64::from_le_bytes(array(bytes)) as f64,
        }
    }

    /// Converts every value to u8, or returns the position and value of the
    /// first one that is not an integer from 0 to 255.
    fn into_u8(self) -> Result<Vec<u8>, (usize, f64)> {
        if self.stored == StoredType::UInt8 {
            return Ok(self.bytes);
        }
        (0..self.len())
            .map(|index| {
                let value = self.value(index);
                if value.fract() == 0.0 && (0.0..=255.0).contains(&value) {
                    Ok(value as u8)
                } else {
                    Err((index, value))
                }
            })
            .collect()
    }
}

/// One variable: an `miMATRIX` element with its flags, dimensions and, for a
/// real numeric class, its values.
#[derive(Debug)]
struct MatArray {
    name: String,
    class: u8,
    complex: bool,
    dims: Vec<usize>,
    /// The real part, read only for real arrays of a numeric class.
    data: Option<NumericData>,
}

/// The two SVHN variables, as found so far.
#[derive(Debug, Default)]
struct Variables {
    images: Option<MatArray>,
    labels: Option<MatArray>,
}

impl Variables {
    fn is_svhn_variable(name: &str) -> bool {
        name == "X" || name == "y"
    }

    fn insert(&mut self, array: MatArray) -> Result<(), MatError> {
        let (slot, name) = match array.name.as_str() {
            "X" => (&mut self.images, "X"),
            "y" => (&mut self.labels, "y"),
            _ => return Ok(()),
        };
        if slot.is_some() {
            return Err(MatError::DuplicateVariable { name });
        }
        *slot = Some(array);
        Ok(())
    }
}

/// Tag of a data element.
#[derive(Clone, Copy, Debug)]
struct Tag {
    data_type: u32,
    len: usize,
    /// The data of a small element, which lives in the tag's second word.
    small: Option<[u8; 4]>,
}

impl Tag {
    /// Decodes a little-endian tag. A small element stores its byte count in
    /// the upper 16 bits of the first word, which are 0 in the normal form.
    fn parse(raw: [u8; TAG_LEN]) -> Tag {
        let first = u32::from_le_bytes(array(&raw[..4]));
        let second: [u8; 4] = array(&raw[4..]);
        if first >> 16 != 0 {
            Tag {
                data_type: first & 0xffff,
                len: (first >> 16) as usize,
                small: Some(second),
            }
        } else {
            Tag {
                data_type: first,
                len: u32::from_le_bytes(second) as usize,
                small: None,
            }
        }
    }
}

/// Returns the bytes of padding after `len` bytes of data, up to a multiple of 8.
fn padding(len: usize) -> usize {
    len.next_multiple_of(8) - len
}

/// Parses an SVHN MAT-file and returns the pixels of `X` in column-major
/// order and the labels as class indices 0 to 9.
fn parse_svhn(bytes: &[u8]) -> Result<(Vec<u8>, Vec<i64>), MatError> {
    check_header(bytes)?;
    let variables = read_variables(bytes)?;
    let images = variables
        .images
        .ok_or(MatError::MissingVariable { name: "X" })?;
    let labels = variables
        .labels
        .ok_or(MatError::MissingVariable { name: "y" })?;
    let count = check_images(&images)?;
    let labels = check_labels(labels)?;
    if labels.len() != count {
        return Err(MatError::CountMismatch {
            images: count,
            labels: labels.len(),
        });
    }
    let data = images
        .data
        .expect("check_images accepts only arrays with data");
    let pixels = data
        .into_u8()
        .map_err(|(index, value)| MatError::InvalidPixel { index, value })?;
    Ok((pixels, labels))
}

fn check_header(bytes: &[u8]) -> Result<(), MatError> {
    let signature_at = |offset: usize| bytes.get(offset..offset + HDF5_SIGNATURE.len());
    if signature_at(0) == Some(HDF5_SIGNATURE)
        || signature_at(HDF5_USER_BLOCK_LEN) == Some(HDF5_SIGNATURE)
    {
        return Err(MatError::Hdf5);
    }
    if bytes.len() < HEADER_LEN {
        return Err(MatError::HeaderTooShort { len: bytes.len() });
    }
    match &bytes[126..128] {
        b"IM" => {}
        b"MI" => return Err(MatError::BigEndian),
        other => {
            return Err(MatError::InvalidEndian {
                found: String::from_utf8_lossy(other).into_owned(),
            });
        }
    }
    match u16::from_le_bytes([bytes[124], bytes[125]]) {
        VERSION_5 => Ok(()),
        VERSION_7_3 => Err(MatError::Hdf5),
        version => Err(MatError::UnsupportedVersion { version }),
    }
}

/// Reads the top-level data elements after the header and collects `X` and `y`.
fn read_variables(bytes: &[u8]) -> Result<Variables, MatError> {
    let mut variables = Variables::default();
    let mut offset = HEADER_LEN;
    while offset < bytes.len() {
        let location = format!("byte {offset}");
        let available = bytes.len() - offset;
        if available < TAG_LEN {
            return Err(MatError::Truncated {
                part: "data element tag",
                location,
                needed: TAG_LEN as u64,
                available: available as u64,
            });
        }
        let tag = Tag::parse(array(&bytes[offset..offset + TAG_LEN]));
        let start = offset + TAG_LEN;
        if tag.small.is_some() {
            // A small element contains at most 4 bytes, so it cannot be a variable.
            offset = start;
            continue;
        }

        let available = bytes.len() - start;
        if tag.len > available {
            return Err(MatError::Truncated {
                part: "data element",
                location,
                needed: tag.len as u64,
                available: available as u64,
            });
        }
        let body = &bytes[start..start + tag.len];
        match tag.data_type {
            MI_MATRIX => {
                let mut reader = MatrixReader::new(body, tag.len, start, None, usize::MAX);
                if let Some(array) = read_matrix(&mut reader)? {
                    variables.insert(array)?;
                }
                offset = (start + tag.len + padding(tag.len)).min(bytes.len());
            }
            MI_COMPRESSED => {
                read_compressed(body, offset, &mut variables)?;
                // MATLAB writes compressed elements without padding.
                offset = start + tag.len;
            }
            // Other top-level elements contain no variables.
            _ => offset = (start + tag.len + padding(tag.len)).min(bytes.len()),
        }
    }
    Ok(variables)
}

/// Inflates one `miCOMPRESSED` element and reads the matrix inside it.
///
/// Only the start of a matrix is inflated when its name is not `X` or `y`.
/// The matrix of `X` or `y` is inflated to the end of the stream, so that a
/// stream that ends early, carries extra data or fails zlib's Adler-32 check
/// is rejected.
fn read_compressed(body: &[u8], offset: usize, variables: &mut Variables) -> Result<(), MatError> {
    let stream_location =
        |position: usize| format!("byte {position} of the zlib stream at byte {offset}");
    let mut decoder = ZlibDecoder::new(body);
    let mut raw = [0u8; TAG_LEN];
    let mut filled = 0;
    while filled < TAG_LEN {
        match decoder.read(&mut raw[filled..]) {
            Ok(0) => {
                return Err(MatError::Truncated {
                    part: "compressed element tag",
                    location: stream_location(0),
                    needed: TAG_LEN as u64,
                    available: filled as u64,
                });
            }
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(MatError::Decompress {
                    location: stream_location(filled),
                    source,
                });
            }
        }
    }
    let tag = Tag::parse(raw);
    if tag.small.is_some() || tag.data_type != MI_MATRIX {
        // MATLAB compresses only matrices, so anything else contains no variable.
        return Ok(());
    }
    let max_len = body.len().saturating_mul(MAX_DEFLATE_RATIO);
    if tag.len > max_len {
        return Err(MatError::InvalidElement {
            location: stream_location(0),
            problem: format!(
                "the compressed matrix declares {} bytes, more than {} compressed bytes can inflate to",
                tag.len,
                body.len()
            ),
        });
    }

    // The SVHN training file inflates to about 1.24 times its size (225.7 MB
    // of pixels in 182 MB), so four times the compressed size avoids
    // regrowing the buffer without trusting the size in the tag.
    let capacity = body.len().saturating_mul(4);
    let mut reader = MatrixReader::new(&mut decoder, tag.len, TAG_LEN, Some(offset), capacity);
    let Some(array) = read_matrix(&mut reader)? else {
        return Ok(());
    };
    reader.drain()?;
    let end = TAG_LEN + tag.len;
    let mut extra = [0u8; 1];
    loop {
        match decoder.read(&mut extra) {
            Ok(0) => break,
            Ok(_) => {
                return Err(MatError::InvalidElement {
                    location: stream_location(0),
                    problem: format!(
                        "the zlib stream contains more than the {end} bytes that its matrix declares"
                    ),
                });
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(MatError::Decompress {
                    location: stream_location(end),
                    source,
                });
            }
        }
    }
    variables.insert(array)
}

/// Reader of the contents of one `miMATRIX` element. It keeps the position
/// for error messages and rejects subelements that run past the matrix.
struct MatrixReader<R> {
    inner: R,
    /// Bytes of the matrix contents not read yet.
    remaining: usize,
    /// Position of the next byte in the file, or in the zlib stream.
    position: usize,
    /// File offset of the compressed element, when reading from one.
    compressed_at: Option<usize>,
    /// Largest buffer allocated ahead of the data that fills it.
    capacity: usize,
}

impl<R: Read> MatrixReader<R> {
    fn new(
        inner: R,
        len: usize,
        position: usize,
        compressed_at: Option<usize>,
        capacity: usize,
    ) -> MatrixReader<R> {
        MatrixReader {
            inner,
            remaining: len,
            position,
            compressed_at,
            capacity,
        }
    }

    fn location(&self, position: usize) -> String {
        match self.compressed_at {
            None => format!("byte {position}"),
            Some(offset) => format!("byte {position} of the zlib stream at byte {offset}"),
        }
    }

    fn invalid(&self, position: usize, problem: String) -> MatError {
        MatError::InvalidElement {
            location: self.location(position),
            problem,
        }
    }

    /// Reads `len` bytes of the matrix contents.
    fn read_bytes(&mut self, len: usize, part: &'static str) -> Result<Vec<u8>, MatError> {
        if len > self.remaining {
            return Err(self.invalid(
                self.position,
                format!(
                    "the {part} needs {len} bytes but its matrix has only {} left",
                    self.remaining
                ),
            ));
        }
        let mut data = Vec::with_capacity(len.min(self.capacity));
        let result = (&mut self.inner).take(len as u64).read_to_end(&mut data);
        if let Err(source) = result {
            return Err(MatError::Decompress {
                location: self.location(self.position),
                source,
            });
        }
        if data.len() < len {
            return Err(MatError::Truncated {
                part,
                location: self.location(self.position),
                needed: len as u64,
                available: data.len() as u64,
            });
        }
        self.remaining -= len;
        self.position += len;
        Ok(data)
    }

    /// Reads one subelement and its padding, returning its data type and data.
    fn read_element(&mut self, part: &'static str) -> Result<(u32, Vec<u8>), MatError> {
        let start = self.position;
        let tag = Tag::parse(array(&self.read_bytes(TAG_LEN, part)?));
        if let Some(small) = tag.small {
            if tag.len > small.len() {
                return Err(self.invalid(
                    start,
                    format!(
                        "the small {part} element declares {} bytes, more than its 4",
                        tag.len
                    ),
                ));
            }
            return Ok((tag.data_type, small[..tag.len].to_vec()));
        }
        let data = self.read_bytes(tag.len, part)?;
        self.skip_padding(tag.len)?;
        Ok((tag.data_type, data))
    }

    /// Skips the padding after `len` bytes of data. Padding that the matrix
    /// does not include is tolerated, as the matrix then ends with this data.
    fn skip_padding(&mut self, len: usize) -> Result<(), MatError> {
        let pad = padding(len).min(self.remaining);
        if pad > 0 {
            self.read_bytes(pad, "padding")?;
        }
        Ok(())
    }

    /// Reads and discards the rest of the matrix contents.
    fn drain(&mut self) -> Result<(), MatError> {
        let len = self.remaining;
        let result = io::copy(&mut (&mut self.inner).take(len as u64), &mut io::sink());
        let copied = match result {
            Ok(copied) => copied,
            Err(source) => {
                return Err(MatError::Decompress {
                    location: self.location(self.position),
                    source,
                });
            }
        };
        if copied < len as u64 {
            return Err(MatError::Truncated {
                part: "matrix",
                location: self.location(self.position),
                needed: len as u64,
                available: copied,
            });
        }
        self.remaining = 0;
        self.position += len;
        Ok(())
    }
}

/// Reads the subelements of one matrix: array flags, dimensions, name and,
/// for a real numeric array, the real part. Returns `None` for an empty
/// matrix or one whose name is not `X` or `y`, without reading its data.
fn read_matrix<R: Read>(reader: &mut MatrixReader<R>) -> Result<Option<MatArray>, MatError> {
    if reader.remaining == 0 {
        return Ok(None);
    }

    let start = reader.position;
    let (data_type, flags) = reader.read_element("array flags")?;
    if data_type != MI_UINT32 || flags.len() != 8 {
        return Err(reader.invalid(
            start,
            format!(
                "the array flags have data type {data_type} and {} bytes, expected miUINT32 ({MI_UINT32}) and 8 bytes",
                flags.len()
            ),
        ));
    }
    let word = u32::from_le_bytes(array(&flags[..4]));
    let class = (word & 0xff) as u8;
    let complex = word & COMPLEX_FLAG != 0;

    let dims_start = reader.position;
    let (data_type, raw_dims) = reader.read_element("dimensions")?;
    if data_type != MI_INT32 || raw_dims.len() < 8 || raw_dims.len() % 4 != 0 {
        return Err(reader.invalid(
            dims_start,
            format!(
                "the dimensions have data type {data_type} and {} bytes, expected miINT32 ({MI_INT32}) and at least two 4-byte values",
                raw_dims.len()
            ),
        ));
    }
    let mut dims = Vec::with_capacity(raw_dims.len() / 4);
    for chunk in raw_dims.chunks_exact(4) {
        let dim = i32::from_le_bytes(array(chunk));
        let Ok(dim) = usize::try_from(dim) else {
            return Err(reader.invalid(dims_start, format!("negative dimension {dim}")));
        };
        dims.push(dim);
    }

    let name_start = reader.position;
    let (data_type, raw_name) = reader.read_element("array name")?;
    if !matches!(data_type, MI_INT8 | MI_UINT8 | MI_UTF8) {
        return Err(reader.invalid(
            name_start,
            format!("the array name has data type {data_type}, expected miINT8 ({MI_INT8})"),
        ));
    }
    let name = String::from_utf8_lossy(&raw_name).into_owned();
    if !Variables::is_svhn_variable(&name) {
        return Ok(None);
    }

    let numeric = (MX_DOUBLE..=MX_UINT64).contains(&class);
    let data = if numeric && !complex {
        Some(read_real_part(reader, &dims)?)
    } else {
        None
    };
    Ok(Some(MatArray {
        name,
        class,
        complex,
        dims,
        data,
    }))
}

/// Reads the real part of a numeric array with dimensions `dims`.
fn read_real_part<R: Read>(
    reader: &mut MatrixReader<R>,
    dims: &[usize],
) -> Result<NumericData, MatError> {
    let start = reader.position;
    let count = dims
        .iter()
        .try_fold(1usize, |product, &dim| product.checked_mul(dim))
        .ok_or_else(|| {
            reader.invalid(start, format!("dimensions {} overflow", format_dims(dims)))
        })?;

    let tag = Tag::parse(array(&reader.read_bytes(TAG_LEN, "real part")?));
    let Some(stored) = StoredType::from_data_type(tag.data_type) else {
        return Err(reader.invalid(
            start,
            format!(
                "the real part has data type {}, expected a numeric type",
                tag.data_type
            ),
        ));
    };
    let expected = count.checked_mul(stored.size());
    if expected != Some(tag.len) {
        return Err(reader.invalid(
            start,
            format!(
                "the real part has {} bytes, but {count} values of {} bytes for dimensions {} need {}",
                tag.len,
                stored.size(),
                format_dims(dims),
                expected.map_or_else(|| "more than fit in memory".to_string(), |n| n.to_string())
            ),
        ));
    }
    let bytes = match tag.small {
        Some(small) if tag.len <= small.len() => small[..tag.len].to_vec(),
        Some(_) => {
            return Err(reader.invalid(
                start,
                format!(
                    "the small real-part element declares {} bytes, more than its 4",
                    tag.len
                ),
            ));
        }
        None => reader.read_bytes(tag.len, "real part")?,
    };
    Ok(NumericData { stored, bytes })
}

fn format_dims(dims: &[usize]) -> String {
    let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
    dims.join("x")
}

/// Checks that `X` is a real 32x32x3xN uint8 array and returns N. MATLAB
/// drops trailing singleton dimensions, so 32x32x3 is one image.
fn check_images(images: &MatArray) -> Result<usize, MatError> {
    if images.class != MX_UINT8 {
        return Err(MatError::WrongClass {
            name: "X",
            found: class_name(images.class),
            expected: "uint8",
        });
    }
    if images.complex {
        return Err(MatError::Complex { name: "X" });
    }
    let dims = &images.dims;
    let side = IMAGE_SIDE;
    let shaped = dims.len() >= 3
        && dims[..3] == [side, side, CHANNELS]
        && dims.iter().skip(4).all(|&dim| dim == 1);
    if !shaped {
        return Err(MatError::WrongDimensions {
            name: "X",
            found: format_dims(dims),
            expected: "32x32x3xN (rows x columns x channels x images)",
        });
    }
    Ok(dims.get(3).copied().unwrap_or(1))
}

/// Checks that `y` is a real numeric Nx1 or 1xN array of integers 1 to 10
/// and returns them as class indices, with 10 mapped to 0.
fn check_labels(labels: MatArray) -> Result<Vec<i64>, MatError> {
    let Some(data) = labels.data else {
        if labels.complex && (MX_DOUBLE..=MX_UINT64).contains(&labels.class) {
            return Err(MatError::Complex { name: "y" });
        }
        return Err(MatError::WrongClass {
            name: "y",
            found: class_name(labels.class),
            expected: "double or another numeric class",
        });
    };
    let dims = &labels.dims;
    let count: usize = dims.iter().product();
    let vector = dims.iter().filter(|&&dim| dim != 1).count() <= 1;
    if !vector {
        return Err(MatError::WrongDimensions {
            name: "y",
            found: format_dims(dims),
            expected: "Nx1 (one label per image)",
        });
    }
    (0..count)
        .map(|index| {
            let label = data.value(index);
            if label.fract() == 0.0 && (1.0..=10.0).contains(&label) {
                Ok(label as i64 % 10)
            } else {
                Err(MatError::InvalidLabel { index, label })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::fs;
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::ZlibEncoder;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use tch::Device;

    use super::*;
    use crate::data::tests::{serve, test_agent};
    use crate::data::{DatasetKind, MirrorError};
    use crate::model::{Model, ModelKind};
    use crate::train::{LocalTrainer, SgdConfig};

    const MX_INT16: u8 = 10;
    const MX_INT32: u8 = 12;

    /// A test-only writer of little-endian level-5 MAT-files.
    mod writer {
        use super::*;

        pub(super) fn header(version: u16, indicator: &[u8; 2]) -> Vec<u8> {
            let mut bytes = b"MATLAB 5.0 MAT-file, written by the dssgd tests".to_vec();
            bytes.resize(116, b' ');
            // Subsystem data offset: none.
            bytes.extend_from_slice(&[0; 8]);
            bytes.extend_from_slice(&version.to_le_bytes());
            bytes.extend_from_slice(indicator);
            bytes
        }

        /// Encodes a data element: the small form for 1 to 4 bytes, else a
        /// tag and the data padded to 8 bytes.
        pub(super) fn element(data_type: u32, data: &[u8]) -> Vec<u8> {
            let mut bytes = Vec::new();
            if (1..=4).contains(&data.len()) {
                let word = data_type | ((data.len() as u32) << 16);
                bytes.extend_from_slice(&word.to_le_bytes());
                let mut small = [0u8; 4];
                small[..data.len()].copy_from_slice(data);
                bytes.extend_from_slice(&small);
            } else {
                bytes.extend_from_slice(&data_type.to_le_bytes());
                bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
                bytes.extend_from_slice(data);
                bytes.resize(bytes.len().next_multiple_of(8), 0);
            }
            bytes
        }

        /// Encodes an `miMATRIX` element of a real array.
        pub(super) fn matrix(
            name: &str,
            class: u8,
            dims: &[i32],
            stored_type: u32,
            data: &[u8],
        ) -> Vec<u8> {
            matrix_with_flags(name, u32::from(class), dims, stored_type, data)
        }

        pub(super) fn matrix_with_flags(
            name: &str,
            flags: u32,
            dims: &[i32],
            stored_type: u32,
            data: &[u8],
        ) -> Vec<u8> {
            let mut flag_bytes = flags.to_le_bytes().to_vec();
            flag_bytes.extend_from_slice(&[0; 4]);
            let dim_bytes: Vec<u8> = dims.iter().flat_map(|dim| dim.to_le_bytes()).collect();
            let mut contents = element(MI_UINT32, &flag_bytes);
            contents.extend(element(MI_INT32, &dim_bytes));
            contents.extend(element(MI_INT8, name.as_bytes()));
            contents.extend(element(stored_type, data));
            element(MI_MATRIX, &contents)
        }

        /// Wraps an element in an `miCOMPRESSED` element, without padding.
        pub(super) fn compressed(element: &[u8]) -> Vec<u8> {
            let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
            encoder.write_all(element).unwrap();
            let stream = encoder.finish().unwrap();
            let mut bytes = MI_COMPRESSED.to_le_bytes().to_vec();
            bytes.extend_from_slice(&(stream.len() as u32).to_le_bytes());
            bytes.extend(stream);
            bytes
        }
    }

    use writer::{compressed, element, header, matrix, matrix_with_flags};

    const TRAIN_COUNT: usize = 7;
    const TEST_COUNT: usize = 3;
    const TRAIN_LABELS: [u8; TRAIN_COUNT] = [10, 1, 2, 3, 4, 5, 9];
    const TEST_LABELS: [u8; TEST_COUNT] = [3, 10, 7];

    /// Pixel (row, column, channel) of image `image` in the generated files.
    /// Swapping row and column changes the value unless they are equal, so a
    /// wrong transpose shows.
    fn pixel(row: usize, column: usize, channel: usize, image: usize) -> u8 {
        ((row * 7 + column * 3 + channel * 50 + image * 11) % 256) as u8
    }

    /// Images `first..first + count` as X stores them: column-major
    /// X(row, column, channel, image).
    fn column_major_pixels(first: usize, count: usize) -> Vec<u8> {
        let side = IMAGE_SIDE;
        let mut pixels = Vec::with_capacity(count * CHANNELS * side * side);
        for image in first..first + count {
            for channel in 0..CHANNELS {
                for column in 0..side {
                    for row in 0..side {
                        pixels.push(pixel(row, column, channel, image));
                    }
                }
            }
        }
        pixels
    }

    fn images_matrix(first: usize, count: usize) -> Vec<u8> {
        let dims = [32, 32, 3, count as i32];
        let pixels = column_major_pixels(first, count);
        matrix("X", MX_UINT8, &dims, MI_UINT8, &pixels)
    }

    /// `y` as MATLAB saves a double array: values stored as miUINT8 when
    /// they fit, or as miDOUBLE when `as_double` is true.
    fn labels_matrix(labels: &[u8], as_double: bool) -> Vec<u8> {
        let dims = [labels.len() as i32, 1];
        if as_double {
            let data: Vec<u8> = labels
                .iter()
                .flat_map(|&label| f64::from(label).to_le_bytes())
                .collect();
            matrix("y", MX_DOUBLE, &dims, MI_DOUBLE, &data)
        } else {
            matrix("y", MX_DOUBLE, &dims, MI_UINT8, labels)
        }
    }

    /// A char variable with a name longer than 4 bytes, which the reader
    /// must skip.
    fn note_matrix() -> Vec<u8> {
        let text: Vec<u8> = "hello".encode_utf16().flat_map(u16::to_le_bytes).collect();
        matrix("__dssgd_note", MX_CHAR, &[1, 5], MI_UINT16, &text)
    }

    /// Builds a MAT-file from elements, each compressed when `compress` is true.
    fn mat_file(elements: &[Vec<u8>], compress: bool) -> Vec<u8> {
        let mut file = header(VERSION_5, b"IM");
        for element in elements {
            if compress {
                file.extend(compressed(element));
            } else {
                file.extend_from_slice(element);
            }
        }
        file
    }

    /// Builds a training file of 7 images. With `compress` every variable is
    /// compressed and `y` is stored as miDOUBLE. Without it `y` is stored as
    /// miUINT8 in a normal element.
    fn train_file(compress: bool) -> Vec<u8> {
        let elements = [
            note_matrix(),
            images_matrix(0, TRAIN_COUNT),
            labels_matrix(&TRAIN_LABELS, compress),
        ];
        mat_file(&elements, compress)
    }

    /// Builds a test file of 3 images (7 to 9), with the storage of `y` the
    /// other way round from [`train_file`]. Three miUINT8 labels fit a small
    /// element.
    fn test_file(compress: bool) -> Vec<u8> {
        let elements = [
            labels_matrix(&TEST_LABELS, !compress),
            images_matrix(TRAIN_COUNT, TEST_COUNT),
        ];
        mat_file(&elements, compress)
    }

    fn write_svhn(dir: &Path, compress: bool) {
        fs::write(dir.join(TRAIN_FILE), train_file(compress)).unwrap();
        fs::write(dir.join(TEST_FILE), test_file(compress)).unwrap();
    }

    /// Mean and population standard deviation of the generated training
    /// pixels scaled to [0, 1].
    fn train_stats() -> (f64, f64) {
        let pixels = column_major_pixels(0, TRAIN_COUNT);
        let values: Vec<f64> = pixels.iter().map(|&p| f64::from(p) / 255.0).collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        (mean, variance.sqrt())
    }

    fn labels_of(dataset: &Dataset) -> Vec<i64> {
        Vec::<i64>::try_from(&dataset.labels).unwrap()
    }

    fn check_generated_set(compress: bool) {
        let dir = tempfile::tempdir().unwrap();
        write_svhn(dir.path(), compress);
        let svhn = load_svhn(dir.path()).unwrap();

        assert_eq!(svhn.train.images.size(), [7, 3, 32, 32]);
        assert_eq!(svhn.test.images.size(), [3, 3, 32, 32]);
        assert_eq!(svhn.train.images.kind(), Kind::Float);
        assert_eq!(svhn.train.labels.kind(), Kind::Int64);
        assert_eq!(labels_of(&svhn.train), [0, 1, 2, 3, 4, 5, 9]);
        assert_eq!(labels_of(&svhn.test), [3, 0, 7]);

        let train_mean = svhn.train.images.mean(Kind::Double).double_value(&[]);
        let train_std = svhn.train.images.std(false).double_value(&[]);
        assert!(train_mean.abs() < 1e-5, "normalised mean {train_mean}");
        assert!((train_std - 1.0).abs() < 1e-4, "normalised std {train_std}");

        let (mean, std) = train_stats();
        let normalised = |value: u8| (f64::from(value) / 255.0 - mean) / std;
        // [image, channel, row, column] in the tensor is X(row, column, channel, image).
        let train_value = svhn.train.images.double_value(&[2, 1, 5, 9]);
        let expected = normalised(pixel(5, 9, 1, 2));
        assert!(
            (train_value - expected).abs() < 1e-5,
            "train pixel {train_value}, expected {expected}"
        );
        // The test split is normalised with the training statistics.
        let test_value = svhn.test.images.double_value(&[1, 2, 30, 4]);
        let expected = normalised(pixel(30, 4, 2, TRAIN_COUNT + 1));
        assert!(
            (test_value - expected).abs() < 1e-5,
            "test pixel {test_value}, expected {expected}"
        );
    }

    #[test]
    fn uncompressed_files_load() {
        check_generated_set(false);
    }

    #[test]
    fn compressed_files_load() {
        check_generated_set(true);
    }

    #[test]
    fn dataset_kind_loads_svhn() {
        let dir = tempfile::tempdir().unwrap();
        write_svhn(dir.path(), true);
        let svhn = DatasetKind::Svhn.load(dir.path()).unwrap();
        let shape = [
            TRAIN_COUNT as i64,
            DatasetKind::Svhn.channels() as i64,
            DatasetKind::Svhn.image_side() as i64,
            DatasetKind::Svhn.image_side() as i64,
        ];
        assert_eq!(svhn.train.images.size(), shape);
    }

    /// Loads a folder with the valid test file and `train` as training file.
    fn load_train(train: &[u8]) -> DataError {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TRAIN_FILE), train).unwrap();
        fs::write(dir.path().join(TEST_FILE), test_file(false)).unwrap();
        load_svhn(dir.path()).unwrap_err()
    }

    /// Returns the MAT-file problem behind `error`, after checking that its
    /// message names the training file.
    fn mat_error(error: DataError) -> MatError {
        let message = error.to_string();
        assert!(message.contains(TRAIN_FILE), "{message}");
        match error {
            DataError::InvalidMat { source, .. } => source,
            other => panic!("expected an invalid MAT-file, got {other}"),
        }
    }

    #[test]
    fn truncated_file_is_rejected() {
        let mut file = train_file(false);
        file.truncate(file.len() - 500);
        let error = load_train(&file);
        let message = error.to_string();
        assert!(message.contains("truncated"), "{message}");
        assert!(message.contains("--download"), "{message}");
        let error = mat_error(error);
        assert!(
            matches!(
                error,
                MatError::Truncated {
                    part: "data element",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn truncated_compressed_file_is_rejected() {
        let mut file = train_file(true);
        file.truncate(file.len() - 10);
        let error = mat_error(load_train(&file));
        assert!(
            matches!(
                error,
                MatError::Truncated {
                    part: "data element",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn short_zlib_stream_is_rejected() {
        let mut element = compressed(&images_matrix(0, TRAIN_COUNT));
        // Keep the tag consistent with a stream cut to half its length.
        let stream_len = (element.len() - TAG_LEN) / 2;
        element.truncate(TAG_LEN + stream_len);
        element[4..8].copy_from_slice(&(stream_len as u32).to_le_bytes());
        let mut file = header(VERSION_5, b"IM");
        file.extend(element);
        let error = mat_error(load_train(&file));
        let MatError::Decompress { source, .. } = &error else {
            panic!("expected a decompression error, got {error}");
        };
        assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof, "{error}");
    }

    #[test]
    fn corrupt_zlib_checksum_is_rejected() {
        let mut element = compressed(&labels_matrix(&TRAIN_LABELS, false));
        // The last 4 bytes of a zlib stream are the Adler-32 of its data.
        let last = element.len() - 1;
        element[last] ^= 0xff;
        let mut file = header(VERSION_5, b"IM");
        file.extend(compressed(&images_matrix(0, TRAIN_COUNT)));
        file.extend(element);
        let error = mat_error(load_train(&file));
        assert!(matches!(error, MatError::Decompress { .. }), "{error}");
    }

    #[test]
    fn huge_element_length_is_rejected() {
        // A tag that claims 4 GiB in a small file must fail before any allocation.
        let mut file = header(VERSION_5, b"IM");
        file.extend_from_slice(&MI_MATRIX.to_le_bytes());
        file.extend_from_slice(&u32::MAX.to_le_bytes());
        file.extend_from_slice(&[0; 64]);
        let error = mat_error(load_train(&file));
        let MatError::Truncated {
            needed, available, ..
        } = error
        else {
            panic!("expected a truncated file, got {error}");
        };
        assert_eq!(needed, u64::from(u32::MAX));
        assert_eq!(available, 64);
    }

    #[test]
    fn huge_compressed_length_is_rejected() {
        let mut inner = MI_MATRIX.to_le_bytes().to_vec();
        inner.extend_from_slice(&u32::MAX.to_le_bytes());
        inner.extend_from_slice(&[0; 16]);
        let mut file = header(VERSION_5, b"IM");
        file.extend(compressed(&inner));
        let error = mat_error(load_train(&file));
        let message = error.to_string();
        assert!(matches!(error, MatError::InvalidElement { .. }), "{error}");
        assert!(message.contains("4294967295 bytes"), "{message}");
    }

    #[test]
    fn wrong_image_dimensions_are_rejected() {
        let dims = [32, 32, 1, TRAIN_COUNT as i32];
        let pixels = vec![0u8; 32 * 32 * TRAIN_COUNT];
        let images = matrix("X", MX_UINT8, &dims, MI_UINT8, &pixels);
        let file = mat_file(&[images, labels_matrix(&TRAIN_LABELS, false)], false);
        let error = mat_error(load_train(&file));
        let message = error.to_string();
        assert!(
            message.starts_with("X has dimensions 32x32x1x7, expected 32x32x3xN"),
            "{message}"
        );
    }

    #[test]
    fn labels_outside_one_to_ten_are_rejected() {
        for (bad, position) in [(0u8, 2usize), (11, 5)] {
            let mut labels = TRAIN_LABELS;
            labels[position] = bad;
            let elements = [images_matrix(0, TRAIN_COUNT), labels_matrix(&labels, true)];
            let error = mat_error(load_train(&mat_file(&elements, false)));
            let message = error.to_string();
            let MatError::InvalidLabel { index, label } = error else {
                panic!("expected an invalid label, got {message}");
            };
            assert_eq!(index, position);
            assert_eq!(label, f64::from(bad));
            assert!(
                message.starts_with(&format!(
                    "label {bad} at position {position} is not in 1..10"
                )),
                "{message}"
            );
        }
    }

    #[test]
    fn fractional_label_is_rejected() {
        let data: Vec<u8> = [1.0f64, 2.5, 3.0]
            .iter()
            .flat_map(|label| label.to_le_bytes())
            .collect();
        let labels = matrix("y", MX_DOUBLE, &[3, 1], MI_DOUBLE, &data);
        let file = mat_file(&[images_matrix(0, 3), labels], false);
        let error = mat_error(load_train(&file));
        assert!(
            matches!(error, MatError::InvalidLabel { index: 1, label } if label == 2.5),
            "{error}"
        );
    }

    #[test]
    fn missing_variable_is_rejected() {
        let file = mat_file(&[note_matrix(), images_matrix(0, TRAIN_COUNT)], true);
        let error = mat_error(load_train(&file));
        assert!(
            matches!(error, MatError::MissingVariable { name: "y" }),
            "{error}"
        );
    }

    #[test]
    fn duplicate_variable_is_rejected() {
        let elements = [
            images_matrix(0, TRAIN_COUNT),
            labels_matrix(&TRAIN_LABELS, false),
            labels_matrix(&TRAIN_LABELS, true),
        ];
        let error = mat_error(load_train(&mat_file(&elements, false)));
        assert!(
            matches!(error, MatError::DuplicateVariable { name: "y" }),
            "{error}"
        );
    }

    #[test]
    fn count_mismatch_is_rejected() {
        let elements = [
            images_matrix(0, TRAIN_COUNT),
            labels_matrix(&TRAIN_LABELS[..6], false),
        ];
        let error = mat_error(load_train(&mat_file(&elements, false)));
        assert!(
            matches!(
                error,
                MatError::CountMismatch {
                    images: 7,
                    labels: 6
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn double_images_are_rejected() {
        let dims = [32, 32, 3, 1];
        let pixels: Vec<u8> = (0..3072).flat_map(|_| 0.5f64.to_le_bytes()).collect();
        let images = matrix("X", MX_DOUBLE, &dims, MI_DOUBLE, &pixels);
        let file = mat_file(&[images, labels_matrix(&[1], false)], false);
        let error = mat_error(load_train(&file));
        let message = error.to_string();
        assert!(
            message.starts_with("X has class double, expected uint8"),
            "{message}"
        );
    }

    #[test]
    fn complex_images_are_rejected() {
        let pixels = column_major_pixels(0, 1);
        let flags = u32::from(MX_UINT8) | COMPLEX_FLAG;
        let images = matrix_with_flags("X", flags, &[32, 32, 3], MI_UINT8, &pixels);
        let file = mat_file(&[images, labels_matrix(&[1], false)], false);
        let error = mat_error(load_train(&file));
        assert!(matches!(error, MatError::Complex { name: "X" }), "{error}");
    }

    #[test]
    fn char_labels_are_rejected() {
        let labels = matrix("y", MX_CHAR, &[1, 1], MI_UINT16, &[b'1', 0]);
        let file = mat_file(&[images_matrix(0, 1), labels], false);
        let error = mat_error(load_train(&file));
        assert!(
            matches!(error, MatError::WrongClass { name: "y", .. }),
            "{error}"
        );
    }

    #[test]
    fn other_integer_classes_load() {
        // y as int16 and int32, X stored as miUINT16 although its class is uint8.
        let pixels: Vec<u8> = column_major_pixels(0, 2)
            .iter()
            .flat_map(|&p| u16::from(p).to_le_bytes())
            .collect();
        let images = matrix("X", MX_UINT8, &[32, 32, 3, 2], MI_UINT16, &pixels);
        let int16: Vec<u8> = [10i16, 4].iter().flat_map(|l| l.to_le_bytes()).collect();
        let int32: Vec<u8> = [7i32, 10, 1].iter().flat_map(|l| l.to_le_bytes()).collect();
        let train = mat_file(
            &[images, matrix("y", MX_INT16, &[2, 1], MI_INT16, &int16)],
            false,
        );
        let test = mat_file(
            &[
                images_matrix(0, 3),
                matrix("y", MX_INT32, &[1, 3], MI_INT32, &int32),
            ],
            true,
        );
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TRAIN_FILE), train).unwrap();
        fs::write(dir.path().join(TEST_FILE), test).unwrap();

        let svhn = load_svhn(dir.path()).unwrap();
        assert_eq!(labels_of(&svhn.train), [0, 4]);
        assert_eq!(labels_of(&svhn.test), [7, 0, 1]);
        assert_eq!(svhn.train.images.size(), [2, 3, 32, 32]);
    }

    #[test]
    fn wide_pixel_out_of_range_is_rejected() {
        let mut values: Vec<u16> = column_major_pixels(0, 1)
            .iter()
            .map(|&p| u16::from(p))
            .collect();
        values[40] = 300;
        let pixels: Vec<u8> = values.iter().flat_map(|p| p.to_le_bytes()).collect();
        let images = matrix("X", MX_UINT8, &[32, 32, 3], MI_UINT16, &pixels);
        let file = mat_file(&[images, labels_matrix(&[1], false)], false);
        let error = mat_error(load_train(&file));
        assert!(
            matches!(error, MatError::InvalidPixel { index: 40, value } if value == 300.0),
            "{error}"
        );
    }

    #[test]
    fn real_part_length_must_match_dimensions() {
        let pixels = column_major_pixels(0, 1);
        let images = matrix("X", MX_UINT8, &[32, 32, 3, 2], MI_UINT8, &pixels);
        let file = mat_file(&[images, labels_matrix(&[1, 2], false)], false);
        let error = mat_error(load_train(&file));
        let message = error.to_string();
        assert!(matches!(error, MatError::InvalidElement { .. }), "{error}");
        assert!(message.contains("3072 bytes"), "{message}");
        assert!(message.contains("need 6144"), "{message}");
    }

    #[test]
    fn empty_training_set_is_rejected() {
        let images = matrix("X", MX_UINT8, &[32, 32, 3, 0], MI_UINT8, &[]);
        let labels = matrix("y", MX_DOUBLE, &[0, 1], MI_UINT8, &[]);
        let error = load_train(&mat_file(&[images, labels], false));
        assert!(
            matches!(error, DataError::EmptyTrainingSet { .. }),
            "{error}"
        );
    }

    #[test]
    fn hdf5_files_are_rejected() {
        // MATLAB's -v7.3 files: a 512-byte user block with a MAT-style
        // header, then the HDF5 signature.
        let mut version_7_3 = header(VERSION_7_3, b"IM");
        version_7_3.resize(HDF5_USER_BLOCK_LEN, 0);
        version_7_3.extend_from_slice(HDF5_SIGNATURE);
        version_7_3.extend_from_slice(&[0; 64]);
        let mut plain = HDF5_SIGNATURE.to_vec();
        plain.extend_from_slice(&[0; 200]);
        for file in [version_7_3, plain] {
            let error = load_train(&file);
            let message = error.to_string();
            assert!(matches!(mat_error(error), MatError::Hdf5), "{message}");
            assert!(message.contains("7.3 (HDF5)"), "{message}");
            assert!(message.contains("not supported"), "{message}");
        }
    }

    #[test]
    fn bad_headers_are_rejected() {
        let mut big_endian = header(VERSION_5, b"MI");
        big_endian[124..126].copy_from_slice(&VERSION_5.to_be_bytes());
        let error = mat_error(load_train(&big_endian));
        assert!(matches!(error, MatError::BigEndian), "{error}");

        let error = mat_error(load_train(&header(0x0101, b"IM")));
        assert!(
            matches!(error, MatError::UnsupportedVersion { version: 0x0101 }),
            "{error}"
        );
        assert!(error.to_string().contains("0x0101"), "{error}");

        let error = mat_error(load_train(&header(VERSION_5, b"XY")));
        assert!(matches!(error, MatError::InvalidEndian { .. }), "{error}");

        let error = mat_error(load_train(&header(VERSION_5, b"IM")[..100]));
        assert!(
            matches!(error, MatError::HeaderTooShort { len: 100 }),
            "{error}"
        );
    }

    #[test]
    fn header_only_file_has_no_variables() {
        let error = mat_error(load_train(&header(VERSION_5, b"IM")));
        assert!(
            matches!(error, MatError::MissingVariable { name: "X" }),
            "{error}"
        );
    }

    #[test]
    fn svhn_cnn_trains_on_generated_files() {
        let dir = tempfile::tempdir().unwrap();
        write_svhn(dir.path(), true);
        let svhn = load_svhn(dir.path()).unwrap();

        let model = Model::new(ModelKind::SvhnCnn, Device::Cpu, 3);
        assert_eq!(model.parameter_count(), 313_546);
        assert_eq!(model.flat_parameters().len(), 313_546);
        let config = SgdConfig {
            learning_rate: 0.01,
            lr_decay: 0.0,
            batch_size: 4,
            momentum: 0.0,
        };
        let mut trainer = LocalTrainer::new(&model, config).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let before = model.flat_parameters();
        for epoch in 0..3 {
            let loss = trainer.train_epoch(&model, &svhn.train, &mut rng).unwrap();
            assert!(loss.is_finite(), "epoch {epoch}: loss {loss}");
        }
        assert_ne!(model.flat_parameters(), before, "training changed nothing");
        let output = model.forward_t(&svhn.test.images, false);
        assert_eq!(output.size(), [3, 10]);
    }

    #[test]
    fn missing_files_without_download_fail() {
        let dir = tempfile::tempdir().unwrap();
        let error = ensure_svhn(dir.path(), false).unwrap_err();
        let message = error.to_string();
        let DataError::Missing { names, .. } = error else {
            panic!("expected a missing-file error, got {message}");
        };
        assert_eq!(names, [TRAIN_FILE, TEST_FILE]);
        assert!(message.starts_with("SVHN files not found in "), "{message}");
        assert!(
            message.contains("looked for train_32x32.mat, test_32x32.mat;"),
            "{message}"
        );
        assert!(message.contains(SVHN_URL), "{message}");
        assert!(message.contains("--download"), "{message}");
        assert!(message.contains("--data-dir"), "{message}");
    }

    #[test]
    fn one_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TRAIN_FILE), train_file(false)).unwrap();
        let error = load_svhn(dir.path()).unwrap_err();
        let DataError::Missing { names, .. } = error else {
            panic!("expected a missing-file error, got {error}");
        };
        assert_eq!(names, [TEST_FILE]);
    }

    #[test]
    fn present_files_need_no_download() {
        let dir = tempfile::tempdir().unwrap();
        write_svhn(dir.path(), false);
        // With no mirrors, success shows that nothing was fetched.
        let offline = DataSource {
            mirrors: &[],
            ..SVHN_SOURCE
        };
        ensure_files(dir.path(), true, &offline, &test_agent()).unwrap();
        ensure_svhn(dir.path(), false).unwrap();
    }

    fn md5_hex(bytes: &[u8]) -> String {
        Checksum::Md5("").compute(bytes)
    }

    /// Serves the generated files on loopback under `/housenumbers/`.
    fn serve_generated() -> (String, Vec<u8>, Vec<u8>) {
        let train = train_file(true);
        let test = test_file(true);
        let mut served = HashMap::new();
        served.insert(format!("/housenumbers/{TRAIN_FILE}"), train.clone());
        served.insert(format!("/housenumbers/{TEST_FILE}"), test.clone());
        let address = serve(served);
        (format!("http://{address}/housenumbers/"), train, test)
    }

    #[test]
    fn download_checks_md5_and_loads() {
        let (mirror, train, test) = serve_generated();
        let (train_md5, test_md5) = (md5_hex(&train), md5_hex(&test));
        let files = [
            FileSpec {
                checksum: Checksum::Md5(&train_md5),
                ..SVHN_FILES[0]
            },
            FileSpec {
                checksum: Checksum::Md5(&test_md5),
                ..SVHN_FILES[1]
            },
        ];
        let mirrors = [mirror.as_str()];
        let source = DataSource {
            mirrors: &mirrors,
            files: &files,
            ..SVHN_SOURCE
        };

        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("svhn");
        ensure_files(&target, true, &source, &test_agent()).unwrap();
        assert_eq!(fs::read(target.join(TRAIN_FILE)).unwrap(), train);
        assert_eq!(fs::read(target.join(TEST_FILE)).unwrap(), test);
        let mut leftovers: Vec<_> = fs::read_dir(&target)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        leftovers.sort();
        assert_eq!(
            leftovers,
            [TEST_FILE, TRAIN_FILE],
            "temporary files must be renamed away"
        );
        assert_eq!(load_svhn(&target).unwrap().train.len(), TRAIN_COUNT);
    }

    #[test]
    fn download_md5_mismatch_names_both_hashes() {
        let (mirror, train, _) = serve_generated();
        let expected = md5_hex(b"published contents");
        let files = [FileSpec {
            checksum: Checksum::Md5(&expected),
            ..SVHN_FILES[0]
        }];
        let mirrors = [mirror.as_str()];
        let source = DataSource {
            mirrors: &mirrors,
            files: &files,
            ..SVHN_SOURCE
        };

        let dir = tempfile::tempdir().unwrap();
        let error = ensure_files(dir.path(), true, &source, &test_agent()).unwrap_err();
        let message = error.to_string();
        let DataError::Download { failures, .. } = error else {
            panic!("expected a download error, got {message}");
        };
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].url, format!("{mirror}{TRAIN_FILE}"));
        let MirrorError::ChecksumMismatch {
            algorithm,
            expected: reported,
            actual,
        } = &failures[0].error
        else {
            panic!("expected a checksum mismatch, got {}", failures[0].error);
        };
        assert_eq!(*algorithm, "MD5");
        assert_eq!(reported, &expected);
        assert_eq!(actual, &md5_hex(&train));
        assert!(message.contains("MD5 mismatch"), "{message}");
        assert!(
            !dir.path().join(TRAIN_FILE).exists(),
            "a rejected download must not be written"
        );
    }

    #[test]
    fn download_larger_than_limit_is_rejected() {
        let (mirror, train, _) = serve_generated();
        let train_md5 = md5_hex(&train);
        let files = [FileSpec {
            name: TRAIN_FILE,
            checksum: Checksum::Md5(&train_md5),
            max_download_bytes: 1000,
        }];
        let mirrors = [mirror.as_str()];
        let source = DataSource {
            mirrors: &mirrors,
            files: &files,
            ..SVHN_SOURCE
        };

        let dir = tempfile::tempdir().unwrap();
        let error = ensure_files(dir.path(), true, &source, &test_agent()).unwrap_err();
        let DataError::Download { failures, .. } = &error else {
            panic!("expected a download error, got {error}");
        };
        assert!(
            matches!(failures[0].error, MirrorError::Request(_)),
            "{error}"
        );
        assert!(!dir.path().join(TRAIN_FILE).exists());
    }

    #[test]
    fn element_writer_uses_small_form() {
        // Guards the test writer itself: three bytes fit one small element.
        let small = element(MI_UINT8, &[1, 2, 3]);
        assert_eq!(small.len(), 8);
        let tag = Tag::parse(array(&small[..8]));
        assert_eq!(tag.data_type, MI_UINT8);
        assert_eq!(tag.len, 3);
        assert_eq!(tag.small, Some([1, 2, 3, 0]));
    }
}
