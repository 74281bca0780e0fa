//! brainsurgery: declarative, reproducible surgery on neural-network checkpoints.
//!
//! Modules in data-path order: element types and kernels, checkpoint formats, the plan language
//! and tensor references, lazy values, transforms, the executor, and the front ends (command
//! line, Python bindings).

#![deny(missing_docs)]

pub mod dtype;
pub mod kernels;
pub mod formats;
pub mod plan;
pub mod references;
pub mod value;
pub mod transforms;
pub mod executor;
pub mod error;
pub mod cli;
pub mod prompt;
#[cfg(feature = "python")]
pub mod bindings;

pub use error::Error;
