//! MNIST loading: IDX parsing and validation, normalisation, and the
//! checksummed download from public mirrors.
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
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use tracing::{debug, info, warn};

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
    FileSpec {
        name: TRAIN_IMAGES,
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    },
    FileSpec {
        name: TRAIN_LABELS,
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    FileSpec {
        name: TEST_IMAGES,
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    },
    FileSpec {
        name: TEST_LABELS,
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
];

const IMAGE_MAGIC: u32 = 2051;
const LABEL_MAGIC: u32 = 2049;
const IMAGE_HEADER_LEN: usize = 16;
const LABEL_HEADER_LEN: usize = 8;

/// Maximum size of a downloaded (compressed) body. The largest MNIST file is about 9.9 MB compressed.
const MAX_DOWNLOAD_BYTES: u64 = 32 << 20;
/// Maximum size of a decompressed download. The largest MNIST file is 47,040,016 bytes.
const MAX_RAW_BYTES: u64 = 64 << 20;

/// Errors from finding, reading, validating or downloading MNIST files.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Some of the MNIST files are in neither the gzip nor the raw form.
    #[error(
        "MNIST files not found in {}: looked for {}; pass --download to fetch them or --data-dir to point at a folder that contains them",
        dir.display(),
        describe_candidates(names)
    )]
    Missing {
        /// Folder that was searched.
        dir: PathBuf,
        /// Base names (without `.gz`) of the files not found.
        names: Vec<String>,
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

    /// The uncompressed contents of a file do not have the published SHA-256.
    #[error(
        "SHA-256 mismatch for {}: expected {expected}, got {actual}; delete the file and fetch it again with --download",
        path.display()
    )]
    ChecksumMismatch {
        /// File that failed.
        path: PathBuf,
        /// Published SHA-256, in hex.
        expected: String,
        /// SHA-256 of the file's uncompressed contents, in hex.
        actual: String,
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
    /// The decompressed body does not have the published SHA-256.
    #[error("SHA-256 mismatch: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// Published SHA-256, in hex.
        expected: String,
        /// SHA-256 of the decompressed body, in hex.
        actual: String,
    },
}

fn describe_candidates(names: &[String]) -> String {
    let candidates: Vec<String> = names.iter().map(|n| format!("{n}.gz or {n}")).collect();
    candidates.join(", ")
}

fn describe_failures(failures: &[MirrorFailure]) -> String {
    let mut text = String::new();
    for failure in failures {
        let _ = write!(text, "\n  {}: {}", failure.url, failure.error);
    }
    text
}

/// Images and labels of one MNIST split, kept as contiguous tensors so that a
/// mini-batch is one `index_select`.
#[derive(Debug)]
pub struct Dataset {
    /// Normalised pixels, `[N, 1, 28, 28]` f32.
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

/// The MNIST training (60,000) and test (10,000) splits on the CPU, both
/// normalised with the training set's pixel mean and standard deviation.
#[derive(Debug)]
pub struct Mnist {
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
pub fn load_mnist(dir: &Path) -> Result<Mnist, DataError> {
    require_files(dir, &MNIST_FILES)?;
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
    Ok(Mnist {
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
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(300)))
            .build(),
    );
    ensure_files(dir, download, &MNIST_MIRRORS, &MNIST_FILES, &agent)
}

/// Checks that the uncompressed contents of each of the four MNIST files in
/// `dir` have the published SHA-256.
pub fn verify_checksums(dir: &Path) -> Result<(), DataError> {
    verify_files(dir, &MNIST_FILES)
}

/// Name and expected uncompressed SHA-256 (lowercase hex) of one data file.
#[derive(Clone, Copy, Debug)]
struct FileSpec<'a> {
    name: &'a str,
    sha256: &'a str,
}

/// Looks for `dir/NAME`, then `dir/NAME.gz`.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Some(raw);
    }
    let gzip = dir.join(format!("{name}.gz"));
    gzip.is_file().then_some(gzip)
}

fn missing_files<'a>(dir: &Path, files: &'a [FileSpec<'a>]) -> Vec<&'a FileSpec<'a>> {
    files
        .iter()
        .filter(|file| find_file(dir, file.name).is_none())
        .collect()
}

fn require_files(dir: &Path, files: &[FileSpec<'_>]) -> Result<(), DataError> {
    let missing = missing_files(dir, files);
    if missing.is_empty() {
        return Ok(());
    }
    Err(DataError::Missing {
        dir: dir.to_path_buf(),
        names: missing.iter().map(|file| file.name.to_string()).collect(),
    })
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

fn read_file(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), DataError> {
    let path = find_file(dir, name).ok_or_else(|| DataError::Missing {
        dir: dir.to_path_buf(),
        names: vec![name.to_string()],
    })?;
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
        let (images_path, images) = read_file(dir, images_name)?;
        let image_count = check_images(&images_path, &images)?;
        let (labels_path, labels) = read_file(dir, labels_name)?;
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
struct PixelStats {
    mean: f64,
    std: f64,
}

impl PixelStats {
    /// Computes the statistics exactly from a histogram of the byte values.
    ///
    /// When every pixel has the same value the standard deviation is 0, so 1
    /// is used instead and normalisation only shifts the pixels.
    fn of(pixels: &[u8]) -> PixelStats {
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

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

fn verify_files(dir: &Path, files: &[FileSpec<'_>]) -> Result<(), DataError> {
    for file in files {
        let (path, contents) = read_file(dir, file.name)?;
        let actual = sha256_hex(&contents);
        if actual != file.sha256 {
            return Err(DataError::ChecksumMismatch {
                path,
                expected: file.sha256.to_string(),
                actual,
            });
        }
    }
    Ok(())
}

/// [`ensure_mnist`] with the mirrors, file table and HTTP agent as parameters.
fn ensure_files(
    dir: &Path,
    download: bool,
    mirrors: &[&str],
    files: &[FileSpec<'_>],
    agent: &ureq::Agent,
) -> Result<(), DataError> {
    let missing = missing_files(dir, files);
    if missing.is_empty() {
        return Ok(());
    }
    if !download {
        return require_files(dir, files);
    }

    fs::create_dir_all(dir).map_err(|source| DataError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for file in missing {
        download_file(dir, mirrors, file, agent)?;
    }
    verify_files(dir, files)
}

/// Downloads one file from the first mirror that serves it with the right
/// checksum and writes it uncompressed to `dir/NAME`.
fn download_file(
    dir: &Path,
    mirrors: &[&str],
    file: &FileSpec<'_>,
    agent: &ureq::Agent,
) -> Result<(), DataError> {
    let mut failures = Vec::new();
    for mirror in mirrors {
        let url = format!("{mirror}{}.gz", file.name);
        info!(%url, file = file.name, "downloading MNIST file");
        match fetch_verified(agent, &url, file.sha256) {
            Ok(contents) => {
                let path = dir.join(file.name);
                write_atomically(&path, &contents)?;
                info!(%url, path = %path.display(), bytes = contents.len(), "downloaded MNIST file");
                return Ok(());
            }
            Err(error) => {
                warn!(%url, file = file.name, %error, "MNIST mirror failed, trying the next one");
                failures.push(MirrorFailure { url, error });
            }
        }
    }
    Err(DataError::Download {
        name: file.name.to_string(),
        failures,
    })
}

/// Fetches `url` and returns its decompressed body if it has SHA-256 `expected`.
fn fetch_verified(agent: &ureq::Agent, url: &str, expected: &str) -> Result<Vec<u8>, MirrorError> {
    let mut response = agent.get(url).call()?;
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_DOWNLOAD_BYTES)
        .read_to_vec()?;

    // A server that sends the file with `Content-Encoding: gzip` has it
    // decoded by ureq already, so only a body that is still gzip is inflated.
    let contents = if body.starts_with(&[0x1f, 0x8b]) {
        gunzip_limited(&body).map_err(MirrorError::Decompress)?
    } else {
        body
    };
    let actual = sha256_hex(&contents);
    if actual != expected {
        return Err(MirrorError::ChecksumMismatch {
            expected: expected.to_string(),
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
mod tests {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::Arc;
    use std::thread;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

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
        ensure_files(dir.path(), true, &[], &MNIST_FILES, &test_agent()).unwrap();
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
    fn serve(files: HashMap<String, Vec<u8>>) -> SocketAddr {
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
    fn test_agent() -> ureq::Agent {
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
        let files = [FileSpec {
            name: "fake-idx",
            sha256: &checksum,
        }];
        let mut served = HashMap::new();
        served.insert("/good/fake-idx.gz".to_string(), gzip(&contents));
        let address = serve(served);
        let missing = format!("http://{address}/missing/");
        let good = format!("http://{address}/good/");

        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nested");
        ensure_files(&target, true, &[&missing, &good], &files, &test_agent()).unwrap();

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
        let files = [FileSpec {
            name: "fake-idx",
            sha256: &expected,
        }];
        let mut served = HashMap::new();
        served.insert("/mirror/fake-idx.gz".to_string(), gzip(&contents));
        let address = serve(served);
        let mirror = format!("http://{address}/mirror/");

        let dir = tempfile::tempdir().unwrap();
        let error = ensure_files(dir.path(), true, &[&mirror], &files, &test_agent()).unwrap_err();

        let message = error.to_string();
        let DataError::Download { name, failures } = error else {
            panic!("expected a download error, got {message}");
        };
        assert_eq!(name, "fake-idx");
        assert_eq!(failures.len(), 1);
        let MirrorError::ChecksumMismatch {
            expected: reported,
            actual,
        } = &failures[0].error
        else {
            panic!("expected a checksum mismatch, got {}", failures[0].error);
        };
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
        let files = [FileSpec {
            name: "fake-idx",
            sha256: "00",
        }];
        let address = serve(HashMap::new());
        let not_found = format!("http://{address}/");
        let refused = format!("http://{}/", closed_port());

        let dir = tempfile::tempdir().unwrap();
        let error = ensure_files(
            dir.path(),
            true,
            &[&not_found, &refused],
            &files,
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
            FileSpec {
                name: "local-idx",
                sha256: &local_hash,
            },
            FileSpec {
                name: "fake-idx",
                sha256: &downloaded_hash,
            },
        ];
        let mut served = HashMap::new();
        served.insert("/fake-idx.gz".to_string(), gzip(&contents));
        let address = serve(served);
        let mirror = format!("http://{address}/");

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("local-idx"), b"some other local contents").unwrap();
        let error = ensure_files(dir.path(), true, &[&mirror], &files, &test_agent()).unwrap_err();
        assert!(
            matches!(&error, DataError::ChecksumMismatch { path, .. } if path.ends_with("local-idx")),
            "{error}"
        );
    }
}
