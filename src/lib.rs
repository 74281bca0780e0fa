//! brainsurgery: declarative, reproducible surgery on neural-network checkpoints.
//!
//! Modules in data-path order, each importing only those above it: element types, kernels and
//! dense linear algebra, checkpoint formats, free space on filesystems, the memory budget and
//! scratch arena, tensor references and the plan language, lazy values, the run state (aliases
//! of tensors), writing checkpoints, transforms, the executor, and the front ends (command line,
//! Python bindings).

#![deny(missing_docs)]

pub mod dtype;
pub mod kernels;
pub mod linalg;
pub mod formats;
pub mod space;
pub mod memory;
pub mod references;
pub mod plan;
pub mod value;
pub mod state;
pub mod write;
pub mod transforms;
pub mod error;
pub mod executor;
pub mod prompt;
pub mod cli;
#[cfg(feature = "python")]
pub mod bindings;
#[cfg(test)]
mod layering;

pub use error::Error;
