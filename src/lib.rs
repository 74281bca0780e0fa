//! brainsurgery: declarative, reproducible surgery on neural-network checkpoints.
//!
//! Modules in data-path order: element types and kernels, checkpoint formats, the plan language
//! and tensor references, lazy values, transforms, the executor, and the front ends (command
//! line, Python bindings).

#[cfg(feature = "python")]
pub mod bindings;
pub mod cli;
pub mod dtype;
pub mod error;
pub mod executor;
pub mod formats;
pub mod kernels;
pub mod plan;
pub mod references;
pub mod transforms;
pub mod value;

pub use error::Error;
