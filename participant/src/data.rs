//! MNIST loading: IDX parsing and validation, normalisation, and the
//! checksummed download from public mirrors. Also the choice of dataset
//! ([`DatasetKind`]) and the download helpers that SVHN shares.
//!
//! A data folder contains the four MNIST files, each either gzip-compressed as
//! `NAME.gz` or uncompressed as `NAME`. [`ensure_mnist`] writes downloaded
//! files uncompressed, so later loads skip decompression.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::read::MultiGzDecoder;
use md5::Md5;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use tracing::{debug, info, warn};

use crate::svhn::{self, MatError};

/// Height and width of an MNIST image, in pixels.
pub const IMAGE_SIDE: usize = 28;

/// Number of MNIST classes (the digits 0 to 9).
pub const CLASS_COUNT: usize = 10;

/// Base URLs that serve the MNIST files as `NAME.gz`, tried in order.
pub const MNIST_MIRRORS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// The four MNIST files with the SHA-256 of their uncompressed contents.
const MNIST_FILES: [FileSpec<'static>; 4] = [
    FileSpec::mnist(
        TRAIN_IMAGES,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    FileSpec::mnist(
        TRAIN_LABELS,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    FileSpec::mnist(
        TEST_IMAGES,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    FileSpec::mnist(
        TEST_LABELS,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
];

/// Source of the MNIST files and how they are stored.
const MNIST_SOURCE: DataSource<'static> = DataSource {
    dataset: "MNIST",
    url: MNIST_MIRRORS[0],
    mirrors: &MNIST_MIRRORS,
    files: &MNIST_FILES,
    gzip: true,
};

const IMAGE_MAGIC: u32 = 2051;
const LABEL_MAGIC: u32 = 2049;
const IMAGE_HEADER_LEN: usize = 16;
const LABEL_HEADER_LEN: usize = 8;

/// Maximum size of a downloaded (compressed) body. The largest MNIST file is about 9.9 MB compressed.
const MAX_DOWNLOAD_BYTES: u64 = 32 << 20;
/// Maximum size of a decompressed download. The largest MNIST file is 47,040,016 bytes.
const MAX_RAW_BYTES: u64 = 64 << 20;

/// Errors from finding, reading, validating or downloading MNIST or SVHN files.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Some of the dataset's files are missing (for MNIST: in neither the
    /// gzip nor the raw form).
    #[error(
        "{dataset} files not found in {}: looked for {}; pass --download to fetch them from {url} or --data-dir to point at a folder that contains them",
        dir.display(),
        describe_candidates(names, *gzip)
    )]
    Missing {
        /// Folder that was searched.
        dir: PathBuf,
        /// Base names (without `.gz`) of the files not found.
        names: Vec<String>,
        /// Dataset name, such as "MNIST".
        dataset: &'static str,
        /// Base URL that --download fetches the files from.
        url: &'static str,
        /// Whether `NAME.gz` was accepted in place of `NAME`.
        gzip: bool,
    },

    /// A file exists but could not be read.
    #[error("failed to read {}: {source}", path.display())]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error.
        source: io::Error,
    },

    /// A `.gz` file is not valid gzip.
    #[error(
        "failed to decompress {}: {source}; delete the file and fetch it again with --download",
        path.display()
    )]
    Decompress {
        /// File that failed.
        path: PathBuf,
        /// Underlying decoder error.
        source: io::Error,
    },

    /// A file is shorter than its IDX header.
    #[error(
        "{} is {len} bytes long, shorter than the {header_len}-byte IDX header; the file is truncated or not an IDX file",
        path.display()
    )]
    TooShort {
        /// File that failed.
        path: PathBuf,
        /// Length of the (uncompressed) contents in bytes.
        len: usize,
        /// Expected header length in bytes.
        header_len: usize,
    },

    /// The first four bytes are not the IDX magic number for the expected kind of file.
    #[error(
        "invalid magic number {found} in {}: expected {expected} for an IDX {kind} file",
        path.display()
    )]
    InvalidMagic {
        /// File that failed.
        path: PathBuf,
        /// Magic number read from the file.
        found: u32,
        /// Magic number for this kind of file.
        expected: u32,
        /// "image" or "label".
        kind: &'static str,
    },

    /// An image file declares images that are not 28x28.
    #[error(
        "invalid image size {rows}x{cols} in {}: expected {IMAGE_SIDE}x{IMAGE_SIDE} MNIST images",
        path.display()
    )]
    InvalidImageSize {
        /// File that failed.
        path: PathBuf,
        /// Rows declared in the header.
        rows: u32,
        /// Columns declared in the header.
        cols: u32,
    },

    /// The file length disagrees with the item count in its header.
    #[error(
        "invalid length of {}: the header declares {expected} bytes but the file has {actual}; the file is truncated or corrupt",
        path.display()
    )]
    LengthMismatch {
        /// File that failed.
        path: PathBuf,
        /// Length implied by the header, in bytes.
        expected: u64,
        /// Actual (uncompressed) length, in bytes.
        actual: u64,
    },

    /// The image and label files of one split hold different numbers of items.
    #[error(
        "{images} images in {} but {labels} labels in {}: the counts must be equal",
        images_path.display(),
        labels_path.display()
    )]
    CountMismatch {
        /// Image file of the split.
        images_path: PathBuf,
        /// Number of images.
        images: usize,
        /// Label file of the split.
        labels_path: PathBuf,
        /// Number of labels.
        labels: usize,
    },

    /// A label is not a digit from 0 to 9.
    #[error(
        "invalid label {label} at index {index} in {}: MNIST labels are 0 to 9",
        path.display()
    )]
    InvalidLabel {
        /// File that failed.
        path: PathBuf,
        /// Position of the label in the file.
        index: usize,
        /// Value found.
        label: u8,
    },

    /// The training image file contains no images, so no normalisation can be computed.
    #[error("no images in {}: the training set must not be empty", path.display())]
    EmptyTrainingSet {
        /// Training image file.
        path: PathBuf,
    },

    /// The uncompressed contents of a file do not have the published checksum.
    #[error(
        "{algorithm} mismatch for {}: expected {expected}, got {actual}; delete the file and fetch it again with --download",
        path.display()
    )]
    ChecksumMismatch {
        /// File that failed.
        path: PathBuf,
        /// Hash function: "SHA-256" or "MD5".
        algorithm: &'static str,
        /// Published checksum, in hex.
        expected: String,
        /// Checksum of the file's uncompressed contents, in hex.
        actual: String,
    },

    /// An SVHN file is not a valid MAT-file or does not hold the SVHN
    /// variables in the expected shape.
    #[error("invalid SVHN file {}: {source}", path.display())]
    InvalidMat {
        /// File that failed.
        path: PathBuf,
        /// Description of the problem.
        source: MatError,
    },

    /// The data folder or a downloaded file could not be written.
    #[error("failed to write {}: {source}", path.display())]
    Write {
        /// Path that failed.
        path: PathBuf,
        /// Underlying I/O error.
        source: io::Error,
    },

    /// Every mirror failed for one file.
    #[error(
        "failed to download {name} from every mirror: {}",
        describe_failures(failures)
    )]
    Download {
        /// Base name of the file.
        name: String,
        /// One entry per mirror, in the order tried.
        failures: Vec<MirrorFailure>,
    },
}

/// Failure of one mirror to provide one file.
#[derive(Debug)]
pub struct MirrorFailure {
    /// Full URL requested.
    pub url: String,
    /// Cause of the failure.
    pub error: MirrorError,
}

/// Failure of a single download attempt.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The request failed: connection, HTTP status, timeout or body size limit.
    #[error("request failed: {0}")]
    Request(#[from] ureq::Error),
    /// The body was not valid gzip or exceeded the size limit when decompressed.
    #[error("failed to decompress the body: {0}")]
    Decompress(io::Error),
    /// The decompressed body does not have the published checksum.
    #[error("{algorithm} mismatch: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// Hash function: "SHA-256" or "MD5".
        algorithm: &'static str,
        /// Published checksum, in hex.
        expected: String,
        /// Checksum of the decompressed body, in hex.
        actual: String,
    },
}

fn describe_candidates(names: &[String], gzip: bool) -> String {
    let candidates: Vec<String> = if gzip {
        names.iter().map(|n| format!("{n}.gz or {n}")).collect()
    } else {
        names.to_vec()
    };
    candidates.join(", ")
}

fn describe_failures(failures: &[MirrorFailure]) -> String {
    let mut text = String::new();
    for failure in failures {
        let _ = write!(text, "\n  {}: {}", failure.url, failure.error);
    }
    text
}

/// Images and labels of one split, kept as contiguous tensors so that a
/// mini-batch is one `index_select`.
#[derive(Debug)]
pub struct Dataset {
    /// Normalised pixels, `[N, C, H, W]` f32: `[N, 1, 28, 28]` for MNIST and
    /// `[N, 3, 32, 32]` for SVHN.
    pub images: Tensor,
    /// Class indices 0 to 9, `[N]` i64.
    pub labels: Tensor,
}

impl Dataset {
    /// Returns the number of examples.
    pub fn len(&self) -> usize {
        let count = self.labels.size1().expect("labels must be a 1-D tensor");
        usize::try_from(count).expect("tensor sizes are non-negative")
    }

    /// Returns true when the dataset contains no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the examples at `indices`, in that order, into a new dataset on
    /// the same device.
    ///
    /// # Panics
    ///
    /// Panics if an index is not less than [`Dataset::len`].
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let len = self.len();
        let positions: Vec<i64> = indices
            .iter()
            .map(|&index| {
                assert!(
                    index < len,
                    "subset index {index} is out of range for a dataset of {len} examples"
                );
                index as i64
            })
            .collect();
        let positions = Tensor::from_slice(&positions).to_device(self.labels.device());
        Dataset {
            images: self.images.index_select(0, &positions),
            labels: self.labels.index_select(0, &positions),
        }
    }

    /// Returns the class of every example, in order.
    pub fn class_labels(&self) -> Vec<u8> {
        let labels = Vec::<i64>::try_from(&self.labels.to_device(Device::Cpu))
            .expect("labels are an i64 tensor");
        labels
            .into_iter()
            .map(|label| u8::try_from(label).expect("labels are class indices below 256"))
            .collect()
    }

    /// Returns a dataset that shares this one's storage, for another thread
    /// to read.
    pub fn shallow_clone(&self) -> Dataset {
        Dataset {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
        }
    }

    /// Copies the dataset to `device`.
    pub fn to_device(&self, device: Device) -> Dataset {
        Dataset {
            images: self.images.to_device(device),
            labels: self.labels.to_device(device),
        }
    }
}

/// The training and test splits of a dataset on the CPU, both normalised
/// with the training set's pixel mean and standard deviation. MNIST has
/// 60,000 training and 10,000 test images, SVHN 73,257 and 26,032.
#[derive(Debug)]
pub struct Splits {
    /// Training split.
    pub train: Dataset,
    /// Test split.
    pub test: Dataset,
}

/// Loads and validates the four MNIST files in `dir`.
///
/// Each file may be `NAME` (raw IDX) or `NAME.gz` (gzip); the raw form is
/// preferred when both exist. Checks the IDX magic numbers, the 28x28 image
/// size, that each file's length matches its header, that images and labels
/// agree in count and that labels are below 10. Checksums are not checked, so
/// any valid IDX files load; see [`verify_checksums`].
///
/// Pixels are scaled to [0, 1], then shifted and scaled by the mean and
/// population standard deviation of the training pixels (about 0.1307 and
/// 0.3081 for the published MNIST). The test split uses the same two values.
pub fn load_mnist(dir: &Path) -> Result<Splits, DataError> {
    require_files(dir, &MNIST_SOURCE)?;
    let train = RawSplit::read(dir, TRAIN_IMAGES, TRAIN_LABELS)?;
    let test = RawSplit::read(dir, TEST_IMAGES, TEST_LABELS)?;
    if train.count == 0 {
        return Err(DataError::EmptyTrainingSet {
            path: train.images_path,
        });
    }

    let stats = PixelStats::of(train.pixels());
    debug!(
        mean = stats.mean,
        std = stats.std,
        "normalising MNIST with the training pixel statistics"
    );
    Ok(Splits {
        train: train.to_dataset(stats),
        test: test.to_dataset(stats),
    })
}

/// Makes sure the four MNIST files are in `dir`, downloading the missing ones
/// when `download` is true.
///
/// Returns at once when all four are present, whatever their contents. A
/// download tries each of [`MNIST_MIRRORS`] in order, checks the SHA-256 of
/// the decompressed file against the published value, and writes the raw IDX
/// bytes to `dir/NAME` through a temporary file and a rename. After the
/// downloads all four files are checked with [`verify_checksums`], so a folder
/// that mixes other local files with downloaded ones is rejected.
pub fn ensure_mnist(dir: &Path, download: bool) -> Result<(), DataError> {
    let agent = download_agent(Duration::from_secs(300));
    ensure_files(dir, download, &MNIST_SOURCE, &agent)
}

/// Builds the HTTP agent of a download, which may take `body_timeout` to
/// receive one file.
pub(crate) fn download_agent(body_timeout: Duration) -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(body_timeout))
            .build(),
    )
}

/// Checks that the uncompressed contents of each of the four MNIST files in
/// `dir` have the published SHA-256.
pub fn verify_checksums(dir: &Path) -> Result<(), DataError> {
    verify_files(dir, &MNIST_SOURCE)
}

/// Image dataset that a run trains on.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// MNIST handwritten digits: 28x28 grey-scale images.
    Mnist,
    /// SVHN cropped house-number digits: 32x32 RGB images.
    Svhn,
}

impl DatasetKind {
    /// Returns the lowercase name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::Svhn => "svhn",
        }
    }

    /// Returns the number of colour channels of an image.
    pub fn channels(self) -> usize {
        match self {
            DatasetKind::Mnist => 1,
            DatasetKind::Svhn => svhn::CHANNELS,
        }
    }

    /// Returns the height and width of an image, in pixels.
    pub fn image_side(self) -> usize {
        match self {
            DatasetKind::Mnist => IMAGE_SIDE,
            DatasetKind::Svhn => svhn::IMAGE_SIDE,
        }
    }

    /// Returns the data folder used when `--data-dir` is not given.
    pub fn default_data_dir(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "data/mnist",
            DatasetKind::Svhn => "data/svhn",
        }
    }

    /// Makes sure the dataset's files are in `dir`, downloading the missing
    /// ones when `download` is true: [`ensure_mnist`] or [`svhn::ensure_svhn`].
    pub fn ensure(self, dir: &Path, download: bool) -> Result<(), DataError> {
        match self {
            DatasetKind::Mnist => ensure_mnist(dir, download),
            DatasetKind::Svhn => svhn::ensure_svhn(dir, download),
        }
    }

    /// Loads and normalises both splits from `dir`: [`load_mnist`] or
    /// [`svhn::load_svhn`].
    pub fn load(self, dir: &Path) -> Result<Splits, DataError> {
        match self {
            DatasetKind::Mnist => load_mnist(dir),
            DatasetKind::Svhn => svhn::load_svhn(dir),
        }
    }
}

/// Expected checksum of a data file's uncompressed contents, in lowercase hex.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Checksum<'a> {
    /// SHA-256, which the MNIST files are checked with.
    Sha256(&'a str),
    /// MD5, the checksum that torchvision records for the SVHN files.
    Md5(&'a str),
}

impl<'a> Checksum<'a> {
    fn algorithm(self) -> &'static str {
        match self {
            Checksum::Sha256(_) => "SHA-256",
            Checksum::Md5(_) => "MD5",
        }
    }

    fn expected(self) -> &'a str {
        match self {
            Checksum::Sha256(hex) | Checksum::Md5(hex) => hex,
        }
    }

    /// Returns the checksum of `bytes` in lowercase hex with this algorithm.
    pub(crate) fn compute(self, bytes: &[u8]) -> String {
        match self {
            Checksum::Sha256(_) => hex(&Sha256::digest(bytes)),
            Checksum::Md5(_) => hex(&Md5::digest(bytes)),
        }
    }
}

/// Name, expected checksum and download size limit of one data file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FileSpec<'a> {
    /// File name in the data folder, without `.gz`.
    pub(crate) name: &'a str,
    /// Published checksum of the uncompressed contents.
    pub(crate) checksum: Checksum<'a>,
    /// Maximum size of the downloaded (possibly compressed) body, in bytes.
    pub(crate) max_download_bytes: u64,
}

impl<'a> FileSpec<'a> {
    /// Describes an MNIST file with its SHA-256.
    const fn mnist(name: &'a str, sha256: &'a str) -> FileSpec<'a> {
        FileSpec {
            name,
            checksum: Checksum::Sha256(sha256),
            max_download_bytes: MAX_DOWNLOAD_BYTES,
        }
    }
}

/// A dataset's files, where they are downloaded from and how they are stored.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DataSource<'a> {
    /// Dataset name in messages, such as "MNIST".
    pub(crate) dataset: &'static str,
    /// Base URL named in the error for missing files.
    pub(crate) url: &'static str,
    /// Base URLs tried in order. A file's URL is the base followed by its
    /// name, and by `.gz` when `gzip` is true.
    pub(crate) mirrors: &'a [&'a str],
    /// Every file of the dataset.
    pub(crate) files: &'a [FileSpec<'a>],
    /// Whether the mirrors serve `NAME.gz` and the folder may contain
    /// `NAME.gz` in place of `NAME`.
    pub(crate) gzip: bool,
}

/// Looks for `dir/NAME`, then, if `gzip` is true, `dir/NAME.gz`.
fn find_file(dir: &Path, name: &str, gzip: bool) -> Option<PathBuf> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Some(raw);
    }
    if !gzip {
        return None;
    }
    let compressed = dir.join(format!("{name}.gz"));
    compressed.is_file().then_some(compressed)
}

fn missing_files<'a>(dir: &Path, source: &DataSource<'a>) -> Vec<&'a FileSpec<'a>> {
    source
        .files
        .iter()
        .filter(|file| find_file(dir, file.name, source.gzip).is_none())
        .collect()
}

fn missing_error(dir: &Path, source: &DataSource<'_>, names: Vec<String>) -> DataError {
    DataError::Missing {
        dir: dir.to_path_buf(),
        names,
        dataset: source.dataset,
        url: source.url,
        gzip: source.gzip,
    }
}

/// Fails with [`DataError::Missing`], naming every missing file, unless all
/// of the source's files are in `dir`.
pub(crate) fn require_files(dir: &Path, source: &DataSource<'_>) -> Result<(), DataError> {
    let missing = missing_files(dir, source);
    if missing.is_empty() {
        return Ok(());
    }
    let names = missing.iter().map(|file| file.name.to_string()).collect();
    Err(missing_error(dir, source, names))
}

/// Reads a data file whole, decompressing it when its name ends in `.gz`.
fn read_contents(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = fs::read(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if path.extension().is_none_or(|extension| extension != "gz") {
        return Ok(bytes);
    }

    // MNIST image files compress about 5:1, so this capacity usually avoids regrowing.
    let mut contents = Vec::with_capacity(bytes.len() * 5);
    MultiGzDecoder::new(bytes.as_slice())
        .read_to_end(&mut contents)
        .map_err(|source| DataError::Decompress {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(contents)
}

/// Finds the file `name` of `source` in `dir` and returns its path and
/// uncompressed contents.
pub(crate) fn read_file(
    dir: &Path,
    source: &DataSource<'_>,
    name: &str,
) -> Result<(PathBuf, Vec<u8>), DataError> {
    let path = find_file(dir, name, source.gzip)
        .ok_or_else(|| missing_error(dir, source, vec![name.to_string()]))?;
    let contents = read_contents(&path)?;
    Ok((path, contents))
}

fn read_u32_be(bytes: &[u8], offset: usize) -> u32 {
    let word: [u8; 4] = bytes[offset..offset + 4]
        .try_into()
        .expect("slice of length 4");
    u32::from_be_bytes(word)
}

/// Checks an IDX header and returns the item count it declares.
///
/// `item_len` is the size of one item in bytes (784 for images, 1 for labels).
fn check_idx(
    path: &Path,
    bytes: &[u8],
    magic: u32,
    kind: &'static str,
    header_len: usize,
    item_len: u64,
) -> Result<usize, DataError> {
    if bytes.len() < header_len {
        return Err(DataError::TooShort {
            path: path.to_path_buf(),
            len: bytes.len(),
            header_len,
        });
    }
    let found = read_u32_be(bytes, 0);
    if found != magic {
        return Err(DataError::InvalidMagic {
            path: path.to_path_buf(),
            found,
            expected: magic,
            kind,
        });
    }

    let count = read_u32_be(bytes, 4);
    let expected = header_len as u64 + u64::from(count) * item_len;
    let actual = bytes.len() as u64;
    if expected != actual {
        return Err(DataError::LengthMismatch {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok(count as usize)
}

fn check_images(path: &Path, bytes: &[u8]) -> Result<usize, DataError> {
    // The image size must be checked before the length, which depends on it.
    if bytes.len() >= IMAGE_HEADER_LEN && read_u32_be(bytes, 0) == IMAGE_MAGIC {
        let rows = read_u32_be(bytes, 8);
        let cols = read_u32_be(bytes, 12);
        if rows as usize != IMAGE_SIDE || cols as usize != IMAGE_SIDE {
            return Err(DataError::InvalidImageSize {
                path: path.to_path_buf(),
                rows,
                cols,
            });
        }
    }
    let image_len = (IMAGE_SIDE * IMAGE_SIDE) as u64;
    check_idx(
        path,
        bytes,
        IMAGE_MAGIC,
        "image",
        IMAGE_HEADER_LEN,
        image_len,
    )
}

fn check_labels(path: &Path, bytes: &[u8]) -> Result<usize, DataError> {
    let count = check_idx(path, bytes, LABEL_MAGIC, "label", LABEL_HEADER_LEN, 1)?;
    let labels = &bytes[LABEL_HEADER_LEN..];
    if let Some(index) = labels
        .iter()
        .position(|&label| usize::from(label) >= CLASS_COUNT)
    {
        return Err(DataError::InvalidLabel {
            path: path.to_path_buf(),
            index,
            label: labels[index],
        });
    }
    Ok(count)
}

/// One split's validated file contents, before conversion to tensors.
struct RawSplit {
    images_path: PathBuf,
    images: Vec<u8>,
    labels: Vec<u8>,
    count: usize,
}

impl RawSplit {
    fn read(dir: &Path, images_name: &str, labels_name: &str) -> Result<RawSplit, DataError> {
        let (images_path, images) = read_file(dir, &MNIST_SOURCE, images_name)?;
        let image_count = check_images(&images_path, &images)?;
        let (labels_path, labels) = read_file(dir, &MNIST_SOURCE, labels_name)?;
        let label_count = check_labels(&labels_path, &labels)?;
        if image_count != label_count {
            return Err(DataError::CountMismatch {
                images_path,
                images: image_count,
                labels_path,
                labels: label_count,
            });
        }
        Ok(RawSplit {
            images_path,
            images,
            labels,
            count: image_count,
        })
    }

    fn pixels(&self) -> &[u8] {
        &self.images[IMAGE_HEADER_LEN..]
    }

    fn to_dataset(&self, stats: PixelStats) -> Dataset {
        let side = IMAGE_SIDE as i64;
        let count = self.count as i64;
        let mut images = Tensor::from_slice(self.pixels())
            .view([count, 1, side, side])
            .to_kind(Kind::Float);
        // (x / 255 - mean) / std, in place to keep one float copy of the split.
        let _ = images.g_mul_scalar_(1.0 / (255.0 * stats.std));
        let _ = images.g_sub_scalar_(stats.mean / stats.std);

        let labels: Vec<i64> = self.labels[LABEL_HEADER_LEN..]
            .iter()
            .map(|&label| i64::from(label))
            .collect();
        Dataset {
            images,
            labels: Tensor::from_slice(&labels),
        }
    }
}

/// Mean and population standard deviation of pixels scaled to [0, 1].
#[derive(Clone, Copy, Debug)]
pub(crate) struct PixelStats {
    pub(crate) mean: f64,
    pub(crate) std: f64,
}

impl PixelStats {
    /// Computes the statistics exactly from a histogram of the byte values.
    ///
    /// When every pixel has the same value the standard deviation is 0, so 1
    /// is used instead and normalisation only shifts the pixels.
    pub(crate) fn of(pixels: &[u8]) -> PixelStats {
        let mut histogram = [0u64; 256];
        for &pixel in pixels {
            histogram[usize::from(pixel)] += 1;
        }
        let total = pixels.len() as f64;
        let scaled = |value: usize| value as f64 / 255.0;

        let mean = histogram
            .iter()
            .enumerate()
            .map(|(value, &count)| count as f64 * scaled(value))
            .sum::<f64>()
            / total;
        let variance = histogram
            .iter()
            .enumerate()
            .map(|(value, &count)| count as f64 * (scaled(value) - mean).powi(2))
            .sum::<f64>()
            / total;
        let std = variance.sqrt();
        PixelStats {
            mean,
            std: if std > 0.0 { std } else { 1.0 },
        }
    }
}

fn hex(digest: &[u8]) -> String {
    let mut hex = String::with_capacity(2 * digest.len());
    for byte in digest {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

fn verify_files(dir: &Path, source: &DataSource<'_>) -> Result<(), DataError> {
    for file in source.files {
        let (path, contents) = read_file(dir, source, file.name)?;
        let actual = file.checksum.compute(&contents);
        if actual != file.checksum.expected() {
            return Err(DataError::ChecksumMismatch {
                path,
                algorithm: file.checksum.algorithm(),
                expected: file.checksum.expected().to_string(),
                actual,
            });
        }
    }
    Ok(())
}

/// Makes sure every file of `source` is in `dir`, downloading the missing
/// ones with `agent` when `download` is true, as [`ensure_mnist`] describes.
pub(crate) fn ensure_files(
    dir: &Path,
    download: bool,
    source: &DataSource<'_>,
    agent: &ureq::Agent,
) -> Result<(), DataError> {
    let missing = missing_files(dir, source);
    if missing.is_empty() {
        return Ok(());
    }
    if !download {
        return require_files(dir, source);
    }

    fs::create_dir_all(dir).map_err(|source| DataError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for file in missing {
        download_file(dir, source, file, agent)?;
    }
    verify_files(dir, source)
}

/// Downloads one file from the first mirror that serves it with the right
/// checksum and writes it uncompressed to `dir/NAME`.
fn download_file(
    dir: &Path,
    source: &DataSource<'_>,
    file: &FileSpec<'_>,
    agent: &ureq::Agent,
) -> Result<(), DataError> {
    let dataset = source.dataset;
    let suffix = if source.gzip { ".gz" } else { "" };
    let mut failures = Vec::new();
    for mirror in source.mirrors {
        let url = format!("{mirror}{}{suffix}", file.name);
        info!(%url, dataset, file = file.name, "downloading data file");
        match fetch_verified(agent, &url, file, source.gzip) {
            Ok(contents) => {
                let path = dir.join(file.name);
                write_atomically(&path, &contents)?;
                info!(%url, dataset, path = %path.display(), bytes = contents.len(), "downloaded data file");
                return Ok(());
            }
            Err(error) => {
                warn!(%url, dataset, file = file.name, %error, "mirror failed, trying the next one");
                failures.push(MirrorFailure { url, error });
            }
        }
    }
    Err(DataError::Download {
        name: file.name.to_string(),
        failures,
    })
}

/// Fetches `url` and returns its body, decompressed when `gzip` is true and
/// the body is gzip, if it has the checksum that `file` expects.
fn fetch_verified(
    agent: &ureq::Agent,
    url: &str,
    file: &FileSpec<'_>,
    gzip: bool,
) -> Result<Vec<u8>, MirrorError> {
    let mut response = agent.get(url).call()?;
    let body = response
        .body_mut()
        .with_config()
        .limit(file.max_download_bytes)
        .read_to_vec()?;

    // A server that sends the file with `Content-Encoding: gzip` has it
    // decoded by ureq already, so only a body that is still gzip is inflated.
    let contents = if gzip && body.starts_with(&[0x1f, 0x8b]) {
        gunzip_limited(&body).map_err(MirrorError::Decompress)?
    } else {
        body
    };
    let actual = file.checksum.compute(&contents);
    if actual != file.checksum.expected() {
        return Err(MirrorError::ChecksumMismatch {
            algorithm: file.checksum.algorithm(),
            expected: file.checksum.expected().to_string(),
            actual,
        });
    }
    Ok(contents)
}

fn gunzip_limited(compressed: &[u8]) -> io::Result<Vec<u8>> {
    let mut contents = Vec::new();
    MultiGzDecoder::new(compressed)
        .take(MAX_RAW_BYTES + 1)
        .read_to_end(&mut contents)?;
    if contents.len() as u64 > MAX_RAW_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("decompressed body exceeds {MAX_RAW_BYTES} bytes"),
        ));
    }
    Ok(contents)
}

/// Writes `contents` to a temporary file beside `path`, syncs it and renames
/// it over `path`, so that readers never see a partial file.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), DataError> {
    let file_name = path
        .file_name()
        .expect("data file paths end in a file name")
        .to_string_lossy();
    let temporary = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let write_error = |source| DataError::Write {
        path: temporary.clone(),
        source,
    };

    let mut file = fs::File::create(&temporary).map_err(write_error)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    if let Err(source) = written {
        let _ = fs::remove_file(&temporary);
        return Err(write_error(source));
    }
    fs::rename(&temporary, path).map_err(|source| {
        let _ = fs::remove_file(&temporary);
        DataError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Folder with the MNIST files for tests: `DSSGD_MNIST_DIR`, or `shared/data/mnist`
/// beside the workspace.
#[cfg(test)]
pub(crate) fn test_mnist_dir() -> PathBuf {
    match std::env::var_os("DSSGD_MNIST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/mnist"
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::Arc;
    use std::thread;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    /// Returns a source like MNIST's (gzip files) with other mirrors and files.
    fn gzip_source<'a>(mirrors: &'a [&'a str], files: &'a [FileSpec<'a>]) -> DataSource<'a> {
        DataSource {
            mirrors,
            files,
            ..MNIST_SOURCE
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn image_file(count: u32, rows: u32, cols: u32, pixel: u8) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&IMAGE_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&count.to_be_bytes());
        bytes.extend_from_slice(&rows.to_be_bytes());
        bytes.extend_from_slice(&cols.to_be_bytes());
        let pixels = count as usize * rows as usize * cols as usize;
        bytes.extend(std::iter::repeat_n(pixel, pixels));
        bytes
    }

    fn label_file(labels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&LABEL_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        bytes.extend_from_slice(labels);
        bytes
    }

    /// Writes a small valid MNIST-shaped folder: 3 training and 2 test images.
    fn write_small_set(dir: &Path) {
        let side = IMAGE_SIDE as u32;
        let mut train_images = image_file(3, side, side, 0);
        // Half the training pixels 255, half 0: mean 0.5, std 0.5.
        let pixels = train_images.len() - IMAGE_HEADER_LEN;
        for byte in &mut train_images[IMAGE_HEADER_LEN..IMAGE_HEADER_LEN + pixels / 2] {
            *byte = 255;
        }
        fs::write(dir.join(format!("{TRAIN_IMAGES}.gz")), gzip(&train_images)).unwrap();
        fs::write(dir.join(TRAIN_LABELS), label_file(&[1, 2, 3])).unwrap();
        fs::write(dir.join(TEST_IMAGES), image_file(2, side, side, 255)).unwrap();
        fs::write(
            dir.join(format!("{TEST_LABELS}.gz")),
            gzip(&label_file(&[9, 0])),
        )
        .unwrap();
    }

    #[test]
    fn small_set_loads_and_normalises() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        let mnist = load_mnist(dir.path()).unwrap();

        assert_eq!(mnist.train.len(), 3);
        assert_eq!(mnist.test.len(), 2);
        assert_eq!(mnist.train.images.size(), [3, 1, 28, 28]);
        assert_eq!(mnist.train.images.kind(), Kind::Float);
        assert_eq!(mnist.train.labels.kind(), Kind::Int64);
        assert_eq!(Vec::<i64>::try_from(&mnist.test.labels).unwrap(), [9, 0]);
        let train_mean = mnist.train.images.mean(Kind::Double).double_value(&[]);
        assert!(train_mean.abs() < 1e-5, "train mean {train_mean}");
        // Test pixels are all 255, that is (1 - 0.5) / 0.5 = 1.
        let test_min = mnist.test.images.min().double_value(&[]);
        assert!((test_min - 1.0).abs() < 1e-5, "test minimum {test_min}");
    }

    #[test]
    fn missing_files_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TRAIN_LABELS), label_file(&[1])).unwrap();
        let error = load_mnist(dir.path()).unwrap_err();
        let DataError::Missing { names, .. } = &error else {
            panic!("expected a missing-file error, got {error}");
        };
        assert_eq!(names, &[TRAIN_IMAGES, TEST_IMAGES, TEST_LABELS]);
        let message = error.to_string();
        assert!(
            message.contains("train-images-idx3-ubyte.gz or train-images-idx3-ubyte"),
            "{message}"
        );
        assert!(message.contains("--download"), "{message}");
        assert!(message.contains("--data-dir"), "{message}");
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        let mut labels = label_file(&[1, 2, 3]);
        labels[..4].copy_from_slice(&1234u32.to_be_bytes());
        fs::write(dir.path().join(TRAIN_LABELS), labels).unwrap();

        let error = load_mnist(dir.path()).unwrap_err();
        assert!(
            matches!(
                error,
                DataError::InvalidMagic {
                    found: 1234,
                    expected: 2049,
                    ..
                }
            ),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with("invalid magic number 1234 in "),
            "{message}"
        );
        assert!(message.contains(TRAIN_LABELS), "{message}");
    }

    #[test]
    fn wrong_image_size_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        fs::write(dir.path().join(TEST_IMAGES), image_file(2, 32, 32, 0)).unwrap();
        let error = load_mnist(dir.path()).unwrap_err();
        assert!(
            matches!(
                error,
                DataError::InvalidImageSize {
                    rows: 32,
                    cols: 32,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn truncated_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        let side = IMAGE_SIDE as u32;
        let mut images = image_file(2, side, side, 0);
        images.truncate(images.len() - 1);
        fs::write(dir.path().join(TEST_IMAGES), images).unwrap();

        let error = load_mnist(dir.path()).unwrap_err();
        let DataError::LengthMismatch {
            expected, actual, ..
        } = error
        else {
            panic!("expected a length error, got {error}");
        };
        assert_eq!(expected, 16 + 2 * 784);
        assert_eq!(actual, 16 + 2 * 784 - 1);
    }

    #[test]
    fn header_only_fragment_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        fs::write(dir.path().join(TEST_LABELS), [0u8, 0, 8]).unwrap();
        fs::remove_file(dir.path().join(format!("{TEST_LABELS}.gz"))).unwrap();
        let error = load_mnist(dir.path()).unwrap_err();
        assert!(
            matches!(
                error,
                DataError::TooShort {
                    len: 3,
                    header_len: 8,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn count_mismatch_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        fs::write(dir.path().join(TRAIN_LABELS), label_file(&[1, 2])).unwrap();
        let error = load_mnist(dir.path()).unwrap_err();
        assert!(
            matches!(
                error,
                DataError::CountMismatch {
                    images: 3,
                    labels: 2,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn label_above_nine_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        fs::write(dir.path().join(TRAIN_LABELS), label_file(&[1, 10, 3])).unwrap();
        let error = load_mnist(dir.path()).unwrap_err();
        assert!(
            matches!(
                error,
                DataError::InvalidLabel {
                    index: 1,
                    label: 10,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn corrupt_gzip_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        fs::write(dir.path().join(format!("{TRAIN_IMAGES}.gz")), b"not gzip").unwrap();
        let error = load_mnist(dir.path()).unwrap_err();
        assert!(matches!(error, DataError::Decompress { .. }), "{error}");
    }

    #[test]
    fn empty_training_set_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        let side = IMAGE_SIDE as u32;
        fs::write(
            dir.path().join(format!("{TRAIN_IMAGES}.gz")),
            gzip(&image_file(0, side, side, 0)),
        )
        .unwrap();
        fs::write(dir.path().join(TRAIN_LABELS), label_file(&[])).unwrap();
        let error = load_mnist(dir.path()).unwrap_err();
        assert!(
            matches!(error, DataError::EmptyTrainingSet { .. }),
            "{error}"
        );
    }

    #[test]
    fn subset_selects_in_order() {
        let dataset = Dataset {
            images: Tensor::arange(4, (Kind::Float, Device::Cpu)).view([4, 1, 1, 1]),
            labels: Tensor::from_slice(&[0i64, 1, 2, 3]),
        };
        let subset = dataset.subset(&[3, 1]);
        assert_eq!(subset.len(), 2);
        assert_eq!(Vec::<i64>::try_from(&subset.labels).unwrap(), [3, 1]);
        assert_eq!(
            Vec::<f32>::try_from(&subset.images.view([-1])).unwrap(),
            [3.0, 1.0]
        );
        assert!(dataset.subset(&[]).is_empty());
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn subset_rejects_index_past_end() {
        let dataset = Dataset {
            images: Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu)),
            labels: Tensor::from_slice(&[0i64, 1]),
        };
        let _ = dataset.subset(&[2]);
    }

    #[test]
    fn real_mnist_loads_with_published_statistics() {
        let dir = test_mnist_dir();
        let mnist = load_mnist(&dir).unwrap();
        assert_eq!(mnist.train.len(), 60_000);
        assert_eq!(mnist.test.len(), 10_000);
        assert_eq!(mnist.train.images.size(), [60_000, 1, 28, 28]);

        let raw = RawSplit::read(&dir, TRAIN_IMAGES, TRAIN_LABELS).unwrap();
        let stats = PixelStats::of(raw.pixels());
        assert!((stats.mean - 0.1307).abs() < 1e-4, "mean {}", stats.mean);
        assert!((stats.std - 0.3081).abs() < 1e-4, "std {}", stats.std);

        let train_mean = mnist.train.images.mean(Kind::Double).double_value(&[]);
        let train_std = mnist.train.images.std(false).double_value(&[]);
        assert!(train_mean.abs() < 1e-3, "normalised mean {train_mean}");
        assert!((train_std - 1.0).abs() < 1e-3, "normalised std {train_std}");
    }

    #[test]
    fn real_mnist_matches_published_checksums() {
        verify_checksums(&test_mnist_dir()).unwrap();
    }

    #[test]
    fn present_files_need_no_download() {
        let dir = tempfile::tempdir().unwrap();
        write_small_set(dir.path());
        // The mirror list is empty, so success shows that nothing was fetched.
        ensure_files(
            dir.path(),
            true,
            &gzip_source(&[], &MNIST_FILES),
            &test_agent(),
        )
        .unwrap();
    }

    #[test]
    fn missing_files_without_download_fail() {
        let dir = tempfile::tempdir().unwrap();
        let error = ensure_mnist(dir.path(), false).unwrap_err();
        let DataError::Missing { names, .. } = error else {
            panic!("expected a missing-file error, got {error}");
        };
        assert_eq!(names.len(), 4);
    }

    /// Serves `files` (URL path to body) over HTTP/1.1 on a loopback port,
    /// returning 404 for other paths. The thread lives until the test process ends.
    pub(crate) fn serve(files: HashMap<String, Vec<u8>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let files = Arc::new(files);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                // Skip the headers up to the blank line.
                let mut header = String::new();
                while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                    header.clear();
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match files.get(path) {
                    Some(body) => ("200 OK", body.as_slice()),
                    None => ("404 Not Found", &b"not found"[..]),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        address
    }

    /// Agent that ignores proxy variables, so requests stay on loopback.
    pub(crate) fn test_agent() -> ureq::Agent {
        ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .proxy(None)
                .timeout_global(Some(Duration::from_secs(10)))
                .build(),
        )
    }

    /// Address of a loopback port with nothing listening on it.
    fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    #[test]
    fn download_falls_through_to_working_mirror() {
        let contents = b"fake idx contents".to_vec();
        let checksum = sha256_hex(&contents);
        let files = [FileSpec::mnist("fake-idx", &checksum)];
        let mut served = HashMap::new();
        served.insert("/good/fake-idx.gz".to_string(), gzip(&contents));
        let address = serve(served);
        let missing = format!("http://{address}/missing/");
        let good = format!("http://{address}/good/");

        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nested");
        ensure_files(
            &target,
            true,
            &gzip_source(&[&missing, &good], &files),
            &test_agent(),
        )
        .unwrap();

        assert_eq!(fs::read(target.join("fake-idx")).unwrap(), contents);
        let leftovers: Vec<_> = fs::read_dir(&target)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers,
            ["fake-idx"],
            "temporary files must be renamed away"
        );
    }

    #[test]
    fn download_checksum_mismatch_names_both_hashes() {
        let contents = b"tampered contents".to_vec();
        let expected = sha256_hex(b"original contents");
        let files = [FileSpec::mnist("fake-idx", &expected)];
        let mut served = HashMap::new();
        served.insert("/mirror/fake-idx.gz".to_string(), gzip(&contents));
        let address = serve(served);
        let mirror = format!("http://{address}/mirror/");

        let dir = tempfile::tempdir().unwrap();
        let error = ensure_files(
            dir.path(),
            true,
            &gzip_source(&[&mirror], &files),
            &test_agent(),
        )
        .unwrap_err();

        let message = error.to_string();
        let DataError::Download { name, failures } = error else {
            panic!("expected a download error, got {message}");
        };
        assert_eq!(name, "fake-idx");
        assert_eq!(failures.len(), 1);
        let MirrorError::ChecksumMismatch {
            algorithm,
            expected: reported,
            actual,
        } = &failures[0].error
        else {
            panic!("expected a checksum mismatch, got {}", failures[0].error);
        };
        assert_eq!(*algorithm, "SHA-256");
        assert_eq!(reported, &expected);
        assert_eq!(actual, &sha256_hex(&contents));
        assert!(message.contains(&expected), "{message}");
        assert!(message.contains(actual.as_str()), "{message}");
        assert!(
            !dir.path().join("fake-idx").exists(),
            "a rejected download must not be written"
        );
    }

    #[test]
    fn download_lists_every_mirror_failure() {
        let files = [FileSpec::mnist("fake-idx", "00")];
        let address = serve(HashMap::new());
        let not_found = format!("http://{address}/");
        let refused = format!("http://{}/", closed_port());

        let dir = tempfile::tempdir().unwrap();
        let error = ensure_files(
            dir.path(),
            true,
            &gzip_source(&[&not_found, &refused], &files),
            &test_agent(),
        )
        .unwrap_err();

        let message = error.to_string();
        let DataError::Download { failures, .. } = error else {
            panic!("expected a download error, got {message}");
        };
        assert_eq!(failures.len(), 2);
        assert_eq!(failures[0].url, format!("{not_found}fake-idx.gz"));
        assert_eq!(failures[1].url, format!("{refused}fake-idx.gz"));
        assert!(
            matches!(
                failures[0].error,
                MirrorError::Request(ureq::Error::StatusCode(404))
            ),
            "{message}"
        );
        assert!(
            matches!(failures[1].error, MirrorError::Request(_)),
            "{message}"
        );
        assert!(message.contains(&not_found), "{message}");
        assert!(message.contains(&refused), "{message}");
    }

    #[test]
    fn download_then_verify_rejects_mixed_folder() {
        let contents = b"downloaded contents".to_vec();
        let downloaded_hash = sha256_hex(&contents);
        let local_hash = sha256_hex(b"published local contents");
        let files = [
            FileSpec::mnist("local-idx", &local_hash),
            FileSpec::mnist("fake-idx", &downloaded_hash),
        ];
        let mut served = HashMap::new();
        served.insert("/fake-idx.gz".to_string(), gzip(&contents));
        let address = serve(served);
        let mirror = format!("http://{address}/");

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("local-idx"), b"some other local contents").unwrap();
        let error = ensure_files(
            dir.path(),
            true,
            &gzip_source(&[&mirror], &files),
            &test_agent(),
        )
        .unwrap_err();
        assert!(
            matches!(&error, DataError::ChecksumMismatch { path, .. } if path.ends_with("local-idx")),
            "{error}"
        );
    }
}
