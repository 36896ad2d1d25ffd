//! Differentially private upload: exact discrete Laplace noise and the
//! sparse vector technique.

pub mod noise;
pub mod svt;

pub use noise::{DiscreteLaplace, NoiseError};
pub use svt::{PrivacyError, PrivateUpload, Release, Scales};
